"""What one import tells: its counts, phase timings and bad rows, the error that aborts it,
and its progress bars. Every step adds to one ImportReport, so this sits below them all."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Never

from tqdm import tqdm

from server.importer.options import ImportOptions


class ImportAbortedError(Exception):
    """Bad rows were found and --skip-bad-rows was not given: nothing was imported."""

    def __init__(self, message: str, report: ImportReport) -> None:
        super().__init__(message)
        self.report = report


class ImportIncompleteError(ImportAbortedError):
    """Rows the checks had passed were refused by the merge, under its locks, because the
    service changed their users meanwhile (a follower reached the cap, an account was
    deleted); everything else was imported. Raised at the end unless --skip-bad-rows."""


@dataclass(frozen=True, slots=True)
class BadRow:
    """One refused input row, with its file and line, so the operator can find and fix it."""

    source: str  # "accounts" or "edges"
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.source} line {self.line}: {self.problem}"


@dataclass(slots=True)
class ImportReport:
    """Everything one import found and did, filled in by each step as it goes: what the
    command prints, what ImportAbortedError carries, and what the tests compare."""

    accounts_read: int = 0
    edges_read: int = 0
    accounts_written: int = 0
    edges_added: int = 0
    edges_already_present: int = 0
    batches: int = 0  # merge transactions of edges committed
    largest_batch: int = 0  # edges in the largest of them
    longest_batch: float = 0.0  # seconds the longest of them held its locks
    refused_while_merging: int = 0  # bad rows found under the merge's locks (see merge)
    swapped: bool = False  # the edge tables were built anew and swapped in (importer.swap)
    # Whether the load was worked out in memory (server.importer.inmemory): "taken", or why not.
    in_memory: str = "not tried (accounts and edges into an empty database only)"
    retries: int = 0  # merge transactions run again after a deadlock (none expected)
    bad_rows: list[BadRow] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds spent in each step
    _mark: float = field(default_factory=time.perf_counter, repr=False)

    def lap(self, phase: str) -> None:
        """Charge the time since the last lap to `phase`."""
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._mark
        self._mark = now

    @property
    def bad_row_count(self) -> int:
        return len(self.bad_rows)

    def add_bad(self, bad: BadRow) -> None:
        self.bad_rows.append(bad)

    @property
    def edges_per_second(self) -> float:
        return self.edges_read / self.seconds if self.seconds > 0 else 0.0


def progress_bar(options: ImportOptions, desc: str, total: int | None, unit: str) -> tqdm[Never]:
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        disable=not options.progress,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=True,
    )
