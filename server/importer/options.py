"""What one import is asked to do: the options every step reads, kept below all of them."""

from __future__ import annotations

from dataclasses import dataclass

from server import rules

# How long one merge batch should hold its users' locks (what a service call on one of them
# may wait): the merge sizes its batches to it (server.importer.merge).
DEFAULT_BATCH_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class ImportOptions:
    """The command line's choices, as one frozen value that every step of an import reads
    (kept apart from argparse so the importer can be called from code and tests)."""

    skip_bad_rows: bool = False
    max_following: int = rules.DEFAULT_MAX_FOLLOWING
    progress: bool = True
    batch_seconds: float = DEFAULT_BATCH_SECONDS
