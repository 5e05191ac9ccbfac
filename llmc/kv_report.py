"""`llmc kv-size`: KV-cache bytes per token, per request and per batch, with the formula shown."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llmc.artifacts.geometry import KV_FORMULA, ModelGeometry, dtype_bytes, human_bytes, kv_bytes_per_token
from llmc.errors import ConfigError


@dataclass(frozen=True, slots=True)
class KVGeometry:
    """What KV sizing needs, and where it came from."""

    num_layers: int
    num_heads: int | None
    num_kv_heads: int
    head_dim: int
    dtype: str
    context: int
    block_size: int | None
    source: str


def _from_model(geo: ModelGeometry, dtype: str, context: int, block_size: int | None, source: str) -> KVGeometry:
    return KVGeometry(geo.num_layers, geo.num_heads, geo.num_kv_heads, geo.head_dim, dtype, context, block_size, source)


def _geometry_of_target(target: Path) -> tuple[ModelGeometry, str | None, int | None, str]:
    """(geometry, kv dtype or None, block size or None, label) of a yaml, bundle, config or checkpoint."""
    from llmc.compiler.hf_config import geometry_from_config

    if target.is_dir() and (target / "manifest.json").is_file():
        from llmc.artifacts.bundle import read_manifest

        m = read_manifest(target)
        return m.model, m.kv_cache.dtype, m.kv_cache.block_size, f"bundle {target}"
    if target.suffix in (".yaml", ".yml"):
        from llmc.compiler.spec import load_spec

        spec = load_spec(target)
        geo, _, _, label = _geometry_of_target(spec.source_path())
        if spec.max_context:
            geo = ModelGeometry.from_dict({**geo.to_dict(), "max_position": min(geo.max_position, spec.max_context)})
        return geo, spec.kv_cache.dtype, spec.kv_cache.block_size, f"{target} ({label})"
    if target.suffix == ".gguf":
        from transformers import AutoConfig

        return geometry_from_config(AutoConfig.from_pretrained(target.parent, gguf_file=target.name).to_dict()), \
            None, None, f"GGUF {target.name}"
    config = target / "config.json" if target.is_dir() else target
    if not config.is_file():
        raise ConfigError(f"{target}: not a model.yaml, bundle, config.json or checkpoint directory")
    try:
        return geometry_from_config(json.loads(config.read_text())), None, None, f"HF config {config}"
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config}: not valid JSON ({err})") from None


def resolve_geometry(target: Path | None, layers, heads, kv_heads, head_dim, dtype, context, block_size) -> KVGeometry:
    """Geometry from a target, or from explicit options (which override the target's values)."""
    if dtype is not None:
        try:
            dtype_bytes(dtype)
        except ValueError as err:
            raise ConfigError(f"--dtype: {err}") from None
    if target is not None:
        if not target.exists():
            raise ConfigError(f"{target}: no such file or directory")
        geo, kv_dtype, target_block, label = _geometry_of_target(target)
        kv = _from_model(geo, dtype or kv_dtype or "float16", context or geo.max_position,
                         block_size or target_block, label)
        return KVGeometry(layers or kv.num_layers, heads or kv.num_heads, kv_heads or kv.num_kv_heads,
                          head_dim or kv.head_dim, kv.dtype, kv.context, kv.block_size, kv.source)
    missing = [name for name, value in (("--layers", layers), ("--kv-heads", kv_heads), ("--head-dim", head_dim))
               if value is None]
    if missing:
        raise ConfigError(f"give a TARGET (model.yaml, bundle, config.json) or the explicit geometry; "
                          f"missing {', '.join(missing)}")
    if heads is not None and (kv_heads > heads or heads % kv_heads):
        raise ConfigError(f"--kv-heads {kv_heads} must divide --heads {heads}")
    return KVGeometry(layers, heads, kv_heads, head_dim, dtype or "fp16", context or 4096, block_size, "explicit")


def kv_report(kv: KVGeometry, batch: int) -> str:
    """The human-readable report, formula included."""
    per_token = kv_bytes_per_token(kv.num_layers, kv.num_kv_heads, kv.head_dim, kv.dtype)
    slots = kv.context
    if kv.block_size:
        slots = -(-kv.context // kv.block_size) * kv.block_size
    per_request = per_token * slots
    heads = f"{kv.num_heads} query heads, " if kv.num_heads else ""
    grouping = ""
    if kv.num_heads:
        grouping = " (multi-head)" if kv.num_heads == kv.num_kv_heads else \
            f" (grouped-query: {kv.num_heads // kv.num_kv_heads} query heads share each KV head)"
    lines = [
        f"source       {kv.source}",
        f"geometry     {kv.num_layers} layers, {heads}{kv.num_kv_heads} KV heads{grouping}, head_dim {kv.head_dim}, "
        f"{kv.dtype} ({dtype_bytes(kv.dtype)} bytes)",
        f"formula      {KV_FORMULA}",
        f"             = 2 x {kv.num_layers} x {kv.num_kv_heads} x {kv.head_dim} x {dtype_bytes(kv.dtype)}",
        f"per token    {per_token:,} bytes/token ({human_bytes(per_token, 2)})",
        f"per request  {kv.context:,} tokens"
        + (f" (= {slots:,} slots in blocks of {kv.block_size})" if slots != kv.context else "")
        + f": {per_request:,} bytes ({human_bytes(per_request, 2)})",
        f"per batch    {batch} x that: {per_request * batch:,} bytes ({human_bytes(per_request * batch, 2)})",
    ]
    return "\n".join(lines)
