"""What one import is asked to do: the options every step reads, kept below all of them."""

from __future__ import annotations

from dataclasses import dataclass

from server import rules

# How long one merge batch should hold its users' locks (what a service call on one of them
# may wait): the merge sizes its batches to it (server.importer.merge).
DEFAULT_BATCH_SECONDS = 0.1
# After each merge batch, the merge rests this many times as long as the batch took, so that
# on a small machine the import (its process and its PostgreSQL backend) leaves CPU to the
# service's calls between batches; into a graph in use, so does each statement before the
# batches (server.importer.pair.RestingConnection); 0: no rest.
DEFAULT_PAUSE_RATIO = 1.0


@dataclass(frozen=True, slots=True)
class ImportOptions:
    """The command line's choices, as one frozen value that every step of an import reads
    (kept apart from argparse so the importer can be called from code and tests)."""

    skip_bad_rows: bool = False
    max_following: int = rules.DEFAULT_MAX_FOLLOWING
    progress: bool = True
    batch_seconds: float = DEFAULT_BATCH_SECONDS
    pause_ratio: float = DEFAULT_PAUSE_RATIO
    # A maintenance window: the edges merge holding the edge tables EXCLUSIVE, no per-user
    # locks (server.importer.exclusive); one PostgreSQL only.
    exclusive: bool = False
    # Where to write one line per edge batch try (server.importer.merge.BatchLog), or None.
    batch_log: str | None = None
