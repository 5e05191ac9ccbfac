"""Token selection on the engine's device (the cuda engine): runtime/sampler.py's distribution and draw for a batch
of logits rows, so N token ids cross to the host instead of N x vocab logits. The host draws each row's uniform
from its request's generator, so a seeded request picks the tokens it picks on the host (float64 here too; only a
uniform within rounding of a cumulative boundary can land on the neighbouring token)."""

from __future__ import annotations

import numpy as np
import torch

from llmc.runtime.sampler import SamplingRows
from llmc.runtime.sequence import GREEDY_TEMPERATURE


def sample_rows(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """Token ids int64 [N] from logits [N, vocab]: a row's argmax where its temperature is below
    GREEDY_TEMPERATURE; otherwise temperature, top-k (ties with the k-th kept), top-p (the mass before a token
    below top_p), and the first token, in id order, whose cumulative probability exceeds the row's uniform."""
    greedy = logits.argmax(dim=-1)  # [N]
    if not rows.samples:
        return greedy

    def on_device(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(logits.device)

    vocab = logits.shape[-1]
    temperature = on_device(np.maximum(rows.temperature, GREEDY_TEMPERATURE))  # [N]
    probs = torch.softmax(logits.double() / temperature[:, None], dim=-1)  # [N, V] float64
    top_k = np.where((rows.top_k > 0) & (rows.top_k < vocab), rows.top_k, 0)  # [N], 0: no cut
    if top_k.any():
        largest = probs.topk(int(top_k.max()), dim=-1).values  # [N, K] descending
        kth = largest.gather(1, on_device(np.maximum(top_k - 1, 0))[:, None])  # [N, 1]
        kth = torch.where(on_device(top_k > 0)[:, None], kth, 0.0)
        probs = torch.where(probs >= kth, probs, 0.0)
    if (rows.top_p < 1.0).any():
        ranked, order = probs.sort(dim=-1, descending=True, stable=True)  # ties by id, as the host's argsort
        ranked = ranked / ranked.sum(dim=-1, keepdim=True)
        in_nucleus = (ranked.cumsum(dim=-1) - ranked) < on_device(rows.top_p)[:, None]  # [N, V] ranked order
        in_nucleus |= on_device(rows.top_p >= 1.0)[:, None]
        probs = torch.where(torch.empty_like(in_nucleus).scatter_(1, order, in_nucleus), probs, 0.0)
    cdf = probs.cumsum(dim=-1)  # [N, V] in id order
    cdf = cdf / cdf[:, -1:]
    sampled = torch.searchsorted(cdf, on_device(rows.uniform)[:, None], right=True)[:, 0]
    return torch.where(on_device(rows.temperature < GREEDY_TEMPERATURE), greedy, sampled)
