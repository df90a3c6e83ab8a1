"""`python -m tests.bench.citus_statements URL`: cluster CPU per execution of GetInfo's counts
statements on a running Citus cluster (the coordinator's URL, its database migrated and
seeded, e.g. with the bench's graph), interleaved in rounds.

The bench (tests.bench.citus) measures whole calls under load; this compares statement
forms alone, one client, so that a form's cost on the coordinator and on the workers (which
parse and plan each task's text anew) can be told apart. CPU is read from /proc (psutil) for
each node's postmaster and all its backends, so the nodes must run on this machine, and
idle background work counts too (a few ms per second). Medians of the rounds are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import asyncpg
import psutil

from server import store
from tests.bench.cpu import tree_cpu_seconds

# The forms compared: the one Store.counts sends on Citus, the single-node one, and the
# correlated form used before _COUNT_ROWS.
FORMS = {
    "union rows (_COUNT_ROWS)": store._COUNT_ROWS,
    "join + aggregate (_COUNTS)": store._COUNTS,
    "correlated sums": """
SELECT c.user_id, c.following,
       c.followers + coalesce((SELECT sum(d.followers) FROM follow_count_deltas d
                               WHERE d.user_id = c.user_id AND d.user_id = ANY($1::text[])),
                              0)::bigint AS followers,
       c.mutual + coalesce((SELECT sum(d.mutual) FROM follow_count_deltas d
                            WHERE d.user_id = c.user_id AND d.user_id = ANY($1::text[])),
                           0)::bigint AS mutual
FROM follow_counts c
WHERE c.user_id = ANY($1::text[])
""",
}


async def _postmaster(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        parent = psutil.Process(await conn.fetchval("SELECT pg_backend_pid()")).parent()
    finally:
        await conn.close()
    assert parent is not None
    return parent.pid


async def measure(url: str, users: int, calls: int, rounds: int) -> dict[str, list[float]]:
    """Per form, the cluster CPU ms per execution in each round (coordinator + workers)."""
    conn = await asyncpg.connect(url)
    try:
        workers = await conn.fetch(
            "SELECT nodename, nodeport FROM pg_dist_node WHERE noderole = 'primary'"
            " AND shouldhaveshards AND groupid <> 0"
        )
        database = await conn.fetchval("SELECT current_database()")
        user = await conn.fetchval("SELECT current_user")
        nodes = [url] + [f"postgresql://{user}@{w[0]}:{w[1]}/{database}" for w in workers]
        pids = [await _postmaster(node) for node in nodes]
        ids = [r[0] for r in await conn.fetch("SELECT user_id FROM follow_counts")]
        rnd = random.Random(1)
        for sql in FORMS.values():
            for _ in range(5):
                await conn.fetch(sql, rnd.sample(ids, users))
        out: dict[str, list[float]] = {name: [] for name in FORMS}
        for _ in range(rounds):
            for name, sql in FORMS.items():
                batches = [rnd.sample(ids, users) for _ in range(calls)]
                before = sum(tree_cpu_seconds(p) for p in pids)
                for batch in batches:
                    await conn.fetch(sql, batch)
                out[name].append((sum(tree_cpu_seconds(p) for p in pids) - before) / calls * 1e3)
        return out
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.citus_statements")
    parser.add_argument("url", help="the coordinator's database URL")
    parser.add_argument("--users", type=int, default=20, help="users per GetInfo")
    parser.add_argument("--calls", type=int, default=500, help="executions per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    started = time.monotonic()
    results = asyncio.run(measure(args.url, args.users, args.calls, args.rounds))
    print(f"cluster CPU ms per GetInfo({args.users}) counts statement, median [rounds]")
    for name, values in results.items():
        rounds = " ".join(f"{v:.2f}" for v in values)
        print(f"  {name:<28} {statistics.median(values):.2f} [{rounds}]")
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
