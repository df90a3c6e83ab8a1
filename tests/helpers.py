"""Small helpers the tests share: importing users, reading whole lists, decoding errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc


async def import_users(stub: pb_grpc.AccountServiceAsyncStub, *user_ids: str) -> None:
    for start in range(0, len(user_ids), 100):
        chunk = user_ids[start : start + 100]
        response = await stub.ImportAccounts(
            pb.ImportAccountsRequest(accounts=[pb.Account(user_id=u) for u in chunk])
        )
        assert [r.code for r in response.results] == [pb.RESULT_CODE_OK] * len(chunk)


async def whole_list(
    stub: pb_grpc.FollowServiceAsyncStub,
    user_id: str,
    follow_type: pb.FollowType.ValueType,
    page_size: int = 0,
) -> list[pb.ListEntry]:
    """Every entry of a list, following next_page_token to the end."""
    entries: list[pb.ListEntry] = []
    token = ""
    while True:
        page = await stub.List(
            pb.ListRequest(
                user_id=user_id, follow_type=follow_type, page_size=page_size, page_token=token
            )
        )
        entries.extend(page.entries)
        token = page.next_page_token
        if not token:
            return entries


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The one google.rpc.ErrorInfo of a failed call (AIP-193)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status"
    assert status.code == error.code().value[0]
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert len(infos) == 1, f"expected exactly one ErrorInfo, got {len(infos)}"
    return infos[0]


REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0


@dataclass
class ServerProcess:
    """A real `follow-server` process and the lines it has logged so far."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(self.lines)

    async def wait_for(self, pattern: str) -> re.Match[str]:
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT
        while asyncio.get_running_loop().time() < deadline:
            for line in self.lines:
                found = re.search(pattern, line)
                if found:
                    return found
            if self.process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r}:\n{self.text()}")


async def _pump(stream: asyncio.StreamReader, into: list[str]) -> None:
    while line := await stream.readline():
        into.append(line.decode("utf-8", "replace").rstrip("\n"))


@contextlib.asynccontextmanager
async def follow_server(*args: str, stop_timeout: float = 30) -> AsyncIterator[ServerProcess]:
    """The real `follow-server` in its own process (no FOLLOW_* variables of ours leak in),
    its log lines collected; SIGTERM at the end, SIGKILL after `stop_timeout`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLLOW_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        *args,
        cwd=REPO,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    running = ServerProcess(process)
    pump = asyncio.create_task(_pump(process.stderr, running.lines))
    try:
        yield running
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), stop_timeout)
            except TimeoutError:
                process.kill()
                await process.wait()
        await pump
