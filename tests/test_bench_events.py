"""tests.bench.events: its receiver (a real process answering real requests) and its figures
(pure functions over recorded arrivals, no follow-server)."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import aiohttp
import pytest

from tests.bench.events import (
    FOLLOW_ADD,
    FOLLOW_DELETE,
    Consumers,
    Hook,
    HookServer,
    Received,
    Seen,
    Written,
    hook_from,
    match,
    percentile,
    render_events_table,
    sign_ok,
    summarise,
)

TOKEN = "t0ken"


def signed_query(command: str, request_time: str = "1764120000") -> dict[str, str]:
    sign = hashlib.sha256((TOKEN + request_time).encode()).hexdigest()
    return {"CallbackCommand": command, "RequestTime": request_time, "Sign": sign}


def test_sign_and_bodies() -> None:
    assert sign_ok(TOKEN, "1", hashlib.sha256(b"t0ken1").hexdigest())
    assert not sign_ok(TOKEN, "2", hashlib.sha256(b"t0ken1").hexdigest())
    add = {"From_Account": "a", "FollowList": [{"To_Account": "b"}, {"To_Account": "c"}]}
    h = hook_from(signed_query(FOLLOW_ADD), add | {"EventTime": 5}, 1.0, TOKEN)
    assert h.key == (FOLLOW_ADD, "a", ("b", "c"), 5)
    assert h.signed
    gone = {"CallbackCommand": FOLLOW_DELETE, "From_Account": "a", "To_Account": ["b"]}
    h = hook_from({"RequestTime": "1", "Sign": "x"}, gone | {"EventTime": 6}, 1.0, TOKEN)
    assert h.key == (FOLLOW_DELETE, "a", ("b",), 6)
    assert not h.signed


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([], 0.5) is None


def test_match_counts_each_written_event_once_and_lags_from_first_arrival() -> None:
    written = [
        Written(1, 1, "a", ("b", "c"), 1_000_000),  # a follow of 2 at t=1.0 s
        Written(2, 2, "d", ("e",), 2_000_000),  # an unfollow at t=2.0 s
        Written(3, 1, "f", ("g",), 3_000_000),  # never arrives
    ]
    got = Received(
        hooks=[
            Hook(1.010, FOLLOW_ADD, "a", ("b", "c"), 1000, True),
            Hook(1.500, FOLLOW_ADD, "a", ("b", "c"), 1000, True),  # sent again
            Hook(2.020, FOLLOW_DELETE, "d", ("e",), 2000, True),
            Hook(3.100, FOLLOW_ADD, "f", ("g",), 3000, False),  # badly signed: not delivered
            Hook(9.000, FOLLOW_ADD, "z", ("y",), 9000, True),  # not this range's
        ],
        seen=[
            Seen(1.005, "1.0", 1_000_000),
            Seen(1.006, "1.1", 1_000_000),
            Seen(1.050, "1.1", 1_000_000),  # repeated after a resume
            Seen(2.030, "2.0", 2_000_000),
        ],
    )
    m = match(written, got)
    assert (m["calls_changed"], m["edges_changed"]) == (3, 4)
    assert (m["webhooks_expected"], m["webhooks_delivered"], m["webhooks_duplicated"]) == (3, 2, 1)
    assert (m["watch_expected"], m["watch_delivered"], m["watch_duplicated"]) == (4, 3, 1)
    assert round(m["webhook_lag_p50_ms"]) == 10
    assert round(m["webhook_lag_max_ms"]) == 20
    assert round(m["watch_lag_max_ms"]) == 30


def _run(events: str, calls_per_s: float, extra: dict[str, Any]) -> dict[str, Any]:
    result = {
        "calls_per_s": calls_per_s,
        "p99_ms": 10.0,
        "errors": 0,
        "server_cpu_pct": calls_per_s * 0.2,  # 2 ms per call
        "db_cpu_pct": 10.0,
    }
    scenario = {"result": result, "calls_changed": 1} | extra
    return {
        "events": events,
        "label": events,
        "load_average_start": [1.5, 1.0, 0.5],
        "load_average_end": [1.5, 1.0, 0.5],
        "outbox_vs_edges": {"edges_net_change": 1, "outbox_net": 1},
        "consumer": {},
        "scenarios": {"grpc:follow20": scenario},
    }


def test_summary_medians_ratio_and_table() -> None:
    on_extra = {
        "backlog_at_end": {"webhooks": 3, "watch": 0},
        "drain_s": 0.4,
        "webhook_lag_p50_ms": 20.0,
        "webhooks_expected": 10,
        "webhooks_delivered": 10,
    }
    runs = [
        _run("off", 100.0, {}),
        _run("on", 90.0, on_extra),
        _run("on", 70.0, on_extra),
        _run("off", 120.0, {}),
    ]
    (row, *_) = summarise(runs)
    assert (row["calls_per_s_off"], row["calls_per_s_on"]) == (110.0, 80.0)
    assert round(row["ratio"], 3) == round(80 / 110, 3)
    assert row["met"] is False  # 0.73 < 0.8
    assert (row["webhooks_delivered"], row["webhooks_expected"]) == (20, 20)
    assert row["backlog_at_end_webhooks"] == 3
    # CPU % of one core x 10 / calls per second, medians over the runs
    assert row["server_cpu_ms_per_call_on"] == pytest.approx(2.0)
    assert row["db_cpu_ms_per_call_off"] == pytest.approx((1.0 + 100 / 120) / 2)
    doc = {
        "machine": {
            "cpu_count": 2,
            "cpu_model": "x",
            "memory_gb": 1,
            "python": "3",
            "postgres": "18",
            "load_average_at_start": [1.0],
            "load_average_at_end": [2.0],
        },
        "config": {"concurrency": 16, "processes": 2, "warmup": 0.5, "duration": 3.0, "runs": 4},
        "graph": {"params": {"users": 10}, "edges": 20},
        "git": {"revision": "0" * 40, "dirty": False},
        "runs": runs,
        "summary": summarise(runs),
    }
    table = render_events_table(doc)
    assert "left out of the medians" not in table
    assert "| grpc:follow20 | 110 | 80 | 0.73 | >= 0.8 (**no**) | 20.0 / n/a |" in table


def test_the_receiver_answers_a_signed_webhook_and_refuses_a_forged_one() -> None:
    """The receiver (the webhook process of the two consumers) answers 200 to a signed
    webhook and 403 to a forged one, and what it recorded comes back from stop()."""
    consumer = Consumers(TOKEN)
    try:
        body = {"CallbackCommand": FOLLOW_ADD, "From_Account": "a", "EventTime": 1}
        body["FollowList"] = [{"To_Account": "b"}]

        async def post() -> list[int]:
            async with aiohttp.ClientSession() as session:
                statuses = []
                for query in (signed_query(FOLLOW_ADD), signed_query(FOLLOW_ADD) | {"Sign": "0"}):
                    async with session.post(consumer.url, params=query, json=body) as response:
                        statuses.append(response.status)
                return statuses

        assert asyncio.run(post()) == [200, 403]
        assert consumer.counts() == (2, 0)
        got = consumer.stop()
        assert [h.signed for h in got.hooks] == [True, False]
        assert got.hooks[0].key == (FOLLOW_ADD, "a", ("b",), 1)
    finally:
        consumer.kill()


def test_a_run_with_no_call_completed_is_left_out_of_the_medians() -> None:
    """A run whose load generators completed nothing in the window measured nothing: it is
    counted as stalled, not as 0 calls/s in the median."""
    on = {"backlog_at_end": {"webhooks": 0, "watch": 0}}
    runs = [_run("off", 100.0, {}), _run("on", 0.0, on), _run("on", 90.0, on), _run("off", 0.0, {})]
    (row, *_) = summarise(runs)
    assert (row["calls_per_s_off"], row["calls_per_s_on"], row["stalled_runs"]) == (100.0, 90.0, 2)
    assert round(row["ratio"], 2) == 0.9


class _Transport(asyncio.Transport):
    """What HookServer writes, and whether it closed the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_the_bench_receiver_parses_split_and_back_to_back_requests() -> None:
    """HookServer hands each POST to /hook (its target as sent and its body) to its handler
    once the whole body is in, however the bytes arrive (a request cut anywhere, two in one
    read), and writes the handler's answer; another path is a 404 and a request without
    Content-Length a 411 that closes the connection."""
    seen: list[tuple[bytes, bytes]] = []

    def handle(target: bytes, body: bytes) -> bytes:
        seen.append((target, body))
        return b"ok;"

    server = HookServer(handle)
    transport = _Transport()
    server.connection_made(transport)

    def request(target: bytes, body: bytes) -> bytes:
        head = f"POST {target.decode()} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
        return head.encode() + b"\r\n\r\n" + body

    one = request(b"/hook?Sign=AbC&RequestTime=1", b'{"a":1}')
    for cut in (5, len(one) - 3):
        server.data_received(one[:cut])
        server.data_received(one[cut:])
    server.data_received(request(b"/hook?x=1", b"{}") + request(b"/other", b"{}"))
    assert seen == [(b"/hook?Sign=AbC&RequestTime=1", b'{"a":1}')] * 2 + [(b"/hook?x=1", b"{}")]
    assert transport.written.startswith(b"ok;ok;ok;HTTP/1.1 404 ")
    assert not transport.closed
    server.data_received(b"POST /hook HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.written.endswith(b"{}")
    assert b"411 Length Required" in transport.written
    assert transport.closed
