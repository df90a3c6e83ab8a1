"""The event loop a process of the service runs on, and the signals that stop it.

One copy for every entry point (the server, each --workers worker, the shim run alone):
they all stop on SIGTERM or SIGINT and run on uvloop where it is installed.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop where it is installed: grpc.aio and asyncpg both run on it, and
    its loop costs less per call than the default one."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def stop_event() -> asyncio.Event:
    """An event that SIGTERM or SIGINT sets. The handlers stay until `forget_stop_signals`,
    so a second signal during a graceful shutdown does not cut it short."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    return stop


def forget_stop_signals() -> None:
    """Give SIGTERM and SIGINT back their default handling."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.remove_signal_handler(sig)


async def until_signal() -> None:
    """Return once SIGTERM or SIGINT arrives."""
    await stop_event().wait()
