"""tests.bench.cpu: the CPU seconds the benches report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.bench.cpu import own_cpu_seconds, postmaster_pid, tree_cpu_seconds


def test_tree_cpu_counts_a_reaped_child() -> None:
    """A child that burned CPU and ended is counted in its parent's tree (children_* times),
    so a server's backends that exit during a run are not lost."""
    before = tree_cpu_seconds(os.getpid())
    subprocess.run([sys.executable, "-c", "sum(i * i for i in range(3_000_000))"], check=True)
    assert tree_cpu_seconds(os.getpid()) - before >= 0.05


def test_tree_cpu_of_a_process_that_is_gone_is_zero() -> None:
    """A pid with no process (a server that stopped) reads as 0, not an error."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert tree_cpu_seconds(child.pid) == 0.0


def test_own_cpu_grows_with_work() -> None:
    """This process's CPU seconds grow as it computes."""
    before = own_cpu_seconds()
    sum(i * i for i in range(3_000_000))
    assert own_cpu_seconds() > before


def test_postmaster_pid_is_the_first_line(tmp_path: Path) -> None:
    """The pid is postmaster.pid's first line (the rest is the data folder, port, ...)."""
    (tmp_path / "postmaster.pid").write_text("4242\n/data\n1700000000\n5432\n")
    assert postmaster_pid(tmp_path) == 4242
