"""Quality of a model on held-out text: perplexity over fixed windows, and the mean KL divergence of
its next-token distribution from a reference model's (the unquantized source).

Scorers map one window of token ids [T] to logits [T, vocab]: the torch IR here (at build time,
fake-quant or fp32); a bundle's onnxruntime engine in llmc/eval_bundle.py (`llmc eval`). Only numpy at
import time, so a serving-only install can score a bundle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

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
