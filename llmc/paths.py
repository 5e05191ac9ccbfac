"""Where llmc keeps what it can rebuild: converted checkpoints, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$LLMC_CACHE_DIR, default ~/.cache/llmc."""
    return Path(os.environ.get("LLMC_CACHE_DIR", Path.home() / ".cache" / "llmc"))
