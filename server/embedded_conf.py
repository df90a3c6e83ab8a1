"""The embedded PostgreSQL's settings beyond its defaults, sized to the machine.

PostgreSQL's defaults are sized for a small machine: 128 MB of buffer cache and a checkpoint
at every 1 GB of WAL or 5 minutes. With a graph bigger than the cache, each write call's
pages (four B-trees and two heaps touched at random places) are read into a cache that is
too small for them and evicted dirty soon after, and every first change of a page after a
checkpoint writes the whole page to the WAL: bench-scale measured Follow(20) at 3.2 ms of
statement time on a 1M-edge graph and 7.2 ms on a 10M-edge one (WAL per call 280 -> 445 KB,
mostly full-page images). A quarter of the memory as cache and checkpoints further apart
keep that cost flat as the graph grows, the usual advice for a dedicated server.

The settings are written to follow-server.conf in the data folder at every start of the
embedded server (so a newer service's settings reach an old folder) and included from
postgresql.conf. ALTER SYSTEM (postgresql.auto.conf, read after it) overrides any of them.
shared_buffers takes effect when the server starts; the others also on a reload.
"""

from __future__ import annotations

import os
from pathlib import Path

CONF_FILE = "follow-server.conf"
_INCLUDE = f"include_if_exists = '{CONF_FILE}'"

MiB = 1024 * 1024
GiB = 1024 * MiB
MIN_SHARED_BUFFERS = 128 * MiB  # PostgreSQL's own default
MAX_SHARED_BUFFERS = 8 * GiB  # beyond this the OS page cache does as well
_CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)


def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its container's limit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in _CGROUP_LIMITS:
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


def embedded_settings(memory: int) -> dict[str, str]:
    """postgresql.conf settings for an embedded server on a machine with `memory` bytes."""
    shared = min(max(memory // 4, MIN_SHARED_BUFFERS), MAX_SHARED_BUFFERS)
    return {
        "shared_buffers": f"{shared // MiB}MB",
        # The planner's idea of the cache (shared buffers + the OS page cache).
        "effective_cache_size": f"{max(memory // 2, shared) // MiB}MB",
        # Checkpoints further apart: fewer full-page images per write. A crash replays at
        # most this much WAL (seconds to a minute), and this much disk holds it.
        "max_wal_size": "4GB",
        "checkpoint_timeout": "15min",
        "checkpoint_completion_target": "0.9",
        # Two users acting on each other at once wait for each other's locks in one order
        # (server.store), so a deadlock is a bug to surface quickly, not to wait a second for.
        "deadlock_timeout": "50ms",
    }


def render(settings: dict[str, str]) -> str:
    lines = [
        "# Written by follow-server at every start of its embedded PostgreSQL",
        "# (server/embedded_conf.py); ALTER SYSTEM overrides these.",
    ]
    lines += [f"{name} = '{value}'" for name, value in settings.items()]
    return "\n".join(lines) + "\n"


def write_embedded_conf(data_dir: Path, settings: dict[str, str]) -> bool:
    """Write follow-server.conf into an initialised data folder and include it from
    postgresql.conf (once). Files keep the data folder's owner (the embedded server runs
    as another system user when started by root). True when the file changed."""
    target = data_dir / CONF_FILE
    text = render(settings)
    owner = data_dir.stat()
    changed = not target.exists() or target.read_text(encoding="utf-8") != text
    if changed:
        partial = target.with_suffix(".tmp")
        partial.write_text(text, encoding="utf-8")
        _give(partial, owner)
        partial.replace(target)
    main = data_dir / "postgresql.conf"
    existing = main.read_text(encoding="utf-8")
    if _INCLUDE not in existing.splitlines():
        with main.open("a", encoding="utf-8") as conf:
            conf.write(("" if existing.endswith("\n") else "\n") + _INCLUDE + "\n")
    return changed


def _give(path: Path, owner: os.stat_result) -> None:
    path.chmod(0o600)
    if os.geteuid() == 0 and (owner.st_uid, owner.st_gid) != (0, 0):
        os.chown(path, owner.st_uid, owner.st_gid)
