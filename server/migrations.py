"""Versioned schema migrations, applied at start under an advisory lock (safe to run twice,
and safe when several server processes start at once).

Every table is keyed by the user that owns the row, so a distributed PostgreSQL (Citus)
can shard them all on user_id, side by side. Ids use the "C" collation: byte order, the
same everywhere, and cheaper to compare.
"""

from __future__ import annotations

import asyncpg

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
]


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply the migrations not yet applied; returns the versions applied now."""
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in MIGRATIONS:
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            applied_now.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now
