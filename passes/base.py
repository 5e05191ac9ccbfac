"""The pass contract: a name, a precondition check, and a record of what changed and how long it took."""

from __future__ import annotations

import logging
import time
from typing import Protocol

from llmc.errors import PassError

log = logging.getLogger(__name__)


class Pass(Protocol):
    """One compiler pass over the ModelIR."""

    name: str

    def check(self, ir) -> None:
        """Raise PassError when the IR is not what this pass expects."""

    def run(self, ir) -> dict:
        """Transform the IR in place; return what changed (goes into the manifest)."""


def run_passes(ir, passes: list[Pass]) -> list[dict]:
    """Run passes in order, each checked, logged and timed; returns their records."""
    records = []
    for index, p in enumerate(passes, 1):
        log.info("  pass %d/%d: %s", index, len(passes), p.name)
        p.check(ir)
        start = time.perf_counter()
        try:
            changes = p.run(ir)
        except PassError:
            raise
        except Exception as err:
            raise PassError(f"pass {p.name} failed: {err}") from err
        records.append({"name": p.name, "seconds": round(time.perf_counter() - start, 3), **changes})
    return records
