"""tests.bench.watch_cost: one run over a real database reads every written event once and
reports its cost per event (no timing asserted: the figures are the bench's business)."""

from __future__ import annotations

import asyncpg

from tests.bench.watch_cost import _WRITE, one_run


async def test_a_run_makes_every_written_event_into_message_bytes(db_url: str) -> None:
    """30 rows of 3 edges: the stream makes messages of all 90 events, ~100 bytes each."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(_WRITE, 30, 3)
    finally:
        await conn.close()
    figures = await one_run(db_url, 90)
    assert figures["cpu_us_per_event"] > 0
    assert 50 < figures["bytes_per_event"] < 200
