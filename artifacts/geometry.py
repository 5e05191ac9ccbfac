"""Model geometry and KV-cache sizing; torch-free so the serving path and `llmc kv-size` can use it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
               "int8": 1, "fp8": 1}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name such as 'fp16' or 'float32'."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(sorted(DTYPE_BYTES))}") from None


@dataclass(frozen=True, slots=True)
class ModelGeometry:
    """The shape of a Llama-family decoder: everything the runtime and kv-size need."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    architecture: str = "LlamaForCausalLM"

    def pool_shape(self, num_blocks, block_size) -> tuple:
        """One layer's K (or V) pool, KV_LAYOUT: (num_blocks, block_size, num_kv_heads, head_dim). The one
        definition of it: the runtime's pools, the torch IR's, the ONNX graphs' pool inputs (with symbolic
        num_blocks and block_size) and the TensorRT optimization profile all take it from here."""
        return (num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def to_dict(self) -> dict:
        """Plain dict for the manifest."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelGeometry":
        """Inverse of to_dict."""
        return cls(**data)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x bytes(dtype)."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes(dtype)


def human_bytes(num: float, digits: int = 1) -> str:
    """'520.6 MiB': binary units, whole bytes below 1 KiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num < 1024:
            return f"{int(num)} B" if unit == "B" else f"{num:.{digits}f} {unit}"
        num /= 1024
    return f"{num:.{digits}f} TiB"


# Token-major pools: a sequence's gathered blocks are its keys [L, KVH * D] as they are, the layout the
# engines' Attention reads without a transpose or a copy into a present buffer.
KV_LAYOUT = "[num_blocks, block_size, num_kv_heads, head_dim] per layer, separate K and V pools"
KV_FORMULA = "bytes/token = 2 (K and V) x layers x kv_heads x head_dim x bytes(dtype)"
