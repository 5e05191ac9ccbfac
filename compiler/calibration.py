"""Calibration and evaluation text -> token windows [n, seq_len], tokenized with the model's tokenizer.

Windows are whole, non-overlapping chunks of the token stream (the files in the given order,
separated by a blank line). Calibration picks `n_samples` of them at random with a seed;
evaluation takes them in order. Both are reproducible.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from llmc.errors import ConfigError

log = logging.getLogger(__name__)


def _read_token_file(path: Path) -> list[int]:
    """A .npy array or a .json list of token ids."""
    try:
        ids = np.load(path) if path.suffix == ".npy" else np.asarray(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise ConfigError(f"token file {path}: cannot read it ({err}); "
                          "give a .npy array or a .json list of ids") from None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(f"token file {path}: expected a flat list of integer token ids, got shape {ids.shape} "
                          f"of {ids.dtype}")
    return ids.astype(np.int64).tolist()


def token_stream(tokenizer_dir: Path, texts: list[Path], token_files: list[Path], vocab_size: int) -> list[int]:
    """All the text files tokenized (no special tokens) followed by the token files' ids."""
    from tokenizers import Tokenizer

    ids: list[int] = []
    if texts:
        tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        for path in texts:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(f"text file {path}: cannot read it as UTF-8 text ({err})") from None
            ids += tokenizer.encode(text + "\n\n", add_special_tokens=False).ids
    for path in token_files:
        file_ids = _read_token_file(path)
        if file_ids and (min(file_ids) < 0 or max(file_ids) >= vocab_size):
            raise ConfigError(f"token file {path}: ids must lie in [0, {vocab_size}) for this model")
        ids += file_ids
    return ids


def windows(ids: list[int], seq_len: int, count: int | None, seed: int | None, what: str) -> np.ndarray:
    """`count` windows of seq_len tokens [count, seq_len]: random (seeded) or, with seed None, the first ones.

    count None takes every whole window.
    """
    available = len(ids) // seq_len
    if available == 0 or (count is not None and available < count):
        need = seq_len * (count or 1)
        raise ConfigError(f"{what}: the text gives {len(ids)} tokens but {count or 1} window(s) of {seq_len} tokens "
                          f"need {need}; add more text files, or lower n_samples / seq_len")
    chunks = np.asarray(ids[: available * seq_len], dtype=np.int64).reshape(available, seq_len)
    if count is None or seed is None:
        return chunks[:count]
    order = np.random.default_rng(seed).permutation(available)[:count]
    log.info("%s: %d windows of %d tokens out of %d available", what, count, seq_len, available)
    return chunks[np.sort(order)]
