"""`follow-server import`: move an existing follow graph in, in bulk.

Accounts (CSV `user_id[,nick[,face_url]]`) and follow edges (CSV
`follower_id,target_id[,followed_at]`, the time as Unix seconds with an optional fraction or
as ISO-8601, naive meaning UTC) are read from files or stdin and streamed through COPY into
staging tables. Plain rows (one line each, no quoting, ids and times of the usual
shape) are checked a chunk at a time by one regular expression and handed to COPY as they
are; from the first chunk that does not fit, rows are checked one by one in Python (ids by
`rules.user_id_problem`, times). Self-follows, unknown accounts, duplicate edges and the cap
are found in SQL. Then a handful of set-based statements write both copies of each edge,
mutual state (`mutual_since` is the later of the two follow times, found by one hash join of
the new edges with themselves keyed by target) and the counters, each built once rather than
edge by edge.

The same statements run on one PostgreSQL and on Citus (tables distributed on user_id):
every join pairs rows of one owner. On Citus the staging tables are distributed and
co-located with the live ones, and the rows that must move to another owner (each new edge's
followers copy, the targets to look up) are moved once by a re-partitioning INSERT ...
SELECT; on one PostgreSQL those re-keyed relations are views (server.importer.staging).

The whole import is one transaction, so an interrupted import leaves nothing behind, and it
is safely re-runnable: edges already present are skipped (their first follow time is kept),
accounts already present get their nick / face URL updated where the file gives one, and the
counters of every user an import touches are recomputed from the lists (their counter rows
hold the whole count afterwards: their `follow_count_deltas` rows are deleted), so they are
exact afterwards even if they were not before. While it runs it holds `follow_counts` in EXCLUSIVE
mode: the live service keeps answering reads, and its writes wait for the import to commit
(every write path locks a counter row first, see server.store), which keeps the lock
discipline's invariants.

Bad rows (malformed id, self-follow, unknown account, a duplicate edge in the file, a bad
time, a follower over the following cap) are reported with their line numbers. By default
any bad row aborts the import, changing nothing; `--skip-bad-rows` imports the rest.

The modules, each depending only on those below it: cli (the command line) -> transaction
(import_graph, the one transaction) -> merge (staging tables into the live ones) -> staging
(COPY into staging tables, the checks SQL makes there) -> csvread (CSV into COPY records)
-> report (counts, bad rows, progress bars) -> options.
"""

from __future__ import annotations

from server.importer.cli import MAX_REPORTED_ROWS, build_parser, main
from server.importer.csvread import account_records, edge_records, parse_time_us
from server.importer.options import ImportOptions
from server.importer.report import BadRow, ImportAbortedError, ImportIncompleteError, ImportReport
from server.importer.transaction import ImportBusyError, import_graph

__all__ = [
    "MAX_REPORTED_ROWS",
    "BadRow",
    "ImportAbortedError",
    "ImportBusyError",
    "ImportIncompleteError",
    "ImportOptions",
    "ImportReport",
    "account_records",
    "build_parser",
    "edge_records",
    "import_graph",
    "main",
    "parse_time_us",
]
