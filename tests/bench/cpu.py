"""CPU seconds of a server's process tree, for benches that report work done per run."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import psutil


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a postmaster and all its backends, living and ended (an ended
    child's time is in its parent's children_* times once reaped)."""
    try:
        root = psutil.Process(pid)
        total = sum(root.cpu_times()[:4])
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += sum(child.cpu_times()[:2])
        return total
    except psutil.Error:
        return 0.0


def postmaster_pid(pgdata: Path) -> int:
    """The pid of the PostgreSQL server running on `pgdata` (its postmaster.pid's first line)."""
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def own_cpu_seconds() -> float:
    """CPU seconds of this process (user and system)."""
    times = os.times()
    return times.user + times.system
