"""Into edge tables that were empty: build new ones and put them in place in one short step.

Inserting millions of rows one by one into a table's B-trees costs several times what
building the same B-trees does (each row is a descent and a WAL record per index, and with a
small buffer pool most pages are written out more than once; measured on 1,000,000 edges: 34 s
against 3.8 s for the rows plus 3.2 s for the three indexes). So when the live edge tables
hold (almost) nothing and server.importer.bulk has many edges to write, they are written into
new tables of the same shape (`import_swap_following`, `import_swap_followers`), whose
indexes are then built in one pass each, all inside the bulk transaction and without
touching the live tables. Only the last step takes the live tables' ACCESS EXCLUSIVE lock:
copy in the rows the service wrote meanwhile (a handful: the tables were empty when the
transaction began, and at most SWAP_MAX_LIVE rows are copied, else the rows go into the live
tables the slow way), drop the live table, and give the new one its name, its indexes' names
and its primary key. The lock is asked for with a short lock_timeout, again after a pause
when a call holds the table, so calls never queue for long behind the request
(SWAP_LOCK_TIMEOUT); it is held for milliseconds, until the bulk transaction commits.

What a swap changes beyond the rows: a transaction whose snapshot was taken before the
commit (REPEATABLE READ) and that reads the table afterwards sees it empty, as after a
TRUNCATE; the service's calls run in READ COMMITTED and see the new rows. Prepared
statements of the service's connections are planned again (PostgreSQL revalidates them when
a table they read is replaced; the columns are the same, so nothing they answer changes).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    from server.importer.pair import Conn

SWAP_MIN_EDGES = 50_000  # fewer bulk edges go into the live tables directly
SWAP_MAX_LIVE = 10_000  # live rows the swap copies under its lock at most
SWAP_LOCK_TIMEOUT = "100ms"  # how long one try for the exclusive lock waits
SWAP_LOCK_PAUSE = 0.2  # seconds between tries, for the calls queued behind one to pass
SWAP_LOCK_TRIES = 50


@dataclass(frozen=True, slots=True)
class EdgeTable:
    """A live edge table and the query that writes import_bulk's rows into a table of its
    shape (in import_bulk's order, the following table's key order)."""

    name: str
    fill: str


EDGE_TABLES = (
    EdgeTable(
        "following",
        "INSERT INTO {table} (user_id, target_id, followed_at, mutual_since)"
        " SELECT follower, target, at, mutual_since FROM import_bulk",
    ),
    EdgeTable(
        "followers",
        "INSERT INTO {table} (user_id, follower_id, followed_at)"
        " SELECT target, follower, at FROM import_bulk",
    ),
)

_INDEXES = """
SELECT c.relname::text AS name, pg_get_indexdef(i.indexrelid) AS def, i.indisprimary AS pk,
       con.conname::text AS constraint_name
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
WHERE i.indrelid = $1::regclass
ORDER BY c.relname
"""
_DEF = re.compile(r"^(CREATE (?:UNIQUE )?INDEX) (\S+) ON (\S+) (.*)$")
EDGE_NAMES = tuple(t.name for t in EDGE_TABLES)
_HOLDS_ROWS = "SELECT EXISTS (SELECT 1 FROM following) OR EXISTS (SELECT 1 FROM followers)"
# A table replaced must be one the importer's role owns and has granted nothing on, with no
# trigger, row security, publication or view over it: the new one gets its owner and none of
# those (and a view would make DROP TABLE fail).
_OWNED_PLAIN = """
WITH t AS (SELECT unnest($1::text[]::regclass[]) AS oid)
SELECT bool_and(pg_get_userbyid(c.relowner) = current_user AND c.relacl IS NULL
                AND NOT c.relrowsecurity)
   AND NOT EXISTS (SELECT 1 FROM pg_trigger g JOIN t ON g.tgrelid = t.oid)
   AND NOT EXISTS (SELECT 1 FROM pg_publication_rel p JOIN t ON p.prrelid = t.oid)
   AND NOT EXISTS (SELECT 1 FROM pg_publication WHERE puballtables)
   AND NOT EXISTS (SELECT 1 FROM pg_depend d JOIN t ON d.refobjid = t.oid
                   WHERE d.classid = 'pg_rewrite'::regclass)
FROM pg_class c JOIN t ON c.oid = t.oid
"""


@dataclass(frozen=True, slots=True)
class Index:
    """One index of a new edge table."""

    name: str
    built: str  # its name on the new table until the swap
    constraint: str | None  # the primary key's constraint name


async def can_swap(conn: Conn) -> bool:
    """Whether the live edge tables may be replaced: empty (in this transaction's view),
    owned by the importer's role, with nothing attached that the new tables would lack."""
    return await replaceable(conn, EDGE_NAMES) and not await conn.fetchval(_HOLDS_ROWS)


async def replaceable(conn: Conn, tables: Sequence[str]) -> bool:
    """Whether these live tables are owned by the importer's role, with nothing attached
    that new tables of their shape would lack (see _OWNED_PLAIN)."""
    return bool(await conn.fetchval(_OWNED_PLAIN, list(tables)))


async def build(conn: Conn) -> dict[str, list[Index]]:
    """Make the new edge tables from import_bulk, with every index the live ones have
    (inside the caller's transaction; nothing live is touched)."""
    built: dict[str, list[Index]] = {}
    for table in EDGE_TABLES:
        await conn.execute(f"DROP TABLE IF EXISTS {new_name(table)}")
        await conn.execute(create_new(table))
        await conn.execute(table.fill.format(table=new_name(table)))
        indexes = await index_plan(conn, table)
        for statement, _ in indexes:
            await conn.execute(statement)
        built[table.name] = [index for _, index in indexes]
    return built


def new_name(table: EdgeTable | str) -> str:
    return f"import_swap_{_name(table)}"


def _name(table: EdgeTable | str) -> str:
    return table if isinstance(table, str) else table.name


def create_new(table: EdgeTable | str) -> str:
    """The statement making the new table, of the live one's shape, without indexes."""
    name = _name(table)
    return f"CREATE TABLE {new_name(name)} (LIKE {name} INCLUDING ALL EXCLUDING INDEXES)"


async def index_plan(conn: Conn, table: EdgeTable | str) -> list[tuple[str, Index]]:
    """The statements building the live table's indexes on the new one, each with the
    index it makes (its name until the swap, and the live one's)."""
    plan: list[tuple[str, Index]] = []
    for n, row in enumerate(await conn.fetch(_INDEXES, _name(table))):
        match = _DEF.match(row["def"])
        if match is None:
            raise RuntimeError(f"unexpected index definition: {row['def']}")
        temp = f"{new_name(table)}_{n}"
        constraint = row["constraint_name"] if row["pk"] else None
        plan.append(
            (
                f"{match[1]} {temp} ON {new_name(table)} {match[4]}",
                Index(row["name"], temp, constraint),
            )
        )
    return plan


async def lock_live(conn: Conn, tables: Sequence[str] = EDGE_NAMES) -> bool:
    """Take the live tables' (by default the edge tables') ACCESS EXCLUSIVE lock, in tries
    of SWAP_LOCK_TIMEOUT with pauses between them (a call holding a table makes a try fail,
    and the calls that queued behind the try then pass); False after SWAP_LOCK_TRIES tries."""
    for _ in range(SWAP_LOCK_TRIES):
        try:
            async with conn.transaction():  # a savepoint: a failed try keeps the rest
                await conn.execute(f"SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT}'")
                await conn.execute(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")
                await conn.execute("SET LOCAL lock_timeout = 0")
                return True
        except asyncpg.LockNotAvailableError:
            await asyncio.sleep(SWAP_LOCK_PAUSE)
    return False


_LIVE_ROWS = """
SELECT (SELECT count(*) FROM (SELECT 1 FROM following LIMIT $1) a)
     + (SELECT count(*) FROM (SELECT 1 FROM followers LIMIT $1) b)
"""


async def few_live_rows(conn: Conn) -> bool:
    """Whether the live edge tables hold at most SWAP_MAX_LIVE rows now (the service's
    writes since the transaction began), so copying them under the lock is short."""
    return int(await conn.fetchval(_LIVE_ROWS, SWAP_MAX_LIVE + 1)) <= SWAP_MAX_LIVE


async def swap(conn: Conn, built: dict[str, list[Index]]) -> None:
    """Under the live tables' lock: copy in their rows, drop them and put the new ones in
    their place, under their names, with their indexes' and primary keys' names (`built`:
    the new tables' indexes, by live table)."""
    for table, indexes in built.items():
        new = new_name(table)
        await conn.execute(f"INSERT INTO {new} SELECT * FROM {table}")  # noqa: S608
        await conn.execute(f"DROP TABLE {table}")
        await conn.execute(f"ALTER TABLE {new} RENAME TO {table}")
        for index in indexes:
            if index.constraint is not None:
                await conn.execute(
                    f"ALTER TABLE {table} ADD CONSTRAINT {index.constraint}"
                    f" PRIMARY KEY USING INDEX {index.built}"
                )
                if index.constraint != index.name:
                    await conn.execute(f"ALTER INDEX {index.constraint} RENAME TO {index.name}")
            else:
                await conn.execute(f"ALTER INDEX {index.built} RENAME TO {index.name}")


async def drop_built(conn: Conn, tables: Sequence[str] = EDGE_NAMES) -> None:
    """Drop the new tables (when the swap did not happen)."""
    await conn.execute(f"DROP TABLE IF EXISTS {', '.join(map(new_name, tables))}")
