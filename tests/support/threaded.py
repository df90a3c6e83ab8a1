"""The real service (and, if asked, its v4 shim) on a private event loop in a background
thread, for synchronous callers: hypothesis state machines, schemathesis, blocking clients.
One helper for every such test, so starting, failing to start and stopping are written once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import asyncpg

from server.app import RunningService, start_service
from server.config import Settings
from server.v4.http import RunningShim, start_shim

T = TypeVar("T")
START_TIMEOUT = 60.0
CALL_TIMEOUT = 10.0


class ServiceInThread:
    """Start with `start()` or `with`; `port` is the gRPC port, `http_port` the shim's (0
    without one). `conn` is a direct database connection on the service's loop, for resets
    and SQL checks through `run()`."""

    def __init__(self, url: str, settings: Settings, *, shim: bool = False) -> None:
        self._url = url
        self._settings = settings
        self._with_shim = shim
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._conn: asyncpg.Connection | None = None
        self.port = 0
        self.http_port = 0
        self._thread = threading.Thread(target=self._thread_main, name="follow-server")

    def _thread_main(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        running: RunningService | None = None
        shim: RunningShim | None = None
        try:
            running = await start_service(self._settings, self._url)
            if self._with_shim:
                shim = await start_shim(self._settings, running.core)
            self._conn = await asyncpg.connect(self._url)
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            if shim is not None:
                await shim.stop()
            if running is not None:
                await running.stop(0)
            self._ready.set()
            return
        self.port = running.port
        self.http_port = shim.port if shim is not None else 0
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self._conn.close()
            if shim is not None:
                await shim.stop()
            await running.stop(0)

    def start(self) -> int:
        """Start the service; its gRPC port."""
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise TimeoutError(f"the service did not start within {START_TIMEOUT:.0f} s")
        if self._error is not None:
            self._thread.join(10)
            raise self._error
        return self.port

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT) -> T:
        """Run `coro` on the service's loop and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def conn(self) -> asyncpg.Connection:
        assert self._conn is not None
        return self._conn

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def __enter__(self) -> ServiceInThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
