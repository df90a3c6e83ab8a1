"""`follow-server import`: move an existing follow graph in, in bulk.

Accounts (CSV `user_id[,nick[,face_url]]`) and follow edges (CSV
`follower_id,target_id[,followed_at]`, the time as Unix seconds with an optional fraction or
as ISO-8601, naive meaning UTC) are read from files or stdin and streamed through COPY into
staging tables. Plain rows (one line each, no quoting, ids and times of the usual shape)
are checked a chunk at a time by one regular expression and handed to COPY as they are;
from the first chunk that does not fit, rows are checked one by one in Python (ids by
`rules.user_id_problem`, times). Self-follows, unknown accounts, accounts being deleted,
duplicate edges and the cap are found in SQL over the staging tables, which locks nothing
the service's calls wait on. Any bad row then aborts the import, having changed nothing,
unless `--skip-bad-rows`.

The writing then runs beside the live service. First (one PostgreSQL) the accounts the
import creates and every new edge between two of them, in one set-based transaction without
per-user locks, since no service call can see those accounts before it commits
(server.importer.bulk); into edge tables that were empty, those edges go into new tables
whose indexes are built in one pass, swapped in under a lock held for milliseconds
(server.importer.swap). That transaction holds back the delivery of change events until it
commits. Then the rest (profiles of accounts already present, edges touching them; on Citus
everything) in bounded batches, each its own short transaction sized to a time budget
(ImportOptions.batch_seconds, how long a batch may hold its users' locks) that locks its
users as a Follow call does, waiting at most 50 ms for any lock before it lets all of them
go and tries again smaller (server.importer.merge). Either way: both copies of each edge,
mutual state on both sides (`mutual_since` is the later of the two follow times) and exact
counts (counter rows; targets' delta rows in the batches). An import is therefore resumable
rather than one transaction: an interrupted one leaves the bulk step whole or not at all
and whole batches, a sound graph, and running it again completes it (edges already present
are skipped, their first follow time kept; accounts already present get their nick / face
URL updated where the file gives one). Rows the merge refuses because the service changed
their users since the checks (the cap reached meanwhile, an account deleted meanwhile) are
reported like bad rows (ImportIncompleteError unless `--skip-bad-rows`). Accounts whose
deletion is still being cleaned up are bad rows, not waited for. The importer writes no
change events (follow_events): it is an operator's bulk tool.

The staging and merge statements run on one PostgreSQL and on Citus (tables distributed on
user_id): every join pairs rows of one owner; the rows that must move to another owner (each
new edge's followers copy, the targets to look up) are moved by a re-partitioning INSERT
... SELECT on Citus and are views on one PostgreSQL (server.importer.staging).

The modules, each depending only on those below it: cli (the command line) -> transaction
(import_graph: staging, then the writing) -> bulk (created accounts and their edges in one
transaction) -> prebuild (the new edge tables built beforehand, two statements at a time)
-> swap (new edge tables built and put in place) and exclusive (`--exclusive`:
the edges merged in large batches under table locks, for a maintenance window) -> merge
(staging tables into the live ones, batch by batch, resting between them: `--pause-ratio`)
-> batchlog (`--batch-log`: one CSV line per batch try) -> staging (COPY into staging
tables, the checks SQL makes there, the chunks) -> pair (the importer's two connections and
statements run on both at once) -> csvread (CSV into COPY records) -> report
(counts, bad rows, progress bars) -> options.
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
