"""Structured logs and request ids: in-process over a real channel, and the real
`follow-server` process with `--log-format json`; the secret key never in logs or metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys

import aiohttp
import grpc
import pytest
from TLSSigAPIv2 import TLSSigAPIv2

from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from server import logs
from server.app import RunningService
from server.config import Settings
from server.v4.http import start_shim
from tests.helpers import follow_server

SECRET = "k3y-N3VER-L0GGED-5f1e2d9c7b"


async def _interceptor_records(
    caplog: pytest.LogCaptureFixture, count: int
) -> list[logging.LogRecord]:
    """The interceptor's records once there are `count` of them: the server logs a call's
    line just after the caller has its answer, so poll briefly."""
    for _ in range(100):
        records = [r for r in caplog.records if r.name == "server.interceptor"]
        if len(records) >= count:
            return records
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {count} interceptor records, got {len(records)}")


async def test_request_id_from_metadata_is_on_the_calls_log_lines(
    service: RunningService, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller's x-request-id is stamped on the call's log records and sent back in the
    response's initial metadata."""
    caplog.set_level(logging.DEBUG, logger="server.interceptor")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        call = pb_grpc.FollowServiceStub(channel).Follow(
            pb.FollowRequest(user_id="", target_ids=["b"]),
            metadata=((logs.REQUEST_ID_HEADER, "req-abc.123"),),
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        assert (logs.REQUEST_ID_HEADER, "req-abc.123") in tuple(await call.initial_metadata() or ())
    records = await _interceptor_records(caplog, 1)
    assert {getattr(r, "request_id", None) for r in records} == {"req-abc.123"}
    assert "INVALID_ARGUMENT INVALID_USER_ID" in records[-1].getMessage()


@pytest.mark.parametrize(
    "offered",
    [None, "", "has space", "x" * 129],
    ids=["absent", "empty", "space", "too-long"],
)
async def test_missing_or_unusable_request_id_is_replaced(
    service: RunningService, caplog: pytest.LogCaptureFixture, offered: str | None
) -> None:
    """Without a usable x-request-id (absent, empty, with spaces, over 128 characters; gRPC
    itself refuses non-ASCII values) the server makes a fresh 32-hex id rather than echoing
    the caller's text into logs."""
    caplog.set_level(logging.DEBUG, logger="server.interceptor")
    metadata = () if offered is None else ((logs.REQUEST_ID_HEADER, offered),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        call = pb_grpc.AccountServiceStub(channel).CheckAccounts(
            pb.CheckAccountsRequest(user_ids=["a"]), metadata=metadata
        )
        await call
        echoed = dict(await call.initial_metadata() or ())[logs.REQUEST_ID_HEADER]
    assert re.fullmatch(r"[0-9a-f]{32}", str(echoed))
    records = await _interceptor_records(caplog, 1)
    assert {getattr(r, "request_id", None) for r in records} == {echoed}


async def test_concurrent_calls_keep_their_own_request_ids(
    service: RunningService, caplog: pytest.LogCaptureFixture
) -> None:
    """Request ids live in a context variable per call: 20 interleaved calls never see each
    other's id."""
    caplog.set_level(logging.DEBUG, logger="server.interceptor")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = pb_grpc.AccountServiceStub(channel)
        await asyncio.gather(
            *(
                stub.CheckAccounts(
                    pb.CheckAccountsRequest(user_ids=[f"user{i}"]),
                    metadata=((logs.REQUEST_ID_HEADER, f"rid-{i}"),),
                )
                for i in range(20)
            )
        )
    seen = [str(getattr(r, "request_id", None)) for r in await _interceptor_records(caplog, 20)]
    assert sorted(seen) == sorted(f"rid-{i}" for i in range(20))


def _record(message: str, request_id: str | None) -> logging.LogRecord:
    logs.install_record_factory()
    token = logs.request_id.set(request_id)
    try:
        return logging.getLogger("server.test").makeRecord(
            "server.test", logging.WARNING, __file__, 1, message, (), None
        )
    finally:
        logs.request_id.reset(token)


def test_json_formatter_writes_one_object_per_line() -> None:
    """The JSON line has time, level, logger, message and request_id; a newline in a
    message is escaped, so it cannot forge a second log line."""
    line = logs.JsonFormatter().format(_record("first\nsecond", "rid-1"))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "first\nsecond"
    assert entry["request_id"] == "rid-1"
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "server.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["time"])


def test_json_formatter_includes_exceptions_and_omits_absent_ids() -> None:
    """Outside a call there is no request_id key; an exception's traceback is one field."""
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = _record("failed", None)
        record.exc_info = sys.exc_info()
    entry = json.loads(logs.JsonFormatter().format(record))
    assert "request_id" not in entry
    assert "RuntimeError: boom" in entry["exception"]


def test_text_formatter_shows_the_request_id_in_brackets() -> None:
    """Text lines carry `[request id]` after the logger name, and nothing outside a call."""
    assert "server.test [rid-7]: hello" in logs.TextFormatter().format(_record("hello", "rid-7"))
    assert "server.test: hello" in logs.TextFormatter().format(_record("hello", None))


async def test_json_logs_from_the_real_server_and_no_secret_anywhere(db_url: str) -> None:
    """`follow-server --log-format json` writes only JSON lines; a call's lines carry its
    x-request-id. Started with a known secret key, after failing gRPC calls, malformed
    requests and badly signed or malformed v4 calls, the key appears neither
    in any log line nor on the metrics page."""
    async with follow_server(
        "--database-url",
        db_url,
        "--grpc-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--sdkappid",
        "1400000001",
        "--secret-key",
        SECRET,
        "--log-format",
        "json",
        "--log-level",
        "DEBUG",
    ) as server:
        grpc_port = int((await server.wait_for(r"gRPC listening on 127\.0\.0\.1:(\d+)")).group(1))
        metrics_port = int((await server.wait_for(r"metrics on http://[^:]+:(\d+)/")).group(1))
        # The shim starts after gRPC and metrics: wait for its line too, don't just look.
        http = await server.wait_for(r"v4 shim listening on http://127\.0\.0\.1:(\d+)")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            follows = pb_grpc.FollowServiceStub(channel)
            for user in ("", SECRET, "x" * 100):
                with pytest.raises(grpc.aio.AioRpcError):
                    await follows.Follow(
                        pb.FollowRequest(user_id=user, target_ids=["b"]),
                        metadata=((logs.REQUEST_ID_HEADER, "json-rid-1"),),
                    )
            raw = channel.unary_unary(
                "/follow.v1.FollowService/Follow",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            with pytest.raises(grpc.aio.AioRpcError):
                await raw(b"\x0a\x01\xff")
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{http.group(1)}/v4/follow/follow_add"
            valid = TLSSigAPIv2(1400000001, SECRET).gen_sig("administrator")
            bodies = [b"{", b'{"From_Account": 5}', b'{"From_Account": "a", "To_Account": []}']
            for usersig, body in [("garbage", b"{}"), (SECRET, b"{}"), ("", b"{}")] + [
                (valid, b) for b in bodies
            ]:
                query = {
                    "sdkappid": "1400000001",
                    "identifier": "administrator",
                    "usersig": usersig,
                    "random": "1",
                    "contenttype": "json",
                }
                async with session.post(base, params=query, data=body) as response:
                    answer = await response.json(content_type=None)
                    assert answer["ErrorCode"] != 0
                    assert SECRET not in json.dumps(answer)
            async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                page = await response.text()
        await server.wait_for(r"json-rid-1")
    assert server.process.returncode == 0
    entries = [json.loads(line) for line in server.lines if line.strip()]
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    assert any(
        e.get("request_id") == "json-rid-1" and "INVALID_USER_ID" in e["message"] for e in entries
    )
    assert "follow_grpc_requests_total" in page
    assert SECRET not in server.text()
    assert SECRET not in page


V4_APP = 1400000003


async def _post_v4(port: int, request_id: str | None) -> aiohttp.ClientResponse:
    query = {
        "sdkappid": str(V4_APP),
        "identifier": "administrator",
        "usersig": TLSSigAPIv2(V4_APP, SECRET).gen_sig("administrator"),
        "random": "1",
        "contenttype": "json",
    }
    headers = {"X-Request-Id": request_id} if request_id else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/v4/im_open_login_svc/account_check",
            params=query,
            data=b'{"CheckItem": [{"UserID": "a"}]}',
            headers=headers,
        ) as response,
    ):
        assert (await response.json(content_type=None))["ErrorCode"] == 0
        return response


async def test_v4_shim_echoes_or_makes_a_request_id(service: RunningService) -> None:
    """The shim answers with the caller's X-Request-Id, or a fresh one when none is given."""
    settings = Settings(http_listen="127.0.0.1:0", sdkappid=V4_APP, secret_key=SECRET)
    shim = await start_shim(settings, service.core)
    try:
        given = await _post_v4(shim.port, "v4-rid-1")
        assert given.headers["X-Request-Id"] == "v4-rid-1"
        made = await _post_v4(shim.port, None)
        assert re.fullmatch(r"[0-9a-f]{32}", made.headers["X-Request-Id"])
    finally:
        await shim.stop()


async def test_v4_shim_passes_its_request_id_to_the_grpc_server(
    service: RunningService, caplog: pytest.LogCaptureFixture
) -> None:
    """A shim running against a gRPC server (--grpc-target) forwards the HTTP request's id
    as x-request-id metadata: the gRPC server's log line for that call carries it."""
    caplog.set_level(logging.DEBUG, logger="server.interceptor")
    settings = Settings(
        http_listen="127.0.0.1:0",
        grpc_target=f"127.0.0.1:{service.port}",
        sdkappid=V4_APP,
        secret_key=SECRET,
    )
    shim = await start_shim(settings)
    try:
        await _post_v4(shim.port, "v4-rid-2")
    finally:
        await shim.stop()
    records = await _interceptor_records(caplog, 1)
    assert [getattr(r, "request_id", None) for r in records] == ["v4-rid-2"]
    assert "CheckAccounts OK" in records[0].getMessage()
