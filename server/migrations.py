"""Versioned schema migrations, applied at start under an advisory lock (safe to run twice,
and safe when several server processes start at once).

Every table is keyed by the user that owns the row, so a distributed PostgreSQL (Citus)
can shard them all on user_id, side by side. Ids use the "C" collation: byte order, the
same everywhere, and cheaper to compare.

On a database with the `citus` extension the service places its tables itself, after the
SQL migrations and on every start (so a single-node database that later gains Citus is
distributed, rows included, at its next start): each per-user table hash-distributed on
user_id in one co-location group (one owner's rows of every table on one shard, so a call
about one owner is a single-shard router query), small shared tables as reference tables,
`schema_migrations` left local to the coordinator. Which is which is declared per migration
in DISTRIBUTION. Without Citus this costs one catalog lookup and changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import asyncpg

from server.database import has_citus

log = logging.getLogger(__name__)

_LOCK_KEY = 0x666F6C6C6F77  # "follow"

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "accounts, counters and the two copies of each edge",
        """
        CREATE TABLE accounts (
            user_id          text COLLATE "C" PRIMARY KEY,
            nick             text,
            face_url         text,
            profile_sequence bigint NOT NULL DEFAULT 0,
            created_at       timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE follow_counts (
            user_id   text COLLATE "C" PRIMARY KEY,
            following bigint NOT NULL DEFAULT 0 CHECK (following >= 0),
            followers bigint NOT NULL DEFAULT 0 CHECK (followers >= 0),
            mutual    bigint NOT NULL DEFAULT 0 CHECK (mutual >= 0)
        );
        CREATE TABLE following (
            user_id      text COLLATE "C" NOT NULL,
            target_id    text COLLATE "C" NOT NULL,
            followed_at  timestamptz NOT NULL,
            mutual_since timestamptz,
            PRIMARY KEY (user_id, target_id)
        );
        CREATE INDEX following_by_time ON following (user_id, followed_at DESC, target_id DESC);
        CREATE INDEX following_mutual_by_time
            ON following (user_id, mutual_since DESC, target_id DESC)
            WHERE mutual_since IS NOT NULL;
        CREATE TABLE followers (
            user_id     text COLLATE "C" NOT NULL,
            follower_id text COLLATE "C" NOT NULL,
            followed_at timestamptz NOT NULL,
            PRIMARY KEY (user_id, follower_id)
        );
        CREATE INDEX followers_by_time ON followers (user_id, followed_at DESC, follower_id DESC);
        CREATE TABLE service_secrets (
            name  text PRIMARY KEY,
            value bytea NOT NULL
        );
        """,
    ),
    (
        2,
        "follower count deltas, so following one user is not serialised on their counter row",
        """
        CREATE TABLE follow_count_deltas (
            user_id   text COLLATE "C" NOT NULL,
            shard     smallint NOT NULL,
            followers bigint NOT NULL DEFAULT 0,
            mutual    bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (user_id, shard)
        );
        -- Counts are now the counter row plus the deltas; either part alone may go below 0.
        ALTER TABLE follow_counts DROP CONSTRAINT follow_counts_followers_check;
        ALTER TABLE follow_counts DROP CONSTRAINT follow_counts_mutual_check;
        CREATE VIEW follow_totals AS
        SELECT c.user_id, c.following,
               c.followers + d.followers AS followers, c.mutual + d.mutual AS mutual
        FROM follow_counts c
        CROSS JOIN LATERAL (
            SELECT coalesce(sum(x.followers), 0)::bigint AS followers,
                   coalesce(sum(x.mutual), 0)::bigint AS mutual
            FROM follow_count_deltas x WHERE x.user_id = c.user_id
        ) d;
        """,
    ),
    (
        3,
        "account tombstones: deletion answers at once, edges removed in bounded batches",
        """
        -- One row per account being deleted: written in the deletion's own transaction
        -- (the durable job), removed when the background cleanup has removed every edge.
        CREATE TABLE account_tombstones (
            user_id    text COLLATE "C" PRIMARY KEY,
            deleted_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        4,
        "change events: an outbox row per acknowledged change, in the change's transaction",
        """
        -- One row per call that changed something (server.store): kind 1 a follow (others:
        -- the targets really followed; mutual: those the pair became mutual with), 2 an
        -- unfollow (the edges that existed; mutual: those no longer mutual), 3 an account
        -- deleted (user_id: the account; others empty). txid is the writing transaction's
        -- id: rows whose txid is below the xmin of a later snapshot are final, which is the
        -- visibility horizon readers of the outbox advance by (see the README, "Change
        -- events"); (txid, id) is the order they read in.
        CREATE TABLE follow_events (
            user_id   text COLLATE "C" NOT NULL,
            id        bigserial,
            txid      xid8 NOT NULL DEFAULT pg_current_xact_id(),
            kind      smallint NOT NULL CHECK (kind BETWEEN 1 AND 3),
            others    text[] COLLATE "C" NOT NULL DEFAULT '{}',
            mutual    text[] COLLATE "C" NOT NULL DEFAULT '{}',
            at        timestamptz NOT NULL,
            client_ip text NOT NULL DEFAULT '',
            platform  text NOT NULL DEFAULT '',
            PRIMARY KEY (user_id, id)
        );
        CREATE INDEX follow_events_by_position ON follow_events (txid, id);
        -- The position below which events have been deleted (retention; server.outbox): a
        -- reader asking to resume from before it has lost events and is told so.
        CREATE TABLE follow_events_floor (
            one  boolean PRIMARY KEY DEFAULT true CHECK (one),
            txid xid8 NOT NULL,
            id   bigint NOT NULL
        );
        INSERT INTO follow_events_floor (txid, id) VALUES ('0', 0);
        """,
    ),
    (
        5,
        "webhooks: each callback URL's place in the outbox and its deliveries still to do",
        """
        -- One row per callback URL ever configured (server.webhooks): the outbox position
        -- (txid, id) through which its feeder has queued events. Written by the one feeder
        -- of the database, in the same transaction as the deliveries it queues.
        CREATE TABLE webhook_positions (
            url  text PRIMARY KEY,
            txid bigint NOT NULL,
            id   bigint NOT NULL
        );
        -- One row per (URL, event) not delivered yet, or parked: keyed by the acting user
        -- like the outbox, so a user's deliveries are on its shard. The request (command,
        -- body, the caller's address) is made when queued, so outbox retention never has to
        -- wait for a delivery. A sender claims a user's oldest row for a lease
        -- (claimed_until, claim); a 2xx deletes it; a failure sets next_at (backoff); past
        -- the retry budget parked_at is set and the row is kept until retention.
        CREATE TABLE webhook_deliveries (
            user_id       text COLLATE "C" NOT NULL,
            url           text NOT NULL,
            txid          bigint NOT NULL,
            event_id      bigint NOT NULL,
            command       text NOT NULL,
            body          text NOT NULL,
            client_ip     text NOT NULL,
            platform      text NOT NULL,
            event_at      timestamptz NOT NULL,
            queued_at     timestamptz NOT NULL DEFAULT now(),
            attempts      integer NOT NULL DEFAULT 0,
            next_at       timestamptz NOT NULL DEFAULT now(),
            claimed_until timestamptz,
            claim         bigint,
            last_error    text,
            parked_at     timestamptz,
            PRIMARY KEY (user_id, url, txid, event_id)
        );
        CREATE INDEX webhook_deliveries_pending
            ON webhook_deliveries (url, user_id, txid, event_id) WHERE parked_at IS NULL;
        CREATE INDEX webhook_deliveries_parked
            ON webhook_deliveries (parked_at) WHERE parked_at IS NOT NULL;
        """,
    ),
    (
        6,
        "webhooks: a URL's pending deliveries indexed in queue order (the senders' due heads)",
        """
        -- Senders claim the due heads of a URL oldest first (server.webhook_queue): a scan
        -- of this index in (txid, event_id) order, probing the primary key for an older
        -- pending row of the same user. It replaces the (url, user_id, ...) index, whose
        -- only reader was the old per-user DISTINCT ON search of heads; the primary key
        -- (user_id, url, txid, event_id) serves every per-user lookup.
        CREATE INDEX webhook_deliveries_queue
            ON webhook_deliveries (url, txid, event_id) WHERE parked_at IS NULL;
        DROP INDEX webhook_deliveries_pending;
        """,
    ),
]


# How each migration's tables are placed on Citus, by migration version. A migration that
# adds a table declares it here in the same change (tests/test_citus_migrations checks that
# every table the migrations make is declared). "user_id": hash-distributed on user_id,
# co-located with the first such table (follow_counts, the anchor of the group);
# "reference": one full copy on every node (tiny, shared by all users, written once).
# schema_migrations is not declared: it stays a plain table on the coordinator.
Placement = Literal["user_id", "reference"]
DISTRIBUTION: dict[int, dict[str, Placement]] = {
    1: {
        "follow_counts": "user_id",
        "accounts": "user_id",
        "following": "user_id",
        "followers": "user_id",
        "service_secrets": "reference",
    },
    2: {"follow_count_deltas": "user_id"},
    # Few rows (pending deletions only), read beside any user's rows (Check, import): a
    # copy on every node joins with every shard.
    3: {"account_tombstones": "reference"},
    # Keyed by the acting user like every per-user table: a call's event row goes to the
    # shard its other rows are on.
    4: {"follow_events": "user_id", "follow_events_floor": "reference"},
    # A user's deliveries beside its events; one small row per configured URL.
    5: {"webhook_deliveries": "user_id", "webhook_positions": "reference"},
}


@dataclass(frozen=True, slots=True)
class Distributed:
    """One table placed on Citus by this run."""

    table: str
    placement: Placement
    colocated_with: str | None  # None: a new co-location group (or a reference table)


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """What one run changed: the SQL migrations applied and the tables placed on Citus."""

    applied: list[int] = field(default_factory=list)
    distributed: list[Distributed] = field(default_factory=list)


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply the migrations not yet applied; returns the versions applied now. On Citus,
    also distributes the tables not yet distributed (see migrate_schema for both)."""
    return (await migrate_schema(conn)).applied


async def migrate_schema(
    conn: asyncpg.Connection,
    migrations: list[tuple[int, str, str]] | None = None,
) -> MigrationReport:
    """Apply the pending migrations, then on Citus place the tables not yet placed; all
    under one advisory lock, so concurrent starts do each step once. `migrations` defaults
    to MIGRATIONS (tests pass a prefix to model a database that is behind)."""
    report = MigrationReport()
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in MIGRATIONS if migrations is None else migrations:
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            report.applied.append(version)
        if await has_citus(conn):
            report.distributed.extend(await _distribute(conn))
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return report


# Where each declared table stands now: absent (its migration not applied), plain or
# Citus-local (not distributed yet), hash-distributed on some column, or a reference table.
_PLACEMENTS = """
SELECT t.name,
       to_regclass(t.name) IS NOT NULL AS exists,
       p.partmethod::text AS partmethod,
       p.repmodel::text AS repmodel,
       p.colocationid,
       CASE WHEN p.partmethod = 'h'
            THEN column_to_column_name(p.logicalrelid, p.partkey) END AS column
FROM unnest($1::text[]) WITH ORDINALITY AS t(name, n)
LEFT JOIN pg_dist_partition p ON p.logicalrelid = to_regclass(t.name)
ORDER BY t.n
"""


async def _distribute(conn: asyncpg.Connection) -> list[Distributed]:
    """Place every declared table that exists and is not placed yet; idempotent.

    Each table is placed in its own transaction, outside the migrations' ones: the step must
    also run when no migration is pending (a database that gained Citus later), a table
    holding rows is copied into its shards under a lock that blocks its writes, and a run
    stopped halfway resumes at the next start with the tables still left."""
    declared = {t: p for tables in DISTRIBUTION.values() for t, p in tables.items()}
    rows = await conn.fetch(_PLACEMENTS, list(declared))
    # The co-location anchor: the first per-user table already distributed on user_id, else
    # the first per-user table, which opens a new group when it is distributed below.
    anchor: str | None = None
    anchor_group: int | None = None
    for r in rows:
        if declared[r["name"]] == "user_id" and r["partmethod"] == "h" and r["column"] == "user_id":
            anchor, anchor_group = r["name"], r["colocationid"]
            break
    done: list[Distributed] = []
    for r in rows:
        table, placement = r["name"], declared[r["name"]]
        if not r["exists"]:
            continue
        # Not in Citus' metadata, or a Citus-local table (partmethod 'n', replication 's',
        # no co-location group): still only on the coordinator, so distribute it.
        if r["partmethod"] is None or (r["partmethod"] == "n" and r["colocationid"] == 0):
            if placement == "reference":
                await conn.execute("SELECT create_reference_table($1)", table)
                log.info("distributed table %s as a reference table (a copy on every node)", table)
                done.append(Distributed(table, placement, None))
            else:
                await conn.execute(
                    "SELECT create_distributed_table($1, 'user_id', colocate_with => $2)",
                    table,
                    anchor or "none",
                )
                log.info(
                    "distributed table %s on user_id (co-located with %s)",
                    table,
                    anchor or "none: a new co-location group",
                )
                done.append(Distributed(table, placement, anchor))
                anchor = anchor or table
            # The rows a table had before are copied into its shards, and the coordinator's
            # own copy is then dead weight that Citus neither reads nor updates.
            await conn.execute("SELECT truncate_local_data_after_distributing_table($1)", table)
            continue
        if placement == "reference":
            ok = r["partmethod"] == "n" and r["repmodel"] == "t"
        else:
            ok = r["partmethod"] == "h" and r["column"] == "user_id"
            ok = ok and (anchor_group is None or r["colocationid"] == anchor_group)
        if not ok:
            # Placed by hand some other way. Left alone: redistributing a live table is an
            # operator's decision (alter_distributed_table), not something to do at start.
            log.warning(
                "table %s is on Citus as partmethod %s / column %s / co-location group %s,"
                " not as declared (%s%s); leaving it as it is",
                table,
                r["partmethod"],
                r["column"],
                r["colocationid"],
                placement,
                f", co-located with {anchor}" if placement == "user_id" else "",
            )
    return done


async def apply_migrations(url: str) -> MigrationReport:
    """Bring the schema up to date over a connection of its own (once per start; --workers
    does it in the parent). The log says what changed (each distributed table included)."""
    conn = await asyncpg.connect(url)
    try:
        report = await migrate_schema(conn)
    finally:
        await conn.close()
    if report.applied:
        log.info("applied schema migrations %s", report.applied)
    return report
