"""`python -m tests.bench.watch_cost`: what one Watch event costs the server process, apart
from the calls that write the events and from gRPC's own sending: the WatchHub's outbox
reads (a stream catching up from the oldest event, batch after batch) and the WatchResponse
bytes of every batch (EventServicer.response), in this process, per event.

An embedded PostgreSQL of its own (--data-dir), a fresh database with the schema
(server.migrations) and --rows outbox rows of --edges followed users each (one row per Follow
call, as server.store writes them); per run one stream reads every event from the oldest.
Figures per run: this process's CPU µs per event and the bytes per event. To compare
versions, run two checkouts alternately (`git archive REV server tests | tar -x -C DIR`, this
file copied in if REV lacks it, then the bench from DIR: the working directory comes first
on sys.path), on the same data folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from server.database import open_database, use_int_timestamps
from server.outbox import OutboxSource
from server.watch_hub import WatchHub
from server.watch_servicer import EventServicer
from server.watch_token import WatchTokens
from tests.bench.webhook_drain import fresh_database

DB = "watch_cost"

_WRITE = """
INSERT INTO follow_events (user_id, kind, others, mutual, at, client_ip, platform)
SELECT 'u' || lpad((g % 5000)::text, 7, '0'), 1,
       ARRAY(SELECT 'v' || lpad((g * 31 + k)::text, 7, '0') FROM generate_series(1, $2) k),
       ARRAY['v' || lpad((g * 31 + 1)::text, 7, '0')],
       clock_timestamp(), '127.0.0.1', 'gRPC'
FROM generate_series(1, $1) g
"""


async def _fresh(admin_url: str, url: str, rows: int, edges: int) -> None:
    await fresh_database(admin_url, url, DB)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(_WRITE, rows, edges)
        await conn.execute("VACUUM ANALYZE follow_events")
    finally:
        await conn.close()


async def one_run(url: str, events: int) -> dict[str, float]:
    """One stream from the oldest event until `events` have been made into messages."""
    pool = await asyncpg.create_pool(url, min_size=2, max_size=4, init=use_int_timestamps)
    hub = WatchHub(OutboxSource(pool), poll_seconds=0.01)
    servicer = EventServicer(hub, WatchTokens(b"k" * 32))
    sent = size = 0
    stream = hub.watch(None, False)
    try:
        cpu0 = time.process_time()
        async for batch in stream:
            message: Any = servicer.response(batch)  # a protobuf message before 77bc0fd
            raw = message if isinstance(message, bytes) else message.SerializeToString()
            size += len(raw)
            sent += sum(part.end - part.start for part in batch.slices)
            if sent >= events:
                break
        cpu = time.process_time() - cpu0
    finally:
        await stream.aclose()
        await hub.stop()
        await pool.close()
    return {"cpu_us_per_event": round(1e6 * cpu / sent, 3), "bytes_per_event": size / sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--edges", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path("var/bench/drain-pgdata"))
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    database = asyncio.run(open_database(None, args.data_dir))
    try:
        base = database.url
        head, _, query = base.partition("?")
        url = f"{head.rsplit('/', 1)[0]}/{DB}" + (f"?{query}" if query else "")
        asyncio.run(_fresh(base, url, args.rows, args.edges))
        runs = [asyncio.run(one_run(url, args.rows * args.edges)) for _ in range(args.runs)]
    finally:
        database.close()
    median = statistics.median(r["cpu_us_per_event"] for r in runs)
    print(json.dumps({"label": args.label, "runs": runs, "median_cpu_us_per_event": median}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
