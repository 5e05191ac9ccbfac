"""HF config.json -> ModelGeometry (torch-free: `llmc kv-size` uses it too)."""

from __future__ import annotations

from llmc.artifacts.geometry import ModelGeometry
from llmc.errors import ModelImportError

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                           "Qwen2ForCausalLM": "qwen2"}


def geometry_from_config(cfg: dict, max_context: int | None = None, notes: list[str] | None = None) -> ModelGeometry:
    """Map an HF config.json dict to ModelGeometry, refusing what llmc cannot run."""
    archs = cfg.get("architectures") or []
    by_type = {t: a for a, t in SUPPORTED_ARCHITECTURES.items()}
    arch = archs[0] if archs else by_type.get(cfg.get("model_type"), f"(model_type={cfg.get('model_type')!r})")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelImportError(
            f"unsupported architecture {arch}: llmc compiles the Llama family "
            f"({', '.join(SUPPORTED_ARCHITECTURES)}). Convert the model to one of these or open an issue.")
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias"):
        raise ModelImportError(f"{arch} with hidden_act={cfg.get('hidden_act')!r}, mlp_bias={cfg.get('mlp_bias')} "
                               "is not the Llama block shape llmc supports (silu, no MLP bias)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelImportError(f"{arch} uses rope scaling {rope_type!r}, which llmc does not support yet")
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    max_position = int(cfg.get("max_position_embeddings", 2048))
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    if window and window < max_position:
        max_position = int(window)
        (notes if notes is not None else []).append(f"context limited to the sliding window, {window} tokens")
    if max_context:
        max_position = min(max_position, max_context)
    heads = int(cfg["num_attention_heads"])
    return ModelGeometry(
        num_layers=int(cfg["num_hidden_layers"]), hidden_size=int(cfg["hidden_size"]), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        intermediate_size=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
        max_position=max_position, rope_theta=float(theta), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", SUPPORTED_ARCHITECTURES[arch] == "qwen2")),
        architecture=arch)
