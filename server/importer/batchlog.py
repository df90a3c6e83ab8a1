"""`follow-server import --batch-log FILE`: one CSV line per try of a merge edge batch, so
that an operator (or tests.bench.ops) can line up what other users' calls saw with what the
import held at that moment: when each try began (time.monotonic(), the clock every process
on the machine shares), how long it took, its edges, followers and follower range, and how
it ended (ok, busy: a lock was held longer than the batch waits, slow: past its time limit).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from server.importer.staging import Batch

COLUMNS = ("began", "seconds", "edges", "followers", "lo", "hi", "outcome", "pause")


class BatchLog:
    """The CSV lines of one import's edge batches (a no-op without a path)."""

    def __init__(self, path: str | None) -> None:
        self._file: TextIO | None = None
        if path is not None:
            self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
            self._file.write(",".join(COLUMNS) + "\n")

    def write(self, began: float, batch: Batch, outcome: str, pause: float) -> None:
        """One try of `batch`, begun at `began` (time.monotonic()), ended now."""
        if self._file is not None:  # (user ids hold no comma: server.rules)
            seconds = time.monotonic() - began
            self._file.write(
                f"{began:.6f},{seconds:.6f},{batch.edges},{batch.followers},"
                f"{batch.lo},{batch.hi},{outcome},{pause:.6f}\n"
            )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
