"""bench-ops import: what the slowest of the other users' calls met, from the importer's
batch log (`follow-server import --batch-log`, server.importer.batchlog) and the import
file. A call met a batch when their times overlap; it met the batch's locks when it needs
a lock the batch holds in a conflicting mode (server.store's lock discipline, which the
batches follow): the call's acting user is one of the batch's followers (its gate and
counter row, exclusive) or one of the users they follow (counter row FOR SHARE, which the
acting user's FOR UPDATE waits for); a Follow or Unfollow's target is one of the batch's
followers (FOR UPDATE, which the target's FOR SHARE waits for). Reads take no lock.
"""

from __future__ import annotations

import bisect
import csv
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SLOWEST = 12


@dataclass(frozen=True, slots=True)
class BatchTry:
    """One line of the batch log, with the users its locks cover."""

    began: float
    seconds: float
    edges: int
    outcome: str
    pause: float
    followers: frozenset[int]
    targets: frozenset[int]

    @property
    def ended(self) -> float:
        return self.began + self.seconds


def read_edges(path: Path) -> tuple[list[int], list[int]]:
    """The import file's (follower, target) numbers, sorted by follower."""
    pairs: list[tuple[int, int]] = []
    with path.open(newline="") as f:
        rows = csv.reader(f)
        next(rows)
        pairs.extend((int(r[0][1:]), int(r[1][1:])) for r in rows)
    pairs.sort()
    return [p[0] for p in pairs], [p[1] for p in pairs]


def read_batches(log: Path, edges: tuple[list[int], list[int]]) -> list[BatchTry]:
    """The batch log's tries, each with its followers and targets from the import file."""
    followers, targets = edges
    tries: list[BatchTry] = []
    with log.open(newline="") as f:
        for row in csv.DictReader(f):
            lo = bisect.bisect_left(followers, int(row["lo"][1:]))
            hi = bisect.bisect_right(followers, int(row["hi"][1:]))
            tries.append(
                BatchTry(
                    float(row["began"]),
                    float(row["seconds"]),
                    int(row["edges"]),
                    row["outcome"],
                    float(row["pause"]),
                    frozenset(followers[lo:hi]),
                    frozenset(targets[lo:hi]),
                )
            )
    return tries


def meets_locks(kind_writes: bool, actor: int, target: int, batch: BatchTry) -> bool:
    """Whether a call waits for a lock the batch holds (see the module's doc)."""
    if not kind_writes:
        return False
    return actor in batch.followers or actor in batch.targets or target in batch.followers


def step_at(
    phases: Sequence[tuple[str, float]], first_batch: float | None, ended: float, at: float
) -> str:
    """The importer's step running `at` seconds after the import's process started, from its
    phases (their seconds in order, counted from when its report began, after the process
    started and connected): placed so that the batches' step ("write edges") begins at the
    first batch when there was one, else so that the last step ends when the process did."""
    if not phases:
        return ""
    names = [n for n, _ in phases]
    ends = list(itertools.accumulate(s for _, s in phases))
    if first_batch is not None and "write edges" in names[1:]:
        offset = first_batch - ends[names.index("write edges") - 1]
    else:
        offset = ended - ends[-1]
    if at < offset:
        return "starting"
    return next((n for n, end in zip(names, ends, strict=True) if at < end + offset), "exiting")


def slow_calls(
    calls: list[tuple[float, float, int, int, int]],
    names: tuple[str, ...],
    writes: frozenset[int],
    tries: list[BatchTry],
    began: float,
    ended: float,
    phases: Sequence[tuple[str, float]] = (),
) -> dict[str, Any]:
    """The slowest calls (start, latency, kind, actor, target), each with what it met: the
    batch tries overlapping it, the longest of them, whether it met their locks; and the
    worst latency among calls that met a batch's locks, met a batch without its locks, or
    met no batch (the import's other steps, or its pauses), and the importer's step it met
    (step_at, from the importer's `phases`)."""
    starts = [t.began for t in tries]
    first = tries[0].began - began if tries else None
    worst = {"met_locks": 0.0, "met_batch": 0.0, "no_batch": 0.0}
    slowest: list[dict[str, Any]] = []
    for start, latency, kind, actor, target in sorted(calls, key=lambda c: -c[1]):
        end = start + latency
        # tries overlapping [start, end): none lasts more than a few seconds
        i = max(0, bisect.bisect_left(starts, start - 10.0))
        met = [t for t in tries[i : bisect.bisect_left(starts, end)] if t.ended > start]
        locks = any(meets_locks(kind in writes, actor, target, t) for t in met)
        key = "met_locks" if locks else "met_batch" if met else "no_batch"
        worst[key] = max(worst[key], latency)
        if len(slowest) < SLOWEST:
            slowest.append(
                {
                    "kind": names[kind],
                    "ms": round(latency * 1000, 1),
                    "at_s": round(start - began, 2),
                    "batches": len(met),
                    "longest_batch_ms": round(max((t.seconds for t in met), default=0) * 1000),
                    "met_locks": locks,
                    "importer_step": step_at(phases, first, ended - began, start - began),
                }
            )
    ok = [t for t in tries if t.outcome == "ok"]
    return {
        "worst_ms": {k: round(v * 1000, 1) for k, v in worst.items()},
        "slowest": slowest,
        "batches": len(ok),
        "retries": len(tries) - len(ok),
        "batch_ms_p50_max": [
            round(sorted(t.seconds for t in ok)[len(ok) // 2] * 1000) if ok else None,
            round(max((t.seconds for t in ok), default=0) * 1000),
        ],
        "first_batch_at_s": round(tries[0].began - began, 2) if tries else None,
        "last_batch_end_s": round(max(t.ended for t in tries) - began, 2) if tries else None,
    }
