"""An initial load worked out in the importer's memory: both files into an empty database.

The staged path (server.importer.staging, prebuild, bulk) does every step in SQL: it COPYs
the rows as text into staging tables, then sorts them to find duplicates, joins them with
themselves for mutual state, sorts them again for the followers table, groups them for the
counts, and writes the tables from there; on 5,000,000 edges that took ~100 s of CPU,
~60 s on 2 cores. When the database holds no account, edge or deletion yet, and the files
are plain (every row in the shape the staged path's fast reader takes: csvread) and fit in
memory (MEMORY_SHARE), the same steps take seconds on integer arrays here: each account id
becomes its rank among the ids (their order is the "C" collation's, byte order), an edge a
pair of ranks in one int64, and the sorts, the duplicate and cap checks, mutual state and
the counts are numpy over those. PostgreSQL then only takes the finished rows by binary
COPY (server.importer.copybin), already in each table's key order, into new accounts,
following and followers tables whose indexes it builds, two statements at a time on the
importer's two connections (server.importer.pair); one transaction writes the counter
rows and puts the new tables in the live ones' place (server.importer.swap), as the staged
path's bulk step does: all or nothing.

Any row the checks would refuse (an unknown account, a self-follow, a repeated edge, a
follower over the cap), a file the fast shape does not fit, or a database that is not empty
any more when the transaction looks, and the import goes the staged way instead, from the
same text (LoadFallbackError), which finds and reports every bad row by its line. So this path
changes how fast an import is, never what it does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

import asyncpg
import numpy as np
import polars as pl

import server.importer.swap as swap
from server.embedded_conf import machine_memory
from server.importer.copybin import (
    BigintColumn,
    Column,
    TextColumn,
    TimestampColumn,
    binary_copy,
    laid_out,
)
from server.importer.csvread import FAST_ID, FAST_TEXT, FAST_TIME, is_header
from server.importer.pair import Job, Step, run_jobs
from server.importer.report import ImportReport
from server.importer.swap import Index, new_name

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from server.importer.options import ImportOptions
    from server.importer.pair import Conn

log = logging.getLogger(__name__)

# The files may take this share of the machine's memory at most: the text, frames and arrays
# made from them took ~5 times the files' size at their peak (1.33 GB for the 260 MB of
# 5,000,000 edges and 1,000,000 accounts).
MEMORY_SHARE = 16
# Fewer edges take the staged path (seconds either way; what its tests exercise).
MIN_EDGES = 50_000
_THREADS = 3  # the edges' ids and times are read at once

# The fast reader's fields (csvread), as patterns over one whole field (polars' regular
# expressions read them the same way).
_ID, _TEXT, _TIME = (f"^{p}$" for p in (FAST_ID, FAST_TEXT, FAST_TIME))
_ACCOUNT_COLUMNS = ("user_id", "nick", "face_url")
_EDGE_COLUMNS = ("follower", "target", "at")

# Nothing that the load would have to merge with: no account, edge or pending deletion.
_EMPTY = """
SELECT NOT EXISTS (SELECT 1 FROM accounts) AND NOT EXISTS (SELECT 1 FROM following)
   AND NOT EXISTS (SELECT 1 FROM followers) AND NOT EXISTS (SELECT 1 FROM account_tombstones)
   AND NOT EXISTS (SELECT 1 FROM follow_counts)
"""
# The same under the live tables' lock, once the load's counter rows are written (a service
# call that writes a counter row writes its account's row too).
_STILL_EMPTY = """
SELECT NOT EXISTS (SELECT 1 FROM accounts) AND NOT EXISTS (SELECT 1 FROM following)
   AND NOT EXISTS (SELECT 1 FROM followers) AND NOT EXISTS (SELECT 1 FROM account_tombstones)
"""
# The live tables the load replaces (empty, as _EMPTY finds them). Not follow_counts: a view
# (follow_totals) reads it, so it cannot be dropped; its rows are COPYed into it in the
# swap's transaction, before the lock (1,000,000 rows: ~2 s).
_LIVE = ("following", "followers", "accounts")
_COUNTS = "follow_counts"
# Each index build on one core: the two connections already keep both busy (parallel workers
# on top measured slower: 95,014 against 102,609 edges/s). For its own transaction only, so
# that a staged import after a fallback keeps PostgreSQL's setting.
_ONE_WORKER = "BEGIN; SET LOCAL max_parallel_maintenance_workers = 0"


def _since(began: float) -> float:
    return time.perf_counter() - began


class LoadFallbackError(Exception):
    """The in-memory load does not apply (see the module's doc): the staged path takes it."""


@dataclass(frozen=True, slots=True)
class Texts:
    """Both files, read whole."""

    accounts: str
    edges: str


def stream_size(stream: TextIO, given: int | None) -> int | None:
    """The stream's size in bytes: `given`, else a regular file's; None when unknown."""
    if given is not None:
        return given
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, AttributeError, ValueError):
        return None
    return stat.st_size if stat.st_size > 0 else None


def read_texts(
    accounts: TextIO, edges: TextIO, accounts_size: int | None, edges_size: int | None
) -> Texts | None:
    """Both files' text, when their sizes are known and fit MEMORY_SHARE of the machine's
    memory; None (nothing read) otherwise."""
    sizes = (stream_size(accounts, accounts_size), stream_size(edges, edges_size))
    if sizes[0] is None or sizes[1] is None:
        return None
    if sizes[0] + sizes[1] > machine_memory() // MEMORY_SHARE:
        return None
    return Texts(accounts.read(), edges.read())


@dataclass(frozen=True, slots=True)
class Graph:
    """The graph worked out from the files: the accounts in id order (their rank is their
    code), the edges in the following table's key order with their mutual state, the order
    of the followers table, and each account's counts."""

    ids: pl.Series
    nick: pl.Series
    face_url: pl.Series
    follower: NDArray[np.uint32]
    target: NDArray[np.uint32]
    at: NDArray[np.int64]
    mutual_since: NDArray[np.int64]
    mutual: NDArray[np.bool_]
    by_target: NDArray[np.intp]
    following: NDArray[np.int64]
    followers: NDArray[np.int64]
    mutuals: NDArray[np.int64]
    accounts_read: int
    edges_read: int


def _body(text: str, header: tuple[str, ...], columns: tuple[str, ...]) -> tuple[bytes, int]:
    """The rows of a file without its header line, as bytes, and its number of fields; a
    LoadFallbackError when the text is not plain lines of 1 to len(columns) fields."""
    first, newline, after = text.partition("\n")
    body = after if newline and '"' not in first and is_header(first.split(","), header) else text
    if not body:
        return b"", len(columns)
    if not body.endswith("\n"):
        body += "\n"
    # Lines the fast reader would not take: blank ones, carriage returns, quotes.
    if body.startswith("\n") or "\n\n" in body or "\r" in body or '"' in body:
        raise LoadFallbackError("not plain lines")
    fields = body.partition("\n")[0].count(",") + 1
    if fields > len(columns) or not body.isascii():
        raise LoadFallbackError("too many fields, or not ASCII")
    return body.encode("ascii"), fields


def _frame(body: bytes, fields: int, columns: tuple[str, ...]) -> pl.DataFrame:
    """The rows as strings, in `columns` (those past the first line's `fields` NULL); a row
    of fewer fields has NULLs, a row of more is a LoadFallbackError."""
    try:
        frame = pl.read_csv(
            body,
            has_header=False,
            infer_schema=False,
            quote_char=None,
            schema={c: pl.String for c in columns[:fields]},
        )
    except pl.exceptions.PolarsError as exc:
        raise LoadFallbackError(f"not the fast shape: {exc}") from exc
    return frame.with_columns(pl.lit(None, pl.String).alias(c) for c in columns[fields:])


def _require(ok: pl.Series | bool | None, why: str) -> None:
    if isinstance(ok, pl.Series):
        ok = bool(ok.all()) and ok.null_count() == 0
    if not ok:
        raise LoadFallbackError(why)


def work_out(texts: Texts, options: ImportOptions, now_us: int) -> Graph:
    """The graph of the two files (see Graph); a LoadFallbackError for anything the staged
    path would have to decide or report. Independent steps run in threads (polars and numpy
    release the interpreter), on the cores PostgreSQL is not using yet."""
    account_body, account_fields = _body(texts.accounts, ("user_id",), _ACCOUNT_COLUMNS)
    edge_body, edge_fields = _body(texts.edges, ("follower_id",), _EDGE_COLUMNS)
    if edge_fields < 2 or not account_body or not edge_body:
        raise LoadFallbackError("no accounts, no edges, or an edge of one field")
    with ThreadPoolExecutor(_THREADS) as pool:
        reading = pool.submit(_frame, edge_body, edge_fields, _EDGE_COLUMNS[:edge_fields])
        read = _frame(account_body, account_fields, _ACCOUNT_COLUMNS)
        accounts_read, accounts = read.height, _accounts(read)
        edges = reading.result()
        del read, account_body, edge_body  # what is no longer needed goes at once (memory)
        ids = accounts["user_id"]
        codes = [pool.submit(_codes, edges[c], ids) for c in ("follower", "target")]
        at = _micros(edges, now_us)
        follower, target = (c.result() for c in codes)
    del edges, codes
    if bool(np.any(follower == target)):
        raise LoadFallbackError("a self-follow")
    following = np.bincount(follower, minlength=ids.len()).astype(np.int64)
    if following.size and int(following.max()) > options.max_following:
        raise LoadFallbackError("a follower over the cap")
    key = (follower.astype(np.int64) << 32) | target
    order = np.argsort(key)
    key = key[order]
    if bool(np.any(key[1:] == key[:-1])):
        raise LoadFallbackError("a repeated edge")
    follower, target, at = follower[order], target[order], at[order]
    del order
    # Mutual: the reverse edge is there too. Each edge's reverse key, in the followers
    # table's order (which is wanted anyway), is looked up in the sorted keys: sorted
    # lookups, which stay in the cache (in the edges' order they took 3.6 s, not 0.4).
    reverse = (target.astype(np.int64) << 32) | follower
    by_target = np.argsort(reverse)
    ahead = reverse[by_target]
    found = np.minimum(np.searchsorted(key, ahead), key.size - 1)
    mutual = np.empty(follower.size, dtype=np.bool_)
    mutual[by_target] = key[found] == ahead
    del key
    partner = np.empty(follower.size, dtype=np.intp)
    partner[by_target] = found
    del ahead, found, reverse
    mutual_since = np.where(mutual, np.maximum(at, at[partner]), 0)
    return Graph(
        ids=ids,
        nick=accounts["nick"],
        face_url=accounts["face_url"],
        follower=follower,
        target=target,
        at=at,
        mutual_since=mutual_since,
        mutual=mutual,
        by_target=by_target,
        following=following,
        followers=np.bincount(target, minlength=ids.len()).astype(np.int64),
        mutuals=np.bincount(follower[mutual], minlength=ids.len()).astype(np.int64),
        accounts_read=accounts_read,
        edges_read=int(follower.size),
    )


def _accounts(accounts: pl.DataFrame) -> pl.DataFrame:
    """The accounts file checked against the fast shape, one row per account (the file's
    last one winning, as the staged path's DISTINCT ON), in id order."""
    _require(accounts["user_id"].str.contains(_ID), "an account id outside the fast shape")
    for name in ("nick", "face_url"):
        _require(accounts[name].fill_null("").str.contains(_TEXT), f"a {name} outside it")
    return accounts.unique(subset="user_id", keep="last", maintain_order=True).sort("user_id")


def _codes(ids: pl.Series, accounts: pl.Series) -> NDArray[np.uint32]:
    """Each id's rank among the accounts' ids (sorted); a LoadFallbackError for an id that
    is not an account's or not of the fast shape."""
    _require(ids.str.contains(_ID), f"a {ids.name} id outside the fast shape")
    try:
        return ids.cast(pl.Enum(accounts)).to_physical().to_numpy()
    except pl.exceptions.InvalidOperationError as exc:
        raise LoadFallbackError("an edge names an unknown account") from exc


def _micros(edges: pl.DataFrame, now_us: int) -> NDArray[np.int64]:
    """Each edge's follow time in microseconds since the epoch: its Unix seconds with the
    fraction truncated to microseconds (as the staged path's trunc(at * 1000000)), or
    `now_us` for every edge of a file without times."""
    if "at" not in edges.columns:
        return np.full(edges.height, now_us, dtype=np.int64)
    _require(edges["at"].str.contains(_TIME), "a time outside the fast shape")
    parts = edges["at"].str.split_exact(".", 1)
    seconds = parts.struct.field("field_0").cast(pl.Int64)
    fraction = parts.struct.field("field_1").fill_null("").str.slice(0, 6).str.pad_end(6, "0")
    return (seconds * 1_000_000 + fraction.cast(pl.Int64)).to_numpy().astype(np.int64)


def _strings(series: pl.Series) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """A string column as one buffer of bytes and their bounds (NULL as empty)."""
    filled = series.fill_null("")
    joined = filled.str.join("").item().encode("ascii") if filled.len() else b""
    return laid_out(joined, filled.str.len_bytes().to_numpy().astype(np.int64))


def _nullable(series: pl.Series) -> TextColumn:
    """A text column of one string per row, NULL where the series has none."""
    valid = series.is_not_null().to_numpy()
    return TextColumn(*_strings(series), np.arange(series.len()), None if valid.all() else valid)


async def load(
    conn: Conn, second: Conn, texts: Texts, options: ImportOptions, report: ImportReport
) -> None:
    """Import both files into the empty database (see the module's doc); LoadFallbackError,
    having changed nothing, when this path does not apply."""
    if not await conn.fetchval(_EMPTY) or not await swap.replaceable(conn, _LIVE):
        raise LoadFallbackError("the database is not empty")
    if texts.edges.count("\n") < MIN_EDGES:
        raise LoadFallbackError("a small graph")
    began = time.perf_counter()
    graph = await asyncio.to_thread(work_out, texts, options, time.time_ns() // 1000)
    report.lap("work out the graph in memory")
    # What an operator watching a long load sees between the start and the summary.
    log.info(
        "in-memory load: %d accounts and %d edges read and checked (%.1fs); building tables",
        graph.ids.len(),
        graph.edges_read,
        _since(began),
    )
    await swap.drop_built(conn, _LIVE)
    rows = _rows(graph)
    try:
        indexes = await _build(conn, second, rows)
        report.lap("build new tables")
        log.info("in-memory load: tables and indexes built (%.1fs); swapping in", _since(began))
        await _swap_in(conn, indexes, rows[_COUNTS])
        report.lap("swap")
    except BaseException:
        await swap.drop_built(conn, _LIVE)
        raise
    report.swapped = True
    report.in_memory = "taken"
    report.accounts_read += graph.accounts_read
    report.edges_read += graph.edges_read
    report.accounts_written += graph.ids.len()
    report.edges_added += graph.edges_read


# Each table's columns and their values (_rows).
Rows = dict[str, tuple[list[str], list[Column]]]


def _rows(graph: Graph) -> Rows:
    """Each new table's columns and their values, in its key's order."""
    ids = _strings(graph.ids)
    follower, target, fans = graph.follower, graph.target, graph.by_target
    everyone = np.arange(graph.ids.len())
    return {
        "following": (
            ["user_id", "target_id", "followed_at", "mutual_since"],
            [
                TextColumn(*ids, follower),
                TextColumn(*ids, target),
                TimestampColumn(graph.at),
                TimestampColumn(graph.mutual_since, graph.mutual),
            ],
        ),
        "followers": (
            ["user_id", "follower_id", "followed_at"],
            [
                TextColumn(*ids, target[fans]),
                TextColumn(*ids, follower[fans]),
                TimestampColumn(graph.at[fans]),
            ],
        ),
        "accounts": (
            list(_ACCOUNT_COLUMNS),
            [TextColumn(*ids, everyone), _nullable(graph.nick), _nullable(graph.face_url)],
        ),
        "follow_counts": (
            ["user_id", "following", "followers", "mutual"],
            [
                TextColumn(*ids, everyone),
                BigintColumn(graph.following),
                BigintColumn(graph.followers),
                BigintColumn(graph.mutuals),
            ],
        ),
    }


def _fill(table: str, names: list[str], columns: list[Column]) -> Step:
    """A job's step: the new table made and filled by one COPY, in one transaction."""

    async def step(conn: Conn) -> str:
        async with conn.transaction():
            await conn.execute(swap.create_new(table))
            # Made in the COPY's transaction, the table takes its rows frozen: no hint bits
            # or freezing left for the first reads and vacuums to write.
            return await conn.copy_to_table(
                new_name(table),
                source=_chunks(columns),
                columns=names,
                format="binary",
                freeze=True,
            )

    return step


async def _build(conn: Conn, second: Conn, rows: Rows) -> dict[str, list[Index]]:
    """The new tables, each filled by one COPY, then their indexes: on the two connections,
    each taking the next job whose table is filled (the edge tables' first: the longest)."""
    plans = {t: await swap.index_plan(conn, t) for t in _LIVE}
    jobs = [Job(f"fill {t}", (_fill(t, *rows[t]),)) for t in _LIVE]
    jobs += [
        Job(index.built, (_ONE_WORKER, statement, "COMMIT"), after=(f"fill {t}",))
        for t, plan in plans.items()
        for statement, index in plan
    ]
    await run_jobs([conn, second], jobs)
    return {t: [i for _, i in plan] for t, plan in plans.items()}


async def _chunks(columns: list[Column]) -> AsyncIterator[bytes]:
    """binary_copy's chunks, each encoded in a thread (numpy leaves the other connection's
    encoding and the event loop free meanwhile)."""
    encoded = binary_copy(columns)
    while (chunk := await asyncio.to_thread(next, encoded, None)) is not None:
        yield chunk


async def _swap_in(
    conn: Conn, indexes: dict[str, list[Index]], counts: tuple[list[str], list[Column]]
) -> None:
    """One transaction: the counter rows COPYed into follow_counts before any table lock
    (rows nobody else sees until the commit; seconds for a million), then, under the live
    tables' lock and finding them still empty, the new tables in their place
    (milliseconds). A service call that wrote meanwhile makes it a LoadFallbackError."""
    names, columns = counts
    try:
        async with conn.transaction():
            await conn.copy_to_table(
                _COUNTS, source=_chunks(columns), columns=names, format="binary"
            )
            if not await swap.lock_live(conn, _LIVE):
                raise LoadFallbackError("the live tables stayed in use")
            if not await conn.fetchval(_STILL_EMPTY):
                raise LoadFallbackError("the service wrote meanwhile")
            await swap.swap(conn, indexes)
    except asyncpg.UniqueViolationError as exc:  # a counter row of one of the accounts
        raise LoadFallbackError("the service wrote meanwhile") from exc
