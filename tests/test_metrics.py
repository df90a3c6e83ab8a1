"""Prometheus metrics scraped over real HTTP from `--metrics-listen` after real gRPC calls."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from TLSSigAPIv2 import TLSSigAPIv2

from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from server.app import RunningService
from server.config import Settings
from server.metrics import Metrics
from server.v4.commands import COMMANDS
from server.v4.http import start_shim
from server.v4.observe import error_code
from tests.conftest import ServiceFactory
from tests.helpers import import_users

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> tuple[str, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        return response.headers["Content-Type"], await response.text()


async def settled(port: int) -> Samples:
    """A scrape taken once no gRPC call is in flight: the server finishes its bookkeeping
    just after the caller has its answer, so poll briefly for that moment."""
    for _ in range(100):
        got = samples((await scrape(port))[1])
        if value(got, "follow_grpc_in_flight") == 0:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError("gRPC calls still in flight after 5 s")


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(all_samples: Samples, name: str, **labels: str) -> float:
    return all_samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
async def observed(make_service: ServiceFactory) -> RunningService:
    service = await make_service(metrics_listen="127.0.0.1:0")
    assert service.metrics_server is not None
    return service


async def test_scrape_counts_calls_and_errors_by_code_and_reason(
    observed: RunningService,
) -> None:
    """After real calls the scrape shows per-method counts by status code, errors by code and
    ErrorInfo reason, and a latency histogram with one observation per call."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{observed.port}") as channel:
        follows, accounts = pb_grpc.FollowServiceStub(channel), pb_grpc.AccountServiceStub(channel)
        await import_users(accounts, "a", "b")
        await follows.Follow(pb.FollowRequest(user_id="a", target_ids=["b"]))
        await follows.Follow(pb.FollowRequest(user_id="b", target_ids=["a"]))
        for bad in ("", "x" * 40):
            with pytest.raises(grpc.aio.AioRpcError):
                await follows.Follow(pb.FollowRequest(user_id=bad, target_ids=["b"]))
        with pytest.raises(grpc.aio.AioRpcError):
            await follows.List(pb.ListRequest(user_id="nobody", follow_type=pb.FOLLOW_TYPE_FAN))
    assert observed.metrics_server is not None
    content_type, _ = await scrape(observed.metrics_server.port)
    assert content_type.startswith("text/plain")
    got = await settled(observed.metrics_server.port)
    svc = "follow.v1.FollowService"
    assert value(got, "follow_grpc_requests_total", service=svc, method="Follow", code="OK") == 2
    assert (
        value(
            got, "follow_grpc_requests_total", service=svc, method="Follow", code="INVALID_ARGUMENT"
        )
        == 2
    )
    assert (
        value(
            got,
            "follow_grpc_errors_total",
            service=svc,
            method="Follow",
            code="INVALID_ARGUMENT",
            reason="INVALID_USER_ID",
        )
        == 2
    )
    assert (
        value(
            got,
            "follow_grpc_errors_total",
            service=svc,
            method="List",
            code="NOT_FOUND",
            reason="USER_NOT_FOUND",
        )
        == 1
    )
    assert (
        value(
            got,
            "follow_grpc_requests_total",
            service="follow.v1.AccountService",
            method="ImportAccounts",
            code="OK",
        )
        == 1
    )
    assert (
        value(got, "follow_grpc_request_duration_seconds_count", service=svc, method="Follow") == 4
    )
    assert (
        value(
            got,
            "follow_grpc_request_duration_seconds_bucket",
            service=svc,
            method="Follow",
            le="+Inf",
        )
        == 4
    )
    assert value(got, "follow_grpc_in_flight") == 0


async def test_scrape_shows_pool_usage_and_database_health(observed: RunningService) -> None:
    """Pool size, in-use and idle connections add up, the maximum is the configured pool
    size, and database health reads 1 once the health probe has run."""
    assert observed.metrics_server is not None
    for _ in range(50):
        got = samples((await scrape(observed.metrics_server.port))[1])
        if value(got, "follow_db_up") == 1:
            break
        await asyncio.sleep(0.05)
    assert value(got, "follow_db_up") == 1
    size = value(got, "follow_db_pool_size")
    assert size >= 1
    assert value(got, "follow_db_pool_in_use") + value(got, "follow_db_pool_idle") == size
    assert value(got, "follow_db_pool_max") == 10


async def test_pool_in_use_counts_checked_out_connections(observed: RunningService) -> None:
    """A connection held by someone shows as in use, and idle again once released."""
    assert observed.metrics_server is not None
    async with observed.pool.acquire():
        got = samples((await scrape(observed.metrics_server.port))[1])
        assert value(got, "follow_db_pool_in_use") >= 1
    got = samples((await scrape(observed.metrics_server.port))[1])
    assert value(got, "follow_db_pool_in_use") == 0


async def test_malformed_request_counts_as_invalid_argument(observed: RunningService) -> None:
    """A request that is not valid protobuf is counted as INVALID_ARGUMENT with reason
    INVALID_ARGUMENT, not as an INTERNAL error."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{observed.port}") as channel:
        call = channel.unary_unary(
            "/follow.v1.FollowService/Follow",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"\x0a\x02\xff\xfe")  # field 1 (user_id): two bytes of invalid UTF-8
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert observed.metrics_server is not None
    got = await settled(observed.metrics_server.port)
    assert (
        value(
            got,
            "follow_grpc_errors_total",
            service="follow.v1.FollowService",
            method="Follow",
            code="INVALID_ARGUMENT",
            reason="INVALID_ARGUMENT",
        )
        == 1
    )


async def test_unknown_methods_do_not_become_labels(observed: RunningService) -> None:
    """Calls to methods the server does not have are UNIMPLEMENTED and add no series, so a
    caller cannot grow the metrics without bound."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{observed.port}") as channel:
        call = channel.unary_unary(
            "/follow.v1.FollowService/DropTables",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"")
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert observed.metrics_server is not None
    assert "DropTables" not in (await scrape(observed.metrics_server.port))[1]


def test_v4_commands_are_counted_with_bounded_labels() -> None:
    """The shim's API: known commands are labelled by name, anything else folds into
    'other'; a non-zero ErrorCode is also an error."""
    metrics = Metrics()
    metrics.add_v4_commands(COMMANDS)
    metrics.observe_v4("/v4/follow/follow_add", 0, 0.002)
    metrics.observe_v4("follow/follow_add", 30001, 0.001)
    metrics.observe_v4("/v4/follow/../../etc/passwd", 60009, 0.001)
    got = samples(metrics.exposition().decode())
    assert value(got, "follow_v4_requests_total", command="follow/follow_add", error_code="0") == 1
    assert (
        value(got, "follow_v4_errors_total", command="follow/follow_add", error_code="30001") == 1
    )
    assert value(got, "follow_v4_errors_total", command="other", error_code="60009") == 1
    assert value(got, "follow_v4_request_duration_seconds_count", command="follow/follow_add") == 2
    assert "passwd" not in metrics.exposition().decode()


async def test_metrics_are_off_by_default(service: RunningService) -> None:
    """Without --metrics-listen no HTTP port is opened."""
    assert service.metrics_server is None


APP = 1400000002
KEY = "metrics-test-key-0123456789abcdef"


def v4_query() -> dict[str, str]:
    return {
        "sdkappid": str(APP),
        "identifier": "administrator",
        "usersig": TLSSigAPIv2(APP, KEY).gen_sig("administrator"),
        "random": "7",
        "contenttype": "json",
    }


async def test_v4_commands_are_counted_after_real_http_calls(observed: RunningService) -> None:
    """The in-process v4 shim records each answered command with its v4 ErrorCode and
    latency on the service's metrics page; unknown commands are 'other'."""
    settings = Settings(http_listen="127.0.0.1:0", sdkappid=APP, secret_key=KEY)
    shim = await start_shim(settings, observed.core, observed.metrics)
    try:
        base = f"http://127.0.0.1:{shim.port}/v4"
        async with aiohttp.ClientSession() as session:
            for path, body in [
                ("im_open_login_svc/account_check", b'{"CheckItem": [{"UserID": "a"}]}'),
                ("im_open_login_svc/account_check", b"{"),
                ("follow/follow_add", b'{"From_Account": 5}'),
                ("follow/no_such_command", b"{}"),
            ]:
                async with session.post(f"{base}/{path}", params=v4_query(), data=body) as resp:
                    assert resp.status == 200
                    await resp.read()
    finally:
        await shim.stop()
    assert observed.metrics_server is not None
    got = samples((await scrape(observed.metrics_server.port))[1])
    check = "im_open_login_svc/account_check"
    assert value(got, "follow_v4_requests_total", command=check, error_code="0") == 1
    assert value(got, "follow_v4_errors_total", command=check, error_code="60003") == 1
    assert (
        value(got, "follow_v4_errors_total", command="follow/follow_add", error_code="60015") == 1
    )
    assert value(got, "follow_v4_errors_total", command="other", error_code="60009") == 1
    assert value(got, "follow_v4_request_duration_seconds_count", command=check) == 2


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"ActionStatus":"FAIL","ErrorCode":30001,"ErrorInfo":"x","ErrorDisplay":""}', 30001),
        (b'{"ResultItem":[],"ActionStatus":"OK","ErrorCode":0}', 0),
        (b'{"Nick":"{\\"ActionStatus\\":\\"FAIL\\",\\"ErrorCode\\":1","ActionStatus":"OK"}', 0),
        (None, 0),
    ],
    ids=["fail", "ok", "fail-lookalike-in-a-value", "no-body"],
)
def test_v4_error_code_is_read_from_the_envelope(body: bytes | None, code: int) -> None:
    """Only a real failure envelope counts as an error; text inside a JSON string cannot
    pass for one (its quotes are escaped)."""
    assert error_code(body) == code
