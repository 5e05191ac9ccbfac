"""`device: cuda` for LLM: the torch + Triton engine and its device KV pool, imported only when asked for (the
CPU serving path never imports torch)."""

from __future__ import annotations

from llmc.artifacts.bundle import Bundle
from llmc.errors import ConfigError
from llmc.runtime.engine_config import EngineConfig
from llmc.runtime.kv_pool import blocks_in_budget

TORCH_DEVICE = "cuda"  # the tests run the engine on the CPU (TRITON_INTERPRET=1) by setting this to "cpu"


def cuda_engine(bundle: Bundle, budget_bytes: int, drafts_with_model: bool, config: EngineConfig):
    """(engine, pool, draft pool None) for LLM; ConfigError where this machine or bundle cannot run it."""
    from llmc.runtime import engine_torch

    if TORCH_DEVICE == "cuda":
        engine_torch.check_cuda()
    if drafts_with_model:
        raise ConfigError("--device cuda: draft-model speculation runs on the CPU engine only; serve with "
                          "--no-speculation, or build an n-gram bundle")
    engine = engine_torch.TorchEngine(bundle, TORCH_DEVICE, cuda_graphs=config.cuda_graphs,
                                      max_num_seqs=config.max_num_seqs)
    dtype = bundle.kv_dtype if TORCH_DEVICE == "cuda" else "float32"  # the interpreter has no float16 dot
    num_blocks = blocks_in_budget([bundle.geometry], bundle.block_size, budget_bytes, dtype)
    return engine, engine_torch.TorchKVPool(bundle.geometry, num_blocks, bundle.block_size, dtype,
                                            device=TORCH_DEVICE), None
