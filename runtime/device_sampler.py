"""Token selection on the engine's device (the cuda engine): runtime/sampler.py's distribution and draw for a batch
of logits rows, so N token ids cross to the host instead of N x vocab logits. The host draws each row's uniform
from its request's generator, so a seeded request picks the tokens it picks on the host (float64 here too; only a
uniform within rounding of a cumulative boundary can land on the neighbouring token)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from llmc.runtime.sampler import SamplingRows
from llmc.runtime.sequence import GREEDY_TEMPERATURE


def sample_rows(logits: torch.Tensor, rows: SamplingRows,
                to_device: Callable[..., list[torch.Tensor]] | None = None) -> torch.Tensor:
    """Token ids int64 [N] from logits [N, vocab]: a row's argmax where its temperature is below
    GREEDY_TEMPERATURE; otherwise temperature, top-k (ties with the k-th kept), top-p (the mass before a token
    below top_p), and the first token, in id order, whose cumulative probability exceeds the row's uniform.
    to_device: how the rows' arrays reach the device (DeviceStaging.to_device: one transfer that does not wait for
    the GPU); plain copies by default."""
    greedy = logits.argmax(dim=-1)  # [N]
    if not rows.samples:
        return greedy
    vocab = logits.shape[-1]
    top_k = np.where((rows.top_k > 0) & (rows.top_k < vocab), rows.top_k, 0)  # [N], 0: no cut
    arrays = (np.maximum(rows.temperature, GREEDY_TEMPERATURE), np.maximum(top_k - 1, 0), top_k > 0, rows.top_p,
              rows.top_p >= 1.0, rows.uniform, rows.temperature < GREEDY_TEMPERATURE)
    to_device = to_device or (lambda *a: [torch.from_numpy(np.ascontiguousarray(x)).to(logits.device) for x in a])
    temperature, kth_index, cuts, top_p, whole, uniform, argmax = to_device(*arrays)  # [N] each
    probs = torch.softmax(logits.double() / temperature[:, None], dim=-1)  # [N, V] float64
    if top_k.any():
        largest = probs.topk(int(top_k.max()), dim=-1).values  # [N, K] descending
        kth = largest.gather(1, kth_index[:, None])  # [N, 1]
        kth = torch.where(cuts[:, None], kth, 0.0)
        probs = torch.where(probs >= kth, probs, 0.0)
    if (rows.top_p < 1.0).any():
        ranked, order = probs.sort(dim=-1, descending=True, stable=True)  # ties by id, as the host's argsort
        ranked = ranked / ranked.sum(dim=-1, keepdim=True)
        in_nucleus = (ranked.cumsum(dim=-1) - ranked) < top_p[:, None]  # [N, V] ranked order
        in_nucleus |= whole[:, None]
        probs = torch.where(torch.empty_like(in_nucleus).scatter_(1, order, in_nucleus), probs, 0.0)
    cdf = probs.cumsum(dim=-1)  # [N, V] in id order
    cdf = cdf / cdf[:, -1:]
    sampled = torch.searchsorted(cdf, uniform[:, None], right=True)[:, 0]
    return torch.where(argmax, greedy, sampled)
