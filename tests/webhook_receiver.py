"""A real HTTP receiver for the webhook tests (aiohttp on 127.0.0.1): it records every request
(query, body, answer) and answers as told: a status per request, slowly, or not at all (down:
its port closed, then opened again on the same port)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass(frozen=True, slots=True)
class Received:
    """One request as it arrived, and the status it was answered with."""

    path: str
    query: dict[str, str]
    body: dict[str, Any]
    status: int
    at: float

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the webhook: its command and body."""
        return self.query.get("CallbackCommand", ""), orjson.dumps(self.body).decode()


@dataclass
class Receiver:
    """Start with `start()`; `answer(request_body)` picks each status (200 by default)."""

    answer: Callable[[dict[str, Any]], int] = lambda body: 200
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    arrived: int = 0  # requests that have started, answered or not
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    @property
    def delivered(self) -> list[Received]:
        """Requests answered with a 2xx, in arrival order."""
        return [r for r in self.received if 200 <= r.status < 300]

    def delivered_for(self, user: str) -> list[dict[str, Any]]:
        return [r.body for r in self.delivered if r.body.get("From_Account") == user]

    async def _handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.arrived += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.answer(body)
        if request.transport is None or request.transport.is_closing():
            status = 0  # the sender gave up (its timeout) or died: not delivered
        self.received.append(
            Received(request.path, dict(request.query), body, status, time.monotonic())
        )
        return web.json_response(
            {"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": ""}, status=status
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            server: Any = site._server  # the port 0 turned into
            self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Down: the port refuses connections until start() again."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def until(
    check: Callable[[], bool | Awaitable[bool]], within: float = 60.0, what: str = ""
) -> None:
    """Wait (generously: a shared 2-core machine) until `check()` holds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what or check}")
        await asyncio.sleep(0.05)
