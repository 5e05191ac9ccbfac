"""Checkpoint import: an HF directory or a GGUF file -> ModelIR (llmc's model + tokenizer).

No remote code, and no pickle unless the user opts in (`allow_pickle: true`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmc.artifacts.bundle import sha256_file
from llmc.artifacts.geometry import ModelGeometry
from llmc.compiler.hf_config import geometry_from_config
from llmc.compiler.model import LlamaModel
from llmc.errors import ModelImportError
from llmc.paths import cache_root

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


@dataclass(slots=True)
class SourceFile:
    """One input file and its identity."""

    name: str
    sha256: str
    size: int


@dataclass(slots=True)
class ModelIR:
    """What the passes and emitters work on."""

    geometry: ModelGeometry
    model: LlamaModel
    tokenizer_dir: Path
    source_kind: str  # "hf" or "gguf"
    source_files: list[SourceFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    quantized: dict = field(default_factory=dict)  # linear name -> kernels.quant.QuantizedWeight
    outlier_channels: dict = field(default_factory=dict)  # linear name -> int64 channels (passes/act_outliers)
    kv_scales: dict = field(default_factory=dict)  # layer index -> (k_scale, v_scale) [KVH*D] (passes/kv_scales)


def hf_name_to_llmc(name: str) -> str | None:
    """Map a transformers parameter name to llmc's; None for tensors llmc does not use."""
    name = name.removeprefix("model.")
    if name.startswith("layers."):
        _, idx, rest = name.split(".", 2)
        rest = (rest.replace("self_attn.", "").replace("mlp.", "")
                .replace("input_layernorm.weight", "attn_norm").replace("post_attention_layernorm.weight", "mlp_norm"))
        return f"layers.{idx}.{rest}"
    return {"embed_tokens.weight": "embed.weight", "norm.weight": "norm",
            "lm_head.weight": "lm_head.weight"}.get(name)


def _read_weights(directory: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(directory.glob("*.bin")) + sorted(directory.glob("*.pt"))
        if not pickled:
            raise ModelImportError(f"{directory}: no weights found (*.safetensors). Is this a complete checkpoint?")
        if not allow_pickle:
            raise ModelImportError(
                f"{directory}: weights are pickled ({pickled[0].name}); llmc does not unpickle by default. "
                "Convert them to safetensors, or set `allow_pickle: true` in model.yaml if you trust the file.")
        return {k: v for f in pickled for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
    from safetensors.torch import load_file

    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as err:  # safetensors raises its own types for truncated/corrupt files
            raise ModelImportError(f"{f}: cannot read weights ({err}); the file is corrupt or truncated") from None
    return tensors


def _load_state(model: LlamaModel, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    state = {}
    for name, tensor in tensors.items():
        mapped = hf_name_to_llmc(name)
        if mapped is not None and not (mapped == "lm_head.weight" and model.lm_head is None):
            state[mapped] = tensor.float()
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise ModelImportError(f"{directory}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}; "
                               "it is incomplete or not a Llama-family checkpoint")
    for name in sorted(expected):
        if tuple(state[name].shape) != tuple(model.state_dict()[name].shape):
            raise ModelImportError(f"{directory}: tensor {name} has shape {tuple(state[name].shape)}, "
                                   f"config.json implies {tuple(model.state_dict()[name].shape)}")
    model.load_state_dict(state, strict=True)


def _tokenizer_files(directory: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            shutil.copy2(directory / name, dest / name)
    if not (dest / "tokenizer.json").is_file():
        raise ModelImportError(f"{directory}: no tokenizer.json (a fast tokenizer) next to the weights; "
                               "save one with transformers' AutoTokenizer.save_pretrained")


def import_hf_dir(directory: Path, max_context: int | None = None, allow_pickle: bool = False,
                  work_dir: Path | None = None) -> ModelIR:
    """Import an HF checkpoint directory (config.json + safetensors + tokenizer files).

    source_files is left to the caller: what identifies the source is not always this directory.
    """
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelImportError(f"{directory}: no config.json; an HF checkpoint directory needs one")
    try:
        cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ModelImportError(f"{config_path}: not valid JSON ({err})") from None
    notes: list[str] = []
    geo = geometry_from_config(cfg, max_context, notes)
    log.info("importing %s: %s, %d layers, hidden %d, %d/%d heads", directory, geo.architecture,
             geo.num_layers, geo.hidden_size, geo.num_heads, geo.num_kv_heads)
    model = LlamaModel(geo)
    _load_state(model, _read_weights(directory, allow_pickle), directory)
    model.eval()
    tok_dir = Path(work_dir or tempfile.mkdtemp(prefix="llmc-tok-")) / "tokenizer"
    _tokenizer_files(directory, tok_dir)
    return ModelIR(geo, model, tok_dir, "hf", [], notes)


def _hf_source_files(directory: Path) -> list[SourceFile]:
    return [SourceFile(p.name, sha256_file(p), p.stat().st_size) for p in sorted(directory.iterdir())
            if p.is_file() and (p.suffix in (".json", ".safetensors", ".jinja", ".bin", ".pt"))]


def convert_gguf(path: Path, digest: str) -> Path:
    """Dequantize a GGUF through transformers into a cached fp32 HF directory; return it."""
    target = cache_root() / "gguf" / digest[:16]
    if (target / "COMPLETE").is_file():
        log.info("using cached conversion of %s at %s", path.name, target)
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as err:
        raise ModelImportError(f"{path}: cannot read GGUF metadata ({err})") from None
    geometry_from_config(config.to_dict())  # refuse unsupported architectures before the slow dequantization
    log.info("dequantizing %s to fp32 (one-time, cached in %s)", path.name, target)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))  # renamed into place when complete
    cfg = model.config.to_dict()
    cfg["architectures"] = cfg.get("architectures") or [type(model).__name__]
    cfg.pop("quantization_config", None)  # the GGUF quantizer marker: the copy is plain fp32
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and cfg.get("tie_word_embeddings"))}
    save_file(state, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    (tmp / "COMPLETE").write_text(digest)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def import_checkpoint(path: Path, max_context: int | None = None, allow_pickle: bool = False,
                      work_dir: Path | None = None) -> ModelIR:
    """Import an HF directory or a .gguf file."""
    if path.is_dir():
        ir = import_hf_dir(path, max_context, allow_pickle, work_dir)
        ir.source_files = _hf_source_files(path)
        return ir
    if path.suffix == ".gguf":  # the GGUF is the source; its cached fp32 conversion is not hashed again
        digest = sha256_file(path)
        ir = import_hf_dir(convert_gguf(path, digest), max_context, allow_pickle, work_dir)
        ir.source_kind = "gguf"
        ir.source_files = [SourceFile(path.name, digest, path.stat().st_size)]
        return ir
    raise ModelImportError(f"{path}: not a checkpoint directory or a .gguf file")
