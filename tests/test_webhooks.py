"""Webhooks (server.webhooks, server.webhook_queue, server.webhook_request) against a real
HTTP receiver on 127.0.0.1: the hosted service's URL parameters, Sign and bodies; delivery
at least once and in commit order per user through receiver errors and outages, a kill -9 of
the server, and two servers on one database; parking after the retry budget."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from typing import Any

import asyncpg
import grpc
import pytest

from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from server.app import RunningService, start_service
from server.config import Settings
from server.webhook_metrics import url_label
from server.webhook_request import FOLLOW_ADD, FOLLOW_DELETE
from tests.conftest import ServiceFactory
from tests.helpers import follow_server, import_users
from tests.v4_helpers import ShimFactory
from tests.webhook_receiver import Receiver, until

pytest_plugins = ["tests.v4_fixtures"]

APP = 1400000000
TOKEN = "callback-token-1"
# Fast retries for tests; the defaults (1 s doubling to 10 min) are for receivers in the wild.
FAST = {"callback_backoff_min": 0.05, "callback_backoff_max": 0.3}


def webhook_service(make_service: ServiceFactory, receiver: Receiver, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "sdkappid": APP,
        "callback_urls": (receiver.url,),
        "callback_token": TOKEN,
        **FAST,
    }
    settings.update(overrides)
    return make_service(**settings)


def metric(service: RunningService, name: str, url: str, **labels: str) -> float:
    value = service.metrics.registry.get_sample_value(name, {"url": url_label(url), **labels})
    return value or 0.0


async def follow(stub: pb_grpc.FollowServiceAsyncStub, user: str, *targets: str) -> None:
    await stub.Follow(pb.FollowRequest(user_id=user, target_ids=list(targets)))


async def unfollow(stub: pb_grpc.FollowServiceAsyncStub, user: str, *targets: str) -> None:
    await stub.Unfollow(pb.UnfollowRequest(user_id=user, target_ids=list(targets)))


async def test_webhooks_have_the_hosted_services_url_sign_and_bodies(
    make_service: ServiceFactory, receiver: Receiver
) -> None:
    """A Follow call is one Follow.CallbackAfterFollowAdd listing only the targets really
    followed; an Unfollow one CallbackAfterFollowDelete with the edges removed; the query
    has SdkAppid, CallbackCommand, contenttype=json, the caller's IP, OptPlatform=gRPC,
    RequestTime and Sign = sha256(token + RequestTime); EventTime is the call's time in ms.
    Calls that change nothing and account deletions send nothing."""
    service = await webhook_service(make_service, receiver)
    before_ms = int(time.time() * 1000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = pb_grpc.FollowServiceStub(channel)
        accounts = pb_grpc.AccountServiceStub(channel)
        await import_users(accounts, "a", "b", "c", "d")
        await follow(stub, "a", "b", "ghost", "c")
        await follow(stub, "a", "b")  # already followed: no change, no webhook
        await unfollow(stub, "a", "c", "d")  # only a->c existed
        await accounts.DeleteAccounts(pb.DeleteAccountsRequest(user_ids=["d"]))
        await follow(stub, "b", "a")
    await until(lambda: len(receiver.delivered) == 3, what="three webhooks")
    await asyncio.sleep(1.0)  # nothing more comes (the no-op follow, the deletion)
    after_ms = int(time.time() * 1000)
    assert len(receiver.received) == 3
    add, delete, back = sorted(receiver.delivered, key=lambda r: (r.body["From_Account"], r.at))
    assert add.body == {
        "CallbackCommand": FOLLOW_ADD,
        "From_Account": "a",
        "FollowList": [{"To_Account": "b"}, {"To_Account": "c"}],
        "EventTime": add.body["EventTime"],
    }
    assert list(add.body) == ["CallbackCommand", "From_Account", "FollowList", "EventTime"]
    assert delete.body == {
        "CallbackCommand": FOLLOW_DELETE,
        "From_Account": "a",
        "To_Account": ["c"],
        "EventTime": delete.body["EventTime"],
    }
    assert back.body["FollowList"] == [{"To_Account": "a"}]
    assert before_ms <= add.body["EventTime"] <= delete.body["EventTime"] <= after_ms
    for r in receiver.received:
        assert r.path == "/hook"
        q = r.query
        assert list(q) == [
            "SdkAppid",
            "CallbackCommand",
            "contenttype",
            "ClientIP",
            "OptPlatform",
            "RequestTime",
            "Sign",
        ]
        assert (q["SdkAppid"], q["contenttype"]) == (str(APP), "json")
        assert q["CallbackCommand"] == r.body["CallbackCommand"]
        assert (q["ClientIP"], q["OptPlatform"]) == ("127.0.0.1", "gRPC")
        assert abs(int(q["RequestTime"]) - time.time()) < 120
        expected = hashlib.sha256(f"{TOKEN}{q['RequestTime']}".encode()).hexdigest()
        assert q["Sign"] == expected
    url = receiver.url
    assert metric(service, "follow_webhook_delivered_total", url) == 3
    assert metric(service, "follow_webhook_events_total", url, kind="follow") == 2
    assert metric(service, "follow_webhook_events_total", url, kind="unfollow") == 1
    assert metric(service, "follow_webhook_events_total", url, kind="account_deleted") == 1
    lag = service.metrics.registry.get_sample_value(
        "follow_webhook_delivery_lag_seconds_count", {"url": url_label(url)}
    )
    assert lag == 3


async def test_v4_calls_say_restapi_and_no_token_means_no_sign(
    make_service: ServiceFactory, make_shim: ShimFactory, receiver: Receiver
) -> None:
    """A follow through the v4 door is reported with OptPlatform=RESTAPI and the HTTP
    client's address; without a token the query has no RequestTime or Sign."""
    service = await webhook_service(make_service, receiver, callback_token=None)
    v4 = await make_shim(service)
    await v4.import_users("a", "b")
    await v4.ok("follow_add", {"From_Account": "a", "FollowItem": [{"To_Account": "b"}]})
    await v4.ok("follow_delete", {"From_Account": "a", "To_Account": ["b"]})
    await until(lambda: len(receiver.delivered) == 2, what="two webhooks")
    add, delete = receiver.delivered
    assert (add.body["CallbackCommand"], delete.body["CallbackCommand"]) == (
        FOLLOW_ADD,
        FOLLOW_DELETE,
    )
    assert delete.body["To_Account"] == ["b"]
    for r in receiver.delivered:
        assert (r.query["ClientIP"], r.query["OptPlatform"]) == ("127.0.0.1", "RESTAPI")
        assert "Sign" not in r.query
        assert "RequestTime" not in r.query


async def _busy_writers(port: int, users: list[str], rounds: int) -> dict[str, list[str]]:
    """Each user follows then unfollows a distinct target per round, concurrently across
    users; returns each user's expected webhook commands+targets in commit order."""
    expected: dict[str, list[str]] = {u: [] for u in users}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.FollowServiceStub(channel)
        targets = [f"t{i}" for i in range(rounds)]
        await import_users(pb_grpc.AccountServiceStub(channel), *users, *targets)

        async def one(user: str) -> None:
            for i, target in enumerate(targets):
                await follow(stub, user, target)
                expected[user].append(f"add {target}")
                if i % 2:
                    await unfollow(stub, user, target)
                    expected[user].append(f"delete {target}")

        await asyncio.gather(*(one(u) for u in users))
    return expected


def _seen(receiver: Receiver, user: str) -> list[str]:
    out = []
    for body in receiver.delivered_for(user):
        if body["CallbackCommand"] == FOLLOW_ADD:
            out.append(f"add {body['FollowList'][0]['To_Account']}")
        else:
            out.append(f"delete {body['To_Account'][0]}")
    return out


async def test_receiver_errors_then_recovery_deliver_everything_in_order(
    make_service: ServiceFactory, receiver: Receiver
) -> None:
    """The receiver answers 500 to everything for a while: each webhook is retried with
    backoff, and once it answers 200 every webhook arrives, each user's in commit order
    (a user's next webhook never overtakes one still being retried), none twice."""
    failing = True
    receiver.answer = lambda body: 500 if failing else 200
    service = await webhook_service(make_service, receiver)
    users = [f"u{i}" for i in range(5)]
    expected = await _busy_writers(service.port, users, rounds=6)
    await until(lambda: len(receiver.received) >= 20, what="some failed tries")
    assert receiver.delivered == []
    failing = False
    total = sum(len(v) for v in expected.values())
    await until(lambda: len(receiver.delivered) >= total, what=f"{total} webhooks")
    await asyncio.sleep(0.5)
    for user in users:
        assert _seen(receiver, user) == expected[user]
    assert metric(service, "follow_webhook_retried_total", receiver.url) >= 20
    assert metric(service, "follow_webhook_delivered_total", receiver.url) == total


async def test_receiver_down_then_back_gets_everything_in_order(
    make_service: ServiceFactory, receiver: Receiver
) -> None:
    """With the receiver's port closed (connection refused) while users write, nothing is
    lost: when it listens again every webhook arrives, in commit order per user."""
    service = await webhook_service(make_service, receiver)
    await receiver.stop()
    users = [f"u{i}" for i in range(4)]
    expected = await _busy_writers(service.port, users, rounds=5)
    await asyncio.sleep(1.5)  # retries against a closed port
    assert metric(service, "follow_webhook_retried_total", receiver.url) > 0
    await receiver.start()
    total = sum(len(v) for v in expected.values())
    await until(lambda: len(receiver.delivered) >= total, what=f"{total} webhooks")
    await asyncio.sleep(0.5)
    for user in users:
        assert _seen(receiver, user) == expected[user]
    assert len(receiver.delivered) == total


async def test_a_slow_receiver_is_given_up_on_after_the_timeout_and_retried(
    make_service: ServiceFactory, receiver: Receiver
) -> None:
    """A receiver slower than --callback-timeout counts as a failure: the webhook is sent
    again and arrives once the receiver is quick."""
    receiver.delay = 1.5
    service = await webhook_service(make_service, receiver, callback_timeout=0.3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        await import_users(pb_grpc.AccountServiceStub(channel), "a", "b")
        await follow(pb_grpc.FollowServiceStub(channel), "a", "b")
    await until(
        lambda: metric(service, "follow_webhook_retried_total", receiver.url) >= 2,
        what="timed-out tries",
    )
    receiver.delay = 0
    await until(lambda: len(receiver.delivered) >= 1 and receiver.delay == 0, what="delivery")
    assert receiver.delivered[-1].body["FollowList"] == [{"To_Account": "b"}]


async def test_requests_per_url_are_bounded_by_the_concurrency(
    make_service: ServiceFactory, receiver: Receiver
) -> None:
    """With --callback-concurrency 2 and a slow receiver, webhooks of many users go out two
    at a time: never more on the wire at once, and that many are."""
    receiver.delay = 0.2
    service = await webhook_service(make_service, receiver, callback_concurrency=2)
    users = [f"c{i}" for i in range(8)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        await import_users(pb_grpc.AccountServiceStub(channel), *users, "t")
        stub = pb_grpc.FollowServiceStub(channel)
        await asyncio.gather(*(follow(stub, u, "t") for u in users))
    peak = 0
    async with asyncio.timeout(30):
        while len(receiver.delivered) < len(users):
            peak = max(peak, receiver.arrived - len(receiver.received))
            await asyncio.sleep(0.01)
    assert peak == 2


async def test_parked_after_the_retry_budget_and_the_user_moves_on(
    make_service: ServiceFactory, receiver: Receiver, db_url: str
) -> None:
    """A webhook the receiver keeps refusing is parked once the retry budget is spent:
    kept in webhook_deliveries with parked_at and its last error, counted, and the same
    user's next webhook is then delivered."""
    receiver.answer = lambda body: 500 if body.get("FollowList") == [{"To_Account": "b"}] else 200
    service = await webhook_service(make_service, receiver, callback_retry_budget=1.0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = pb_grpc.FollowServiceStub(channel)
        await import_users(pb_grpc.AccountServiceStub(channel), "a", "b", "c")
        await follow(stub, "a", "b")
        await follow(stub, "a", "c")
    await until(lambda: len(receiver.delivered) == 1, what="the next webhook after parking")
    assert receiver.delivered[0].body["FollowList"] == [{"To_Account": "c"}]
    refused = [r for r in receiver.received if r.status == 500]
    assert len(refused) >= 2
    assert max(r.at for r in refused) < receiver.delivered[0].at  # in order: parked first
    assert metric(service, "follow_webhook_parked_total", receiver.url) == 1
    conn = await asyncpg.connect(db_url)
    try:
        # The receiver has the request before the sender has its answer and deletes the row.
        query = "SELECT user_id, body, last_error, parked_at FROM webhook_deliveries"

        async def only_the_parked_one_left() -> bool:
            return len(await conn.fetch(query)) == 1

        await until(only_the_parked_one_left, what="the delivered row deleted")
        rows = await conn.fetch(query)
    finally:
        await conn.close()
    assert len(rows) == 1
    assert rows[0]["user_id"] == "a"
    assert '"To_Account":"b"' in rows[0]["body"]
    assert rows[0]["last_error"] == "HTTP 500"
    assert rows[0]["parked_at"] is not None


async def test_two_servers_on_one_database_deliver_each_webhook_once(
    make_service: ServiceFactory, receiver: Receiver
) -> None:
    """Two servers with the same callback URL on one database (as --workers or a second
    host would): one feeder queues each event once, the senders' leased claims let only one
    of them send it, so every webhook arrives exactly once, each user's in order."""
    first = await webhook_service(make_service, receiver)
    second = await webhook_service(make_service, receiver)
    users = [f"u{i}" for i in range(6)]
    expected = await _busy_writers(first.port, users[:3], rounds=6)
    expected |= await _busy_writers(second.port, users[3:], rounds=6)
    total = sum(len(v) for v in expected.values())
    await until(lambda: len(receiver.delivered) >= total, what=f"{total} webhooks")
    await asyncio.sleep(1.0)
    keys = [r.key for r in receiver.received]
    assert len(keys) == len(set(keys)) == total
    for user in users:
        assert _seen(receiver, user) == expected[user]
    sent = [metric(s, "follow_webhook_delivered_total", receiver.url) for s in (first, second)]
    assert sum(sent) == total


@pytest.mark.timeout(240)
async def test_kill_9_between_write_and_delivery_loses_nothing(
    receiver: Receiver, db_url: str
) -> None:
    """The server is killed (SIGKILL) after acknowledging writes whose webhooks have not
    been delivered (the receiver is down; one request is on the wire when it dies): a new
    server on the same database delivers every one of them, in order per user. The one sent
    while the server died may arrive twice: the crash window of at-least-once."""
    args = [
        "--database-url",
        db_url,
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "",
        "--sdkappid",
        str(APP),
        "--callback-url",
        receiver.url,
        "--callback-timeout",
        "1",
        "--callback-backoff-min",
        "0.05",
        "--callback-backoff-max",
        "0.3",
    ]
    users = ["a", "b", "c"]
    receiver.delay = 30  # the first request hangs: in flight at the kill
    async with follow_server(*args) as server:
        port = int((await server.wait_for(r"gRPC listening on \S+:(\d+)")).group(1))
        expected = await _busy_writers(port, users, rounds=4)
        await asyncio.sleep(0.5)
        os.kill(server.process.pid, signal.SIGKILL)
        await server.process.wait()
    receiver.delay = 0
    assert receiver.delivered == []  # the hanging requests never got their answer
    total = sum(len(v) for v in expected.values())
    async with follow_server(*args) as server:
        await server.wait_for(r"gRPC listening")
        # The killed server's lease (10 s + (PREFETCH + 1) x timeout) must run out first.
        await until(lambda: len(receiver.delivered) >= total, within=120, what="after restart")
    for user in users:
        assert _seen(receiver, user) == expected[user]


@pytest.mark.timeout(240)
async def test_workers_deliver_each_webhook_once_in_order(receiver: Receiver, db_url: str) -> None:
    """`--workers 2`: two processes each run a feeder (one works) and senders racing for the
    same users' webhooks; every webhook arrives exactly once, each user's in commit order."""
    args = [
        "--database-url",
        db_url,
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "",
        "--workers",
        "2",
        "--sdkappid",
        str(APP),
        "--callback-url",
        receiver.url,
    ]
    users = [f"u{i}" for i in range(6)]
    async with follow_server(*args) as server:
        port = int(
            (await server.wait_for(r"worker \d+ \(pid \d+\): gRPC listening on \S+:(\d+)")).group(1)
        )
        await until(
            lambda: sum("gRPC listening" in line for line in server.lines) >= 2,
            what="both workers listening",
        )
        expected = await _busy_writers(port, users, rounds=6)
        total = sum(len(v) for v in expected.values())
        await until(lambda: len(receiver.delivered) >= total, within=120, what=f"{total}")
        await asyncio.sleep(1.0)
    keys = [r.key for r in receiver.received]
    assert len(keys) == len(set(keys)) == total
    for user in users:
        assert _seen(receiver, user) == expected[user]


async def test_lost_database_connections_are_survived(
    make_service: ServiceFactory, receiver: Receiver, db_url: str
) -> None:
    """Every connection of the delivery side is cut (as a database restart does) while the
    receiver is down: the feeder and senders reconnect, and every webhook still arrives in
    order once the receiver is back."""
    service = await webhook_service(make_service, receiver)
    await receiver.stop()
    users = ["a", "b"]
    expected = await _busy_writers(service.port, users, rounds=4)
    conn = await asyncpg.connect(db_url)
    try:
        cut = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    assert cut > 0
    await receiver.start()
    total = sum(len(v) for v in expected.values())
    await until(lambda: len(receiver.delivered) >= total, within=120, what=f"{total} webhooks")
    for user in users:
        assert _seen(receiver, user) == expected[user]


async def test_a_clean_stop_finishes_the_request_on_the_wire(
    receiver: Receiver, db_url: str
) -> None:
    """Stopping the service (SIGTERM's path) while a webhook is on the wire lets it finish
    within the request timeout and records the 2xx: a server started next on the same
    database sends nothing again."""
    settings = Settings(
        grpc_listen="127.0.0.1:0",
        sdkappid=APP,
        callback_urls=(receiver.url,),
        callback_timeout=5.0,
    )
    receiver.delay = 1.0
    service = await start_service(settings, db_url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            await import_users(pb_grpc.AccountServiceStub(channel), "a", "b")
            await follow(pb_grpc.FollowServiceStub(channel), "a", "b")
        await until(lambda: receiver.arrived == 1, what="the request on the wire")
    finally:
        await service.stop(0)
    assert len(receiver.delivered) == 1
    receiver.delay = 0
    again = await start_service(settings, db_url)
    try:
        await asyncio.sleep(1.5)
    finally:
        await again.stop(0)
    assert receiver.arrived == 1
