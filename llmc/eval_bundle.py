"""`llmc eval`: a bundle's perplexity on text files, and its KL from a reference (another bundle, or a
checkpoint scored by the torch IR). The command's layer: it joins the runtime's engine and the compiler's
tokenized windows and torch scorer (neither of those packages imports the other)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmc.compiler.evaluate import Scorer, evaluate, torch_scorer
from llmc.errors import ConfigError


def bundle_scorer(bundle, num_threads: int | None = None, chunk_tokens: int | None = None) -> Scorer:
    """A bundle's onnxruntime engine, over its own block size. With chunk_tokens, a window is scored that
    many tokens a step, so later tokens read the earlier ones' K/V from the pool (the KV dtype and the
    cached-key paths count, as when serving); otherwise in one step."""
    from llmc.runtime.engine_ort import OrtEngine
    from llmc.runtime.kv_pool import KVPool
    from llmc.runtime.step_inputs import Chunk, layout_step

    engine = OrtEngine(bundle, num_threads)
    block_size = bundle.block_size

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
    quantized = any(p.num_quantized for p in bundle.manifest.passes)
    if reference is None and quantized and Path(bundle.manifest.source.path).exists():
        reference = Path(bundle.manifest.source.path)
    ids = calibration.token_stream(bundle.tokenizer_dir, texts, [], bundle.geometry.vocab_size)
    windows = calibration.windows(ids, seq_len, None, None, "eval")[:max_windows]
    ref = reference_scorer(reference, bundle.geometry.vocab_size, chunk_tokens) if reference is not None else None
    result = evaluate(bundle_scorer(bundle, chunk_tokens=chunk_tokens), windows, ref)
    result.update({"bundle": str(bundle.path), "texts": [str(t) for t in texts],
                   "reference": str(reference) if reference is not None else None, "chunk_tokens": chunk_tokens})
    return result
