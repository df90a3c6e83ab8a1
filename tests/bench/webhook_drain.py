"""`python -m tests.bench.webhook_drain`: what delivering one webhook costs, apart from the
calls that write the events: the server-side CPU (feeder and senders, this process) and
PostgreSQL's CPU per webhook, to compare versions of server/webhooks.py and its queue.

An embedded PostgreSQL of its own (--data-dir), a fresh database per run with the schema
(server.migrations); per run: N outbox rows written directly (follows of --targets users
each, by N / 2 acting users, so half the users have a second webhook queued behind their
first), then the webhook feeder and senders (server.webhooks.Webhooks, as the service runs
them) deliver them to the aiohttp receiver of the tests (tests.webhook_receiver, in a
process of its own) until every one is answered. Figures per run: webhooks/s, this
process's CPU ms per webhook, PostgreSQL's CPU ms per webhook (its processes' CPU time,
psutil), the database's transactions per webhook (pg_stat_database: each autocommitted
statement is one; the written events' own included). --rate R writes the events while
they are delivered, R a second in 100 transactions a second (as calls would: the live
case, where a sender's rounds are small), instead of all before. Runs of one version only;
to compare versions, run two checkouts alternately (`git archive REV server tests | tar -x
-C DIR`, then the bench from DIR: the working directory comes first on sys.path), on the
same data folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import time
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from prometheus_client import CollectorRegistry

from server.database import open_database
from server.migrations import apply_migrations
from server.webhook_metrics import WebhookMetrics
from server.webhooks import WebhookConfig, Webhooks

DB = "webhook_drain"


def _receive(ready: Queue[Any], counts: Queue[Any]) -> None:
    """The receiver process: puts its URL on `ready`, then its count of 2xx answers on
    `counts` whenever asked (any item put back on `ready`)."""
    from tests.webhook_receiver import Receiver

    async def main() -> None:
        receiver = Receiver()
        await receiver.start()
        ready.put(receiver.url)
        while True:
            await asyncio.to_thread(counts.get)
            ready.put(len(receiver.delivered))

    asyncio.run(main())


async def fresh_database(admin_url: str, url: str, name: str = DB) -> None:
    """Database `name` made again from nothing (through `admin_url`) and migrated (at `url`,
    which names it): a bench's starting point (here, and tests.bench.watch_cost)."""
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    await apply_migrations(url)


_WRITE = """
INSERT INTO follow_events (user_id, kind, others, at, client_ip, platform)
SELECT 'u' || lpad((g % $2)::text, 7, '0'), 1,
       ARRAY(SELECT 'v' || lpad((g * 31 + k)::text, 7, '0') FROM generate_series(1, $3) k),
       clock_timestamp(), '127.0.0.1', 'gRPC'
FROM generate_series(1, $1) g
"""


# Events trickling in as calls would write them: `per` rows a transaction, `pause` seconds
# apart, written by PostgreSQL itself (a procedure), so this process's CPU is the webhooks'.
_TRICKLE = """
CREATE OR REPLACE PROCEDURE drain_trickle(n int, users int, targets int, per int, pause float8)
LANGUAGE plpgsql AS $$
DECLARE done int := 0;
BEGIN
  WHILE done < n LOOP
    INSERT INTO follow_events (user_id, kind, others, at, client_ip, platform)
    SELECT 'u' || lpad((g % users)::text, 7, '0'), 1,
           ARRAY(SELECT 'v' || lpad((g * 31 + k)::text, 7, '0') FROM generate_series(1, targets) k),
           clock_timestamp(), '127.0.0.1', 'gRPC'
    FROM generate_series(done + 1, least(n, done + per)) g;
    done := done + per;
    COMMIT;
    PERFORM pg_sleep(pause);
  END LOOP;
END $$
"""


def _pg_cpu(postmaster: int) -> float:
    total = 0.0
    try:
        root = psutil.Process(postmaster)
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                continue
    except psutil.Error:
        return 0.0
    return total


_XACTS = (
    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
)


async def _transactions(url: str) -> int:
    """The database's transactions so far (each autocommitted statement is one), once the
    backends' statistics have been flushed (they report at most every second)."""
    await asyncio.sleep(1.1)
    conn = await asyncpg.connect(url)
    try:
        value: int = await conn.fetchval(_XACTS)
        return value
    finally:
        await conn.close()


async def one_run(
    url: str,
    admin_url: str,
    postmaster: int,
    hook_url: str,
    ask: Any,
    n: int,
    targets: int,
    rate: float,
) -> dict[str, float]:
    await fresh_database(admin_url, url)
    config = WebhookConfig(urls=(hook_url,), sdkappid=1400000000, token="drain-token")
    before = ask()
    webhooks = await Webhooks.start(config, url, WebhookMetrics(CollectorRegistry()))
    xacts0 = await _transactions(url)
    try:
        conn = await asyncpg.connect(url)
        cpu0, pg0, t0 = time.process_time(), _pg_cpu(postmaster), time.monotonic()
        try:
            if rate > 0:  # 100 transactions a second
                await conn.execute(_TRICKLE)
                per = max(1, round(rate / 100))
                await conn.execute(
                    "CALL drain_trickle($1, $2, $3, $4, $5)", n, max(1, n // 2), targets, per, 0.01
                )
            else:
                await conn.execute(_WRITE, n, max(1, n // 2), targets)
        finally:
            await conn.close()
        while await asyncio.to_thread(ask) - before < n:  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.05)
        wall = time.monotonic() - t0
        cpu, pg = time.process_time() - cpu0, _pg_cpu(postmaster) - pg0
        xacts = await _transactions(url) - xacts0
    finally:
        await webhooks.stop()
    return {
        "webhooks_per_s": round(n / wall, 1),
        "server_cpu_ms_per_webhook": round(1000 * cpu / n, 4),
        "pg_cpu_ms_per_webhook": round(1000 * pg / n, 4),
        "transactions_per_webhook": round(xacts / n, 3),
        "load": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--webhooks", type=int, default=2000)
    parser.add_argument("--targets", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--rate", type=float, default=0, help="events/s written while delivering (0: all first)"
    )
    parser.add_argument("--data-dir", type=Path, default=Path("var/bench/drain-pgdata"))
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    ready: Queue[Any] = ctx.Queue()
    counts: Queue[Any] = ctx.Queue()
    proc = ctx.Process(target=_receive, args=(ready, counts), daemon=True)
    proc.start()
    hook_url = ready.get(timeout=60)

    def ask() -> int:
        counts.put(None)
        got: int = ready.get(timeout=60)
        return got

    database = asyncio.run(open_database(None, args.data_dir))
    try:
        base = database.url
        head, _, query = base.partition("?")
        url = f"{head.rsplit('/', 1)[0]}/{DB}" + (f"?{query}" if query else "")
        postmaster = int((args.data_dir / "postmaster.pid").read_text().split()[0])
        runs = [
            asyncio.run(
                one_run(
                    url, base, postmaster, hook_url, ask, args.webhooks, args.targets, args.rate
                )
            )
            for _ in range(args.runs)
        ]
    finally:
        database.close()
        proc.terminate()
    summary = {
        k: statistics.median(r[k] for r in runs)
        for k in (
            "webhooks_per_s",
            "server_cpu_ms_per_webhook",
            "pg_cpu_ms_per_webhook",
            "transactions_per_webhook",
        )
    }
    print(json.dumps({"label": args.label, "runs": runs, "median": summary}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
