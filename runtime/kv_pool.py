"""The KV-cache pools: allocated once from a memory budget, owned by the runtime."""

from __future__ import annotations

import logging

import numpy as np

from llmc.artifacts.geometry import ModelGeometry, kv_bytes_per_token
from llmc.errors import ConfigError

log = logging.getLogger(__name__)

UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
         "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_bytes(text: str | int) -> int:
    """'2GiB', '512MiB', '1e9' or an int -> bytes."""
    if isinstance(text, int):
        return text
    raw = str(text).strip().lower()
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):].strip()
    try:
        return int(float(number) * UNITS[unit])
    except (ValueError, KeyError):
        raise ConfigError(f"cannot read memory size {text!r}; use e.g. 512MiB or 2GiB") from None


def available_memory() -> int:
    """Bytes of memory available to this process now (MemAvailable), 0 if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def plan_kv_budget(memory: str | int | None, fraction: float | None) -> int:
    """The KV budget in bytes: an explicit size, or a fraction of the memory available now."""
    if fraction is not None:
        if not 0 < fraction <= 0.9:
            raise ConfigError(f"--kv-cache-fraction must be in (0, 0.9], got {fraction}")
        available = available_memory()
        if not available:
            raise ConfigError("cannot read available memory here; give --kv-cache-memory instead")
        return int(available * fraction)
    return parse_bytes(memory if memory is not None else "1GiB")


DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}


def blocks_in_budget(geos: list[ModelGeometry], block_size: int, budget_bytes: int, dtype: str) -> int:
    """How many blocks of every model's pools fit in budget_bytes (the formula of `llmc kv-size`)."""
    per_block = block_size * sum(kv_bytes_per_token(g.num_layers, g.num_kv_heads, g.head_dim, dtype) for g in geos)
    num_blocks = budget_bytes // per_block
    if num_blocks < 1:
        raise ConfigError(f"KV-cache budget {budget_bytes} bytes holds no block of {block_size} tokens "
                          f"({per_block} bytes); raise --kv-cache-memory")
    log.info("KV cache: %d blocks x %d tokens = %d tokens in %.1f MiB, %s%s", num_blocks, block_size,
             num_blocks * block_size, num_blocks * per_block / (1 << 20), dtype,
             " (target and draft pools)" if len(geos) > 1 else "")
    return int(num_blocks)


class KVPool:
    """Per-layer K and V pools, [layers, num_blocks, block_size, kv_heads, head_dim] (KV_LAYOUT), float32,
    float16 or int8 codes (the bundle's kv_cache dtype; the engine quantizes what it returns)."""

    def __init__(self, geo: ModelGeometry, num_blocks: int, block_size: int, dtype: str = "float32"):
        shape = (geo.num_layers, *geo.pool_shape(num_blocks, block_size))
        self.keys = np.zeros(shape, dtype=DTYPES[dtype])
        self.values = np.zeros(shape, dtype=DTYPES[dtype])
        self.num_blocks, self.block_size = num_blocks, block_size
        # Flat views [layers, num_blocks * block_size, kv_heads, head_dim]: one row per slot.
        flat = (geo.num_layers, num_blocks * block_size, geo.num_kv_heads, geo.head_dim)
        self._flat_keys = self.keys.reshape(flat)
        self._flat_values = self.values.reshape(flat)

    @classmethod
    def from_budget(cls, geo: ModelGeometry, block_size: int, budget_bytes: int, draft: ModelGeometry | None = None,
                    dtype: str = "float32") -> "tuple[KVPool, KVPool | None]":
        """(target pool, draft pool or None): as many blocks as fit in budget_bytes (same formula as
        `llmc kv-size`). With a draft model the budget holds each block twice, once per model (the two pools
        share block ids)."""
        geos = [geo] if draft is None else [geo, draft]
        num_blocks = blocks_in_budget(geos, block_size, budget_bytes, dtype)
        pools = [cls(g, num_blocks, block_size, dtype) for g in geos]
        return pools[0], (pools[1] if draft is not None else None)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write of shared blocks)."""
        for src, dst in copies:
            self.keys[:, dst] = self.keys[:, src]
            self.values[:, dst] = self.values[:, src]

    def write(self, new_keys: np.ndarray, new_values: np.ndarray, slot_mapping: np.ndarray) -> None:
        """Scatter new K/V [layers, T, kv_heads, head_dim] into their slots, in place.

        One slice assignment per run of consecutive slots: numpy's fancy-index assignment into the
        pool cost ~1 ms per step here, a slice ~3 us.
        """
        breaks = np.flatnonzero(np.diff(slot_mapping) != 1) + 1
        for start, end in zip(np.concatenate(([0], breaks)), np.concatenate((breaks, [len(slot_mapping)]))):
            slot = int(slot_mapping[start])
            self._flat_keys[:, slot:slot + end - start] = new_keys[:, start:end]
            self._flat_values[:, slot:slot + end - start] = new_values[:, start:end]
