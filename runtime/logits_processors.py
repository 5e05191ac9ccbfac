"""The logits a token is sampled from: penalties, logit_bias, min_tokens and the structured-output mask, in
vLLM's order, applied to a copy. The logprobs llmc reports are taken before this (the model's own
distribution, as vLLM's default)."""

from __future__ import annotations

import numpy as np

from llmc.runtime.sequence import SamplingParams
from llmc.runtime.structured_output import SequenceGrammar

FLOAT32_MAX = float(np.finfo(np.float32).max)


def changes_logits(params: SamplingParams) -> bool:
    """Whether anything but temperature / top-k / top-p shapes this request's distribution."""
    return bool(params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
                or params.logit_bias or params.min_tokens or params.structured is not None)


def process(logits: np.ndarray, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
            stop_ids: list[int], allowed: np.ndarray | None = None) -> np.ndarray:
    """logits [vocab] as sampled from. output_ids: the tokens generated so far (those of this row's
    position); stop_ids: EOS and stop_token_ids (banned before min_tokens); allowed: bool [vocab] of the
    grammar, or None."""
    edits = (params.repetition_penalty != 1.0 or params.logit_bias or len(output_ids) < params.min_tokens
             or ((params.presence_penalty or params.frequency_penalty) and output_ids))
    out = logits.astype(np.float32, copy=True) if edits else logits  # a grammar alone: one pass below
    vocab = out.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.asarray(prompt_ids + output_ids, dtype=np.int64))
        seen = seen[seen < vocab]
        values = out[seen]
        with np.errstate(over="ignore", divide="ignore"):  # a tiny penalty overflows: clipped to float32's range
            scaled = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
        out[seen] = np.clip(scaled, -FLOAT32_MAX, FLOAT32_MAX)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        counts = np.bincount(np.asarray(output_ids, dtype=np.int64), minlength=vocab)[:vocab]
        out -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    for token, bias in params.logit_bias:
        if token < vocab:
            out[token] += bias
    if len(output_ids) < params.min_tokens:
        out[[t for t in stop_ids if t < vocab]] = -np.inf
    if allowed is not None:
        out = np.where(allowed[:vocab], out, np.float32(-np.inf))  # a new array: logits stay as they are
    return out


def draft_rows(logits: np.ndarray, drafts: list[int], params: SamplingParams, prompt_ids: list[int],
               output_ids: list[int], stop_ids: list[int], grammar: SequenceGrammar | None) -> np.ndarray:
    """A verification's rows [k + 1, vocab] as sampled from: row j follows output_ids + drafts[:j]. The grammar
    walks the drafts it allows and is rolled back after; rows past the first draft it refuses stay as they are
    (that draft's row gives it probability 0, so verification rejects it and never reads them)."""
    rows = logits.astype(np.float32, copy=True)
    taken = 0
    for j in range(len(rows)):
        allowed = grammar.allowed() if grammar is not None else None
        rows[j] = process(logits[j], params, prompt_ids, output_ids + drafts[:j], stop_ids, allowed)
        if j == len(drafts) or grammar is None:
            continue
        if not allowed[drafts[j]]:
            break
        grammar.accept(drafts[j])
        taken += 1
    if grammar is not None:
        grammar.rollback(taken)
    return rows
