"""server.app and the command line: health, reflection, graceful stop, and the real CLI in a
subprocess over its embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace

import asyncpg
import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from server.app import (
    HEALTH_INTERVAL_SECONDS,
    MAX_RECEIVE_BYTES,
    RunningService,
    largest_valid_request_bytes,
    start_service,
)
from server.config import Settings
from server.database import Database, open_database
from tests.conftest import ServiceFactory
from tests.helpers import error_info, import_users

ROOT = Path(__file__).resolve().parent.parent
FOLLOW_METHODS = {"Follow", "Unfollow", "List", "Check", "GetInfo"}
ACCOUNT_METHODS = {"ImportAccounts", "CheckAccounts", "DeleteAccounts"}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    status: int = response.status
    return status


async def wait_for_health(
    channel: grpc.aio.Channel, wanted: int, within: float, service: str = ""
) -> None:
    """Poll until the health service reports `wanted` (the monitor runs once a second)."""
    deadline = time.monotonic() + within
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = await health_status(channel, service)
        except grpc.aio.AioRpcError as exc:
            last = exc.code()
        if last == wanted:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"health stayed {last!r}, wanted {wanted}")


async def reflect(
    channel: grpc.aio.Channel, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([request]), timeout=10)
    responses = [r async for r in call]
    assert len(responses) == 1
    return responses[0]


async def reflected_services(channel: grpc.aio.Channel) -> dict[str, set[str]]:
    """Every service the server lists through reflection, with its method names."""
    listed = await reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    services: dict[str, set[str]] = {}
    for service in listed.list_services_response.service:
        found = await reflect(
            channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=service.name)
        )
        protos = found.file_descriptor_response.file_descriptor_proto
        assert protos, service.name
        methods: set[str] = set()
        for raw in protos:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            for s in proto.service:
                if f"{proto.package}.{s.name}" == service.name:
                    methods = {m.name for m in s.method}
        services[service.name] = methods
    return services


# -- health and reflection on the in-process service -------------------------------------------


async def test_health_serving_while_database_answers(channel: grpc.aio.Channel) -> None:
    """grpc.health.v1 reports SERVING for the server as a whole and for both follow.v1
    services while the database answers; an unknown service is NOT_FOUND."""
    await wait_for_health(channel, SERVING, within=10)
    for service in ("follow.v1.FollowService", "follow.v1.AccountService"):
        await wait_for_health(channel, SERVING, within=5, service=service)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health_status(channel, "no.such.Service")
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_services(channel: grpc.aio.Channel) -> None:
    """Server reflection lists follow.v1.FollowService with its five RPCs, the
    AccountService with its three, health and reflection itself."""
    services = await reflected_services(channel)
    assert services["follow.v1.FollowService"] == FOLLOW_METHODS
    assert services["follow.v1.AccountService"] == ACCOUNT_METHODS
    assert "grpc.health.v1.Health" in services
    assert "grpc.reflection.v1alpha.ServerReflection" in services
    assert services["grpc.reflection.v1.ServerReflection"] == {"ServerReflectionInfo"}


class ReflectionV1Database(ProtoReflectionDescriptorDatabase):  # type: ignore[misc]
    """grpcio-reflection's reflection client (a DescriptorDatabase over the server's
    reflection service, as grpcurl is) asking grpc.reflection.v1, the stable version newer
    tools ask for first. The two versions differ only in their package name, so the
    v1alpha messages carry v1 on the wire."""

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)
        self._stub = SimpleNamespace(
            ServerReflectionInfo=channel.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
        )


def _grpcurl_style(port: int) -> tuple[list[str], str, str, str]:
    """What `grpcurl -plaintext 127.0.0.1:PORT list` and two calls made from reflected
    descriptors alone (no generated code) see, over reflection v1."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ReflectionV1Database(channel)
        services = sorted(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        follow = pool.FindServiceByName("follow.v1.FollowService").methods_by_name["Follow"]
        request = json_format.Parse(
            '{"user_id": "", "target_ids": ["bob"]}',
            message_factory.GetMessageClass(follow.input_type)(),
        )
        call = channel.unary_unary(
            "/follow.v1.FollowService/Follow",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=message_factory.GetMessageClass(follow.output_type).FromString,
        )
        with pytest.raises(grpc.RpcError) as failed:
            call(request, timeout=10)
        error = failed.value
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        assert status is not None
        info = error_details_pb2.ErrorInfo()
        assert status.details[0].Unpack(info)
        check = pool.FindServiceByName("follow.v1.AccountService").methods_by_name["CheckAccounts"]
        answer = channel.unary_unary(
            "/follow.v1.AccountService/CheckAccounts",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=message_factory.GetMessageClass(check.output_type).FromString,
        )(
            json_format.Parse(
                '{"user_ids": ["nobody"]}', message_factory.GetMessageClass(check.input_type)()
            ),
            timeout=10,
        )
        described = pool.FindServiceByName("grpc.reflection.v1.ServerReflection").full_name
        return services, info.reason, json_format.MessageToJson(answer, indent=None), described


async def test_reflection_v1_serves_grpcurl_style_clients(service: RunningService) -> None:
    """grpc.reflection.v1 (not only v1alpha) lists the services, describes them and itself,
    and its descriptors alone are enough to call the contract and read its error details."""
    services, reason, answer, described = await asyncio.to_thread(_grpcurl_style, service.port)
    assert services == sorted(
        [
            "follow.v1.FollowService",
            "follow.v1.AccountService",
            "follow.v1.EventService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
    )
    assert reason == "INVALID_USER_ID"
    assert '"userId": "nobody"' in answer
    assert described == "grpc.reflection.v1.ServerReflection"


async def test_receive_limit_fits_every_valid_request_and_no_more(
    account_stub: pb_grpc.AccountServiceAsyncStub,
) -> None:
    """The gRPC receive limit is over twice the largest valid request (100 accounts with a
    32-byte id and 500-byte nick and face URL, about 105 kB): that request is served, and a
    request just over the limit is refused by gRPC with RESOURCE_EXHAUSTED."""
    largest = largest_valid_request_bytes()
    assert 100_000 < largest < 110_000
    assert 2 * largest <= MAX_RECEIVE_BYTES <= 4 * largest
    longest = "é" * 250  # 500 bytes of UTF-8
    accounts = [
        pb.Account(user_id=f"big-{i:028d}", nick=longest, face_url=longest) for i in range(100)
    ]
    request = pb.ImportAccountsRequest(accounts=accounts)
    assert request.ByteSize() == largest
    response = await account_stub.ImportAccounts(request, timeout=30)
    assert [r.code for r in response.results] == [pb.RESULT_CODE_OK] * 100
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await account_stub.CheckAccounts(
            pb.CheckAccountsRequest(user_ids=["x" * MAX_RECEIVE_BYTES]), timeout=30
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
def pg_folder() -> Iterator[Path]:
    """A folder for an embedded PostgreSQL's data, outside pytest's tmp_path: when running
    as root the server runs as another system user that must traverse every parent, and
    each pytest session that starts elsewhere resets /tmp/pytest-of-<user> to mode 0700."""
    folder = Path(tempfile.mkdtemp(prefix="follow-test-app-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def own_cluster(pg_folder: Path) -> AsyncIterator[Database]:
    """A throwaway embedded PostgreSQL of this test's own, free to be stopped."""
    database = await open_database(None, pg_folder / "data")
    try:
        yield database
    finally:
        await asyncio.to_thread(database.close)


async def test_health_not_serving_when_database_goes_away(own_cluster: Database) -> None:
    """When the database stops, health turns NOT_SERVING within a few monitor intervals,
    and calls answer UNAVAILABLE / DATABASE_UNAVAILABLE instead of hanging or INTERNAL."""
    running = await start_service(Settings(grpc_listen="127.0.0.1:0"), own_cluster.url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            await wait_for_health(channel, SERVING, within=10)
            accounts = pb_grpc.AccountServiceStub(channel)
            await import_users(accounts, "a")
            await asyncio.to_thread(own_cluster.close)  # stop PostgreSQL
            await wait_for_health(channel, NOT_SERVING, within=HEALTH_INTERVAL_SECONDS * 8)
            assert await health_status(channel, "follow.v1.FollowService") == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.FollowServiceStub(channel).Check(
                    pb.CheckRequest(user_id="a", target_ids=["b"]), timeout=20
                )
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            assert error_info(caught.value).reason == "DATABASE_UNAVAILABLE"
            assert "SELECT" not in (caught.value.details() or "")
    finally:
        await running.stop(0)


# -- graceful stop ------------------------------------------------------------------------------


async def _wait_for_lock_waiter(admin: asyncpg.Connection, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        waiting = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the call never reached the database lock")


async def test_graceful_stop_finishes_in_flight_call(
    make_service: ServiceFactory, db_url: str
) -> None:
    """stop(grace) refuses new calls at once but lets a call already in flight (here held
    on a row lock) finish and answer; its write is committed."""
    service: RunningService = await make_service()
    blocker = await asyncpg.connect(db_url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = pb_grpc.FollowServiceStub(channel)
            await import_users(pb_grpc.AccountServiceStub(channel), "a", "b")
            transaction = blocker.transaction()
            await transaction.start()
            await blocker.execute("SELECT 1 FROM follow_counts WHERE user_id = 'a' FOR UPDATE")
            in_flight = asyncio.ensure_future(
                stub.Follow(pb.FollowRequest(user_id="a", target_ids=["b"]), timeout=30)
            )
            await _wait_for_lock_waiter(blocker)
            stopping = asyncio.create_task(service.stop(10))
            await asyncio.sleep(0.5)
            assert not stopping.done()
            assert not in_flight.done()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as fresh:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await pb_grpc.FollowServiceStub(fresh).Check(
                        pb.CheckRequest(user_id="a", target_ids=["b"]), timeout=5
                    )
                assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            await transaction.commit()
            response = await asyncio.wait_for(in_flight, timeout=10)
            assert [r.code for r in response.results] == [pb.RESULT_CODE_OK]
            await asyncio.wait_for(stopping, timeout=10)
        assert await blocker.fetchval(
            "SELECT count(*) FROM following WHERE user_id = 'a' AND target_id = 'b'"
        )
    finally:
        await blocker.close()


# -- the real command line ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _env() -> dict[str, str]:
    """This environment without FOLLOW_* settings, so only the flags given count."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FOLLOW_")}


def test_help_lists_every_documented_flag() -> None:
    """`python -m server --help` documents each flag the issue names, with its FOLLOW_*
    environment variable, and the default listen address and cap."""
    result = subprocess.run(
        [sys.executable, "-m", "server", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=_env(),
        check=True,
    )
    out = " ".join(result.stdout.split())
    for flag, env in (
        ("--grpc-listen", "FOLLOW_GRPC_LISTEN"),
        ("--database-url", "FOLLOW_DATABASE_URL"),
        ("--data-dir", "FOLLOW_DATA_DIR"),
        ("--max-following", "FOLLOW_MAX_FOLLOWING"),
        ("--log-level", "FOLLOW_LOG_LEVEL"),
        ("--db-pool-size", "FOLLOW_DB_POOL_SIZE"),
        ("--grace-seconds", "FOLLOW_GRACE_SECONDS"),
    ):
        assert flag in out, flag
        assert env in out, env
    assert "127.0.0.1:50051" in out
    assert "5000" in out
    assert out.startswith("usage: follow-server")


def test_console_script_exists() -> None:
    """`make install` puts the follow-server console script in .venv/bin."""
    script = Path(sys.executable).parent / "follow-server"
    assert script.exists()
    assert "server.cli" in script.read_text()


async def test_cli_serves_and_stops_on_sigterm(tmp_path: Path, pg_folder: Path) -> None:
    """The real command (`python -m server`) starts an embedded PostgreSQL in --data-dir,
    serves on --grpc-listen (health SERVING, reflection lists the five RPCs, a call works),
    logs where it listens and which database it uses, and on SIGTERM shuts down and exits
    0 within the grace period."""
    port = _free_port()
    log_path = tmp_path / "server.log"
    grace = 5.0
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server",
            "--grpc-listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(pg_folder / "pgdata"),
            "--grace-seconds",
            str(grace),
            "--http-listen",
            "",  # the v4 shim is tested elsewhere; without its keys it refuses to start
            cwd=ROOT,
            env=_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            deadline = time.monotonic() + 120
            while True:
                assert process.returncode is None, log_path.read_text()
                try:
                    if await health_status(channel) == SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                assert time.monotonic() < deadline, log_path.read_text()
                await asyncio.sleep(0.2)
            services = await reflected_services(channel)
            assert services["follow.v1.FollowService"] == FOLLOW_METHODS
            assert "follow.v1.AccountService" in services
            await import_users(pb_grpc.AccountServiceStub(channel), "cli_user")

        assert (pg_folder / "pgdata").is_dir()
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = await asyncio.wait_for(process.wait(), timeout=grace + 30)
        assert code == 0, log_path.read_text()
        assert time.monotonic() - started < grace + 10
        # the embedded PostgreSQL was stopped with it
        assert not (pg_folder / "pgdata" / "postmaster.pid").exists()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log = log_path.read_text()
    assert f"gRPC listening on 127.0.0.1:{port}" in log
    assert "database: postgresql://" in log
    assert "(embedded)" in log
    assert "stopped" in log
    assert "Traceback" not in log
