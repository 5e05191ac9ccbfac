"""The manifest's schema: typed sections that the build writes and the runtime, `llmc inspect` and
`llmc kv-size` read as fields.

Sections are frozen pydantic models: loading validates a manifest.json in one call and names the field
that is wrong (`engines.onnxruntime.graph: Field required`). Known sections forbid unknown keys, so a
manifest from another llmc that the schema version does not cover is refused, not half read. Pass
records and evaluation results are open records: their typed fields are what llmc reads, and every
other number a pass reports is kept as it is.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from llmc.artifacts.geometry import ModelGeometry

SCHEMA_VERSION = 1  # bump when a section changes shape; load() refuses newer ones and asks older ones to rebuild
MIN_SCHEMA_VERSION = 1  # the oldest schema this llmc still reads


class Section(BaseModel):
    """A manifest section with a fixed set of fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class OpenRecord(BaseModel):
    """A record whose typed fields llmc reads; the rest is kept as written (`.extra`)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    @property
    def extra(self) -> dict[str, Any]:
        """The fields the schema does not name."""
        return dict(self.model_extra or {})


class SourceFile(Section):
    name: str
    sha256: str
    size: int


class Source(Section):
    """The checkpoint the bundle was built from."""

    kind: str  # gguf, safetensors, ...
    path: str
    files: list[SourceFile]


class KVCache(Section):
    """The KV pools the engines were built for."""

    block_size: int
    dtype: str = "float32"
    layout: str | None = None  # KV_LAYOUT, or an older layout a runtime refuses
    formula: str
    bytes_per_token: int
    scales: str | None = None  # int8 pools: where the static scales live


class PrefillGraph(Section):
    """The int8 graph for steps of many tokens (llmc.Int8Linear)."""

    graph: str
    weights: str
    linear_op: str
    linear_format: str | None = None  # None: an earlier format the runtime refuses with a rebuild message
    weights_format: str
    activations: str
    attention: str


class DecodeGraph(Section):
    """The int4 graph for steps of few tokens (llmc.Int4Linear)."""

    graph: str
    weights: str
    linear_op: str
    linear_format: str


class TensorRTProfile(Section):
    max_tokens: int
    max_seqs: int
    max_blocks: int


class Engine(Section):
    """One target's engine: its step graph (and extra graphs), the ops and kernels it was built with."""

    dir: str
    format: str  # onnx, or safetensors (the cuda target: weights for the torch + Triton engine)
    graph: str | None  # the step graph (onnx); None for the cuda target, whose engine is llmc's code
    weights: str
    opset: int | None
    attention_op: str
    attention_plan: str | None = None  # None: an earlier plan (a padded mask) the runtime refuses
    kv_update: str
    outputs: list[str]
    quantized_linears: list[str] = []
    weight_format: str | None = None  # matmulnbits, qdq, fake; None when nothing is quantized
    accuracy_level: int | None = None  # MatMulNBits' accuracy level
    activation_block_size: int | None = None  # MatMulNBits' int8 activation blocks
    prefill: PrefillGraph | None = None
    decode: DecodeGraph | None = None
    plan: str | None = None  # tensorrt: the serialized engine, None when it was not built
    skipped: str | None = None  # why the engine file was not built
    tensorrt: str | None = None  # the TensorRT version that built `plan` (a plan loads only in that version)
    compute_capability: str | None = None  # the GPU `plan` was built for ("9.0"), where it could be read
    build_seconds: float | None = None
    profile: TensorRTProfile | None = None


class TokenizerInfo(Section):
    """The tokenizer's files, special tokens and chat template."""

    dir: str
    files: list[str]
    eos_token_ids: list[int]
    eos_token: str | None = None
    bos_token: str | None = None
    bos_token_id: int | None = None
    chat_template: str | None = None
    vocab_size: int


class PassRecord(OpenRecord):
    """What one pass did. Quantization passes fill the quantization fields."""

    name: str
    seconds: float = 0.0
    bits: int | None = None
    group_size: int | None = None
    num_quantized: int | None = None
    mean_rel_weight_error: float | None = None


class EvalResult(OpenRecord):
    """Perplexity on held-out windows (and against the source checkpoint where it was scored too)."""

    perplexity: float
    windows: int
    window_tokens: int
    reference_perplexity: float | None = None
    kl_from_reference: float | None = None
    texts: list[str] = []


class Quality(Section):
    eval: EvalResult | None = None
    report: str


class NgramSettings(Section):
    min_n: int = 1
    max_n: int = 3


class DraftModel(Section):
    """The draft model of draft speculation: compiled with its own passes into its own engine."""

    name: str
    source: str
    model: ModelGeometry
    passes: list[PassRecord]
    engine: Engine


class Speculative(Section):
    """How the bundle speculates: the method, k, and the drafter's model or n-gram settings."""

    method: Literal["draft", "ngram"]
    num_tokens: int
    adaptive: bool
    ngram: NgramSettings | None = None
    pairing: PassRecord | None = None  # draft: the spec_pairing pass's record (tokens_compared, ...)
    draft: DraftModel | None = None


class FileEntry(Section):
    sha256: str
    size: int


class Manifest(Section):
    """manifest.json."""

    schema_version: int = SCHEMA_VERSION
    llmc_version: str
    name: str
    created_at: str
    source: Source
    model: ModelGeometry
    dtype: str
    kv_cache: KVCache
    engines: dict[str, Engine]
    tokenizer: TokenizerInfo
    passes: list[PassRecord]
    quality: Quality
    speculative: Speculative | None = None
    notes: list[str] = []
    timings_s: dict[str, float]
    files: dict[str, FileEntry] = {}

    def pass_record(self, name: str) -> PassRecord | None:
        """The record of the pass called `name`, if it ran."""
        return next((p for p in self.passes if p.name == name), None)

    def to_dict(self) -> dict:
        """The JSON-ready dict, keys in schema order."""
        return self.model_dump(mode="json")


def manifest_from_dict(data: dict) -> Manifest:
    """Validate a manifest's dict; ValueError names each wrong field (`engines.onnxruntime.graph: ...`)."""
    try:
        return Manifest.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
                             for e in err.errors()[:5])
        raise ValueError(problems) from None
