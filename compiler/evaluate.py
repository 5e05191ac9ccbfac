"""Quality of a model on held-out text: perplexity over fixed windows, and the mean KL divergence of
its next-token distribution from a reference model's (the unquantized source).

Scorers map one window of token ids [T] to logits [T, vocab]; they are the torch IR (at build time,
fake-quant or fp32) or a bundle's onnxruntime engine (`llmc eval`). Only numpy at import time, so
a serving-only install can score a bundle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llmc.errors import ConfigError

log = logging.getLogger(__name__)

Scorer = Callable[[np.ndarray], np.ndarray]  # ids [T] -> logits [T, vocab]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def evaluate(score: Scorer, windows: np.ndarray, reference: Scorer | None = None) -> dict:
    """Perplexity of `score` over windows [n, T] (each scored alone; T-1 predictions each) and, with a
    reference, the reference's perplexity and the mean KL(reference || model) over every position."""
    nll, ref_nll, kl, count = 0.0, 0.0, 0.0, 0
    for index, ids in enumerate(windows):
        logp = _log_softmax(score(ids))  # [T, V]
        nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
        if reference is not None:
            ref_logp = _log_softmax(reference(ids))
            ref_nll -= float(ref_logp[np.arange(len(ids) - 1), ids[1:]].sum())
            kl += float((np.exp(ref_logp) * (ref_logp - logp)).sum(-1).sum())
        log.info("    eval window %d/%d", index + 1, len(windows))
    result = {"perplexity": float(np.exp(nll / count)), "windows": int(len(windows)),
              "window_tokens": int(windows.shape[1]), "predicted_tokens": count}
    if reference is not None:
        result["reference_perplexity"] = float(np.exp(ref_nll / count))
        result["kl_from_reference"] = kl / (len(windows) * windows.shape[1])
    return result


def torch_scorer(model) -> Scorer:
    """The torch IR model (one window = one sequence in a single block)."""
    import torch

    def score(ids: np.ndarray) -> np.ndarray:
        t = len(ids)
        i32 = torch.int32
        logits = model(input_ids=torch.from_numpy(ids), positions=torch.arange(t), slot_mapping=torch.arange(t),
                       block_tables=torch.zeros(1, 1, dtype=i32), context_lens=torch.tensor([t], dtype=i32),
                       query_start=torch.tensor([0, t], dtype=i32), logits_index=torch.arange(t),
                       kv_cache=model.new_kv_cache(1, t))
        return logits.numpy()

    return score


def bundle_scorer(bundle, num_threads: int | None = None, chunk_tokens: int | None = None) -> Scorer:
    """A bundle's onnxruntime engine, over its own block size. With chunk_tokens, a window is scored that
    many tokens a step, so later tokens read the earlier ones' K/V from the pool (the KV dtype and the
    cached-key paths count, as when serving); otherwise in one step."""
    from llmc.runtime.engine_ort import OrtEngine
    from llmc.runtime.kv_pool import KVPool
    from llmc.runtime.step_inputs import Chunk, layout_step

    engine = OrtEngine(bundle, num_threads)
    block_size = bundle.manifest["kv_cache"]["block_size"]

    def score(ids: np.ndarray) -> np.ndarray:
        t = len(ids)
        num_blocks = -(-t // block_size)
        pool = KVPool(bundle.geometry, num_blocks, block_size, bundle.kv_dtype)
        step = chunk_tokens or t
        chunks = [Chunk(ids[i:i + step].tolist(), i, list(range(num_blocks)), len(ids[i:i + step]))
                  for i in range(0, t, step)]
        return np.concatenate([engine.step(layout_step([chunk], block_size), pool) for chunk in chunks])

    return score


def reference_scorer(path: Path, vocab_size: int, chunk_tokens: int | None = None) -> Scorer:
    """The reference to measure KL against: another bundle (onnxruntime) or a checkpoint (torch; needs
    llmc[build])."""
    from llmc.artifacts.bundle import MANIFEST, load_bundle

    if (path / MANIFEST).is_file():
        bundle = load_bundle(path)
        geometry = bundle.geometry
        scorer = bundle_scorer(bundle, chunk_tokens=chunk_tokens)
    else:
        try:
            from llmc.compiler.importer import import_checkpoint
        except ImportError as err:
            raise ConfigError(f"scoring the checkpoint {path} needs the build extra ({err}); "
                              "`pip install llmc[build]`, or pass an fp32 bundle as the reference") from None
        ir = import_checkpoint(path)
        geometry = ir.geometry
        scorer = torch_scorer(ir.model)
    if geometry.vocab_size != vocab_size:
        raise ConfigError(f"reference {path} has a vocabulary of {geometry.vocab_size} tokens, the bundle "
                          f"{vocab_size}: they are not the same model family")
    return scorer


def eval_bundle(bundle_path: Path, texts: list[Path], reference: Path | None, seq_len: int,
                max_windows: int, chunk_tokens: int | None = None) -> dict:
    """`llmc eval`: perplexity of a bundle on text files and, with a reference, KL from it (each scored
    chunk_tokens a step, or a window a step).

    The default reference of a quantized bundle is its source checkpoint, when it is still on disk.
    """
    from llmc.artifacts.bundle import load_bundle
    from llmc.compiler import calibration

    bundle = load_bundle(bundle_path)
    quantized = any(p.get("num_quantized") for p in bundle.manifest.get("passes", []))
    if reference is None and quantized and Path(bundle.manifest["source"]["path"]).exists():
        reference = Path(bundle.manifest["source"]["path"])
    ids = calibration.token_stream(bundle.tokenizer_dir, texts, [], bundle.geometry.vocab_size)
    windows = calibration.windows(ids, seq_len, None, None, "eval")[:max_windows]
    ref = reference_scorer(reference, bundle.geometry.vocab_size, chunk_tokens) if reference is not None else None
    result = evaluate(bundle_scorer(bundle, chunk_tokens=chunk_tokens), windows, ref)
    result.update({"bundle": str(bundle.path), "texts": [str(t) for t in texts],
                   "reference": str(reference) if reference is not None else None, "chunk_tokens": chunk_tokens})
    return result
