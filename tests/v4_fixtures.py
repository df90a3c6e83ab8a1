"""Fixtures for the v4 shim tests: the real shim on a free loopback port over a real service
and PostgreSQL. Load with `pytest_plugins = ["tests.v4_fixtures"]`; never import it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any

import aiohttp
import pytest

from server.app import RunningService
from server.database import Database
from server.v4.http import RunningShim, start_shim
from tests.conftest import ServiceFactory, create_database, drop_database
from tests.support.threaded import ServiceInThread
from tests.v4_helpers import SETTINGS, ShimFactory, V4Client

_databases = itertools.count()
_tests = itertools.count()


@pytest.fixture
async def make_shim(make_service: ServiceFactory) -> AsyncIterator[ShimFactory]:
    """Start the shim in-process over a real service; keyword arguments override SETTINGS
    (max_following goes to the service)."""
    shims: list[RunningShim] = []
    session = aiohttp.ClientSession()

    async def make(running: RunningService | None = None, **overrides: Any) -> V4Client:
        service_overrides = {}
        if "max_following" in overrides:
            service_overrides["max_following"] = overrides.pop("max_following")
        if running is None:
            running = await make_service(**service_overrides)
        shim = await start_shim(replace(SETTINGS, **overrides), running.core)
        shims.append(shim)
        return V4Client(session, shim.port)

    yield make
    await session.close()  # first, so the shims have no keep-alive connections to wait for
    for shim in shims:
        await shim.stop()


@pytest.fixture
async def v4(threaded_shim: ServiceInThread) -> AsyncIterator[V4Client]:
    """A client of the module's shared shim (ids must be unique per test: see `uid`)."""
    async with aiohttp.ClientSession() as session:
        yield V4Client(session, threaded_shim.http_port)


@pytest.fixture
def uid() -> Callable[[str], str]:
    """Makes user ids unique to this test, so tests can share one database."""
    prefix = f"t{next(_tests)}_"
    return lambda name: prefix + name


@pytest.fixture(scope="module")
def threaded_shim(pg_cluster: Database) -> Iterator[ServiceInThread]:
    """One database (from the migrated template) and one service + shim for the module."""
    name = f"v4_threaded_{next(_databases)}"

    url = asyncio.run(create_database(pg_cluster, name))
    try:
        with ServiceInThread(url, SETTINGS, shim=True) as shim:
            yield shim
    finally:
        asyncio.run(drop_database(pg_cluster, name))
