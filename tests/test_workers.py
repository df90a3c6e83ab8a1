"""`follow-server --workers 2`: the real command in its own process, over its own embedded
PostgreSQL (started once, by the parent), on free loopback ports shared by both workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc

from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from tests.helpers import ServerProcess, follow_server

WORKER_LINE = re.compile(r"worker (\d+) \(pid (\d+)\): gRPC listening on")
CONNECTIONS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Workers:
    """A running follow-server --workers process and its ports."""

    server: ServerProcess
    grpc_port: int
    http_port: int

    @property
    def process(self) -> asyncio.subprocess.Process:
        return self.server.process

    @property
    def lines(self) -> list[str]:
        return self.server.lines

    def pids(self) -> dict[int, int]:
        """Worker index -> pid, from the line each worker logs once it serves."""
        found = (WORKER_LINE.search(line) for line in self.lines)
        return {int(m[1]): int(m[2]) for m in found if m}

    def text(self) -> str:
        return self.server.text()


@contextlib.asynccontextmanager
async def two_workers() -> AsyncIterator[Workers]:
    # mkdtemp, not tmp_path: the embedded PostgreSQL runs as a non-root user that must be
    # able to enter the folder, and pytest's tmp base may be root-only.
    folder = Path(tempfile.mkdtemp(prefix="follow-workers-pg-"))
    grpc_port, http_port = free_port(), free_port()
    try:
        async with follow_server(
            "--workers",
            "2",
            "--grpc-listen",
            f"127.0.0.1:{grpc_port}",
            "--http-listen",
            f"127.0.0.1:{http_port}",
            "--insecure-no-auth",
            "--data-dir",
            str(folder / "data"),
            "--log-level",
            "INFO",
            "--grace-seconds",
            "5",
            stop_timeout=60,
        ) as server:
            workers = Workers(server, grpc_port, http_port)
            for _ in range(1200):  # both workers up (the embedded database starts first)
                if len(workers.pids()) == 2 or workers.process.returncode is not None:
                    break
                await asyncio.sleep(0.1)
            assert len(workers.pids()) == 2, f"workers did not start:\n{workers.text()}"
            yield workers
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _established_inodes(port: int) -> set[str]:
    """Inodes of established TCP sockets whose local port is `port` (server ends)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                cols = row.split()
                local_port = int(cols[1].rsplit(":", 1)[1], 16)
                if local_port == port and cols[3] == "01":
                    inodes.add(cols[9])
    return inodes


async def test_both_workers_serve_calls_from_many_connections() -> None:
    """Two worker processes share the gRPC port: calls over 16 separate connections all
    succeed, each worker holds some of those connections (read from /proc, so the kernel
    really spread them), a page token made by one worker is read by whichever worker gets
    the next call (the cursor key is per database), and the shared v4 port answers."""
    async with two_workers() as workers:
        pids = workers.pids()
        target = f"127.0.0.1:{workers.grpc_port}"
        # A local subchannel pool per channel: otherwise grpc reuses one connection.
        channels = [
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(CONNECTIONS)
        ]
        try:
            accounts = pb_grpc.AccountServiceStub(channels[0])
            await accounts.ImportAccounts(
                pb.ImportAccountsRequest(accounts=[pb.Account(user_id=f"w{i}") for i in range(4)])
            )
            first = pb_grpc.FollowServiceStub(channels[0])
            await first.Follow(pb.FollowRequest(user_id="w0", target_ids=["w1", "w2", "w3"]))
            page = await first.List(
                pb.ListRequest(user_id="w0", follow_type=pb.FOLLOW_TYPE_FOLLOWING, page_size=1)
            )
            assert page.next_page_token

            async def calls(channel: grpc.aio.Channel) -> None:
                stub = pb_grpc.FollowServiceStub(channel)
                check = await stub.Check(pb.CheckRequest(user_id="w0", target_ids=["w1", "w2"]))
                assert [r.follow_type for r in check.results] == [pb.FOLLOW_TYPE_FOLLOWING] * 2
                info = await stub.GetInfo(pb.GetInfoRequest(user_id="w0", target_ids=["w0"]))
                assert info.infos[0].following_count == 3
                rest = await stub.List(
                    pb.ListRequest(
                        user_id="w0",
                        follow_type=pb.FOLLOW_TYPE_FOLLOWING,
                        page_token=page.next_page_token,
                    )
                )
                assert len(rest.entries) == 2

            await asyncio.gather(*(calls(c) for c in channels))
            established = _established_inodes(workers.grpc_port)
            holding = {i: _socket_inodes(pid) & established for i, pid in pids.items()}
            assert all(holding.values()), f"a worker holds no connection: {holding}"
        finally:
            for channel in channels:
                await channel.close(None)
        url = f"http://127.0.0.1:{workers.http_port}/v4/follow/follow_check"
        query = "?sdkappid=1&identifier=administrator&random=1&contenttype=json"
        for _ in range(4):  # a new connection each: the v4 port is shared too
            async with aiohttp.ClientSession() as session:
                body = {"From_Account": "w0", "To_Account": ["w1"]}
                async with session.post(url + query, json=body) as response:
                    answer = await response.json()
            assert answer["ErrorCode"] == 0, answer
            assert answer["ResultItem"][0]["FollowType"] == pb.FOLLOW_TYPE_FOLLOWING


async def test_sigterm_stops_every_worker_and_exits_zero() -> None:
    """SIGTERM to the parent stops both workers gracefully (each logs its shutdown), the
    parent stops the embedded database last and exits with status 0; no worker is left."""
    async with two_workers() as workers:
        pids = list(workers.pids().values())
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{workers.grpc_port}")
        async with channel:
            stub = pb_grpc.AccountServiceStub(channel)
            await stub.CheckAccounts(pb.CheckAccountsRequest(user_ids=["x"]))
        workers.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(workers.process.wait(), 60)
        assert code == 0, workers.text()
        for pid in pids:  # joined by the parent before it exited
            assert not _listed(pid), pid
        shutdowns = [line for line in workers.lines if "shutting down" in line]
        assert len(shutdowns) >= 2, workers.text()


def _listed(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()
