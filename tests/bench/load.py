"""Load-generator processes: closed-loop callers at fixed concurrency.

Each worker process lives for the whole benchmark and runs one scenario at a time when the
parent sends it a `Job`: `concurrency` coroutines, each issuing its next call as soon as the
previous one answers, from `start` (a time.monotonic() instant shared by all processes) for
`warmup + duration` seconds. Only calls that both start and end inside the measured window
count; their latencies are sent back.

Requests are drawn from a per-process `random.Random`, so a run is repeatable, and the
Follow plan can be replayed exactly by Unfollow (see `Plan`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from server import runner

USERS_FORMAT = "u{:07d}"


@dataclass(frozen=True, slots=True)
class Target:
    """Everything a worker needs to reach the system under test (127.0.0.1 only)."""

    grpc_address: str
    database_url: str
    http_address: str | None = None
    v4_query: str = ""


@dataclass(frozen=True, slots=True)
class Job:
    """One scenario a load process runs: what to call, when to start, how long."""

    scenario: str
    start: float
    warmup: float
    duration: float
    concurrency: int
    seed: int
    users: int
    celebrity: str
    small_user: str
    deep_tokens: list[str] = field(default_factory=list)
    actors: list[str] = field(default_factory=list)  # distinct actors, used once each
    limit: int | None = None  # at most this many calls (replays)


@dataclass(slots=True)
class Outcome:
    """What one load process measured in one scenario, sent back to the parent."""

    scenario: str
    latencies: list[float] = field(default_factory=list)  # seconds, calls inside the window
    issued: int = 0  # every call completed, warm-up and tail included
    errors: int = 0
    error_sample: str = ""
    items: int = 0  # edges written (Follow) or removed (Unfollow), inside the window
    # When the job ran out of calls to make (its limit or its actors used up): time.monotonic()
    # of the last answer; None when it ran until the window closed.
    ran_out_at: float | None = None


class Plan:
    """A deterministic stream of (actor, targets) for Follow-like scenarios."""

    def __init__(self, seed: int, users: int, width: int, actors: list[str] | None = None):
        self._rng = random.Random(seed)
        self._users = users
        self._width = width
        self._actors = actors

    def __iter__(self) -> Plan:
        return self

    def __next__(self) -> tuple[str, list[str]]:
        rng = self._rng
        if self._actors is not None:
            if not self._actors:
                raise StopIteration
            actor = self._actors.pop()
        else:
            actor = USERS_FORMAT.format(rng.randrange(1, self._users))
        targets: list[str] = []
        while len(targets) < self._width:
            t = USERS_FORMAT.format(rng.randrange(1, self._users))
            if t != actor and t not in targets:
                targets.append(t)
        return actor, targets


def worker_main(index: int, target: Target, pipe: Connection) -> None:
    """A load-generator process: run jobs from the parent until it sends None."""
    while True:
        job = pipe.recv()
        if job is None:
            return
        try:
            outcome = runner.run(_run_job(index, target, job))
        except Exception as exc:  # reported, not raised: the parent owns the run
            outcome = Outcome(job.scenario, errors=1, error_sample=f"{type(exc).__name__}: {exc}")
        pipe.send(outcome)


Call = Callable[[], Awaitable[int]]  # one request; returns the items it handled


async def _run_job(index: int, target: Target, job: Job) -> Outcome:
    rng = random.Random(job.seed * 1000 + index)
    async with _Clients(target, job) as clients:
        make_call = _scenario(job, clients, rng, index)
        outcome = Outcome(job.scenario)
        begin = job.start + job.warmup
        end = begin + job.duration
        stop_at = end
        remaining = [job.limit if job.limit is not None else -1]

        async def loop() -> None:
            while True:
                now = time.monotonic()
                if now >= stop_at or remaining[0] == 0:
                    return
                remaining[0] -= 1
                try:
                    call = make_call()
                except StopIteration:
                    remaining[0] = 0
                    return
                t0 = time.perf_counter()
                started = time.monotonic()
                try:
                    items = await call()
                except Exception as exc:
                    outcome.errors += 1
                    if not outcome.error_sample:
                        outcome.error_sample = f"{type(exc).__name__}: {exc}"[:300]
                    continue
                elapsed = time.perf_counter() - t0
                outcome.issued += 1
                if started >= begin and started + elapsed <= end:
                    outcome.latencies.append(elapsed)
                    outcome.items += items

        delay = job.start - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await asyncio.gather(*(loop() for _ in range(job.concurrency)))
        if remaining[0] == 0:
            outcome.ran_out_at = time.monotonic()
        return outcome


class _Clients:
    """The clients a scenario needs, opened once per job."""

    def __init__(self, target: Target, job: Job) -> None:
        self.target = target
        self.job = job
        self.channel: Any = None
        self.pool: Any = None
        self.http: Any = None

    async def __aenter__(self) -> _Clients:
        kind = self.job.scenario.split(":", 1)[0]
        if kind == "grpc":
            import grpc

            self.channel = grpc.aio.insecure_channel(self.target.grpc_address)
            await self.channel.channel_ready()
        elif kind == "db":
            from server.database import create_pool

            # The service's own pool setup (codecs, reset), without migrations.
            self.pool = await create_pool(
                self.target.database_url,
                self.job.concurrency,
                int_timestamps=True,
                min_size=self.job.concurrency,
            )
        elif kind == "v4":
            import aiohttp

            self.http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.job.concurrency)
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.pool is not None:
            await self.pool.close()
        if self.http is not None:
            await self.http.close()


def _scenario(job: Job, clients: _Clients, rng: random.Random, index: int) -> Callable[[], Call]:
    """A factory of calls for the job's scenario ("grpc:check100", "db:follow20", ...)."""
    kind, name = job.scenario.split(":", 1)
    users = job.users

    def user() -> str:
        return USERS_FORMAT.format(rng.randrange(1, users))

    def some(n: int) -> list[str]:
        return [USERS_FORMAT.format(rng.randrange(0, users)) for _ in range(n)]

    base, _, variant = name.partition("@")
    plan_seed = job.seed * 1000 + index
    plans: dict[str, Plan] = {
        "follow20": Plan(plan_seed, users, 20),
        "unfollow20": Plan(plan_seed, users, 20),  # the same stream as follow20
        "follow1": Plan(plan_seed, users, 1),
    }
    if kind == "grpc":
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from follow.v1 import follow_pb2 as pb
        from follow.v1 import follow_pb2_grpc as pb_grpc

        stub = pb_grpc.FollowServiceStub(clients.channel)
        health = health_pb2_grpc.HealthStub(clients.channel)
        health_request = health_pb2.HealthCheckRequest(service="")

        if base == "empty":

            def empty() -> Call:
                async def go() -> int:
                    await health.Check(health_request)
                    return 0

                return go

            return empty
        if base == "check100":

            def check() -> Call:
                request = pb.CheckRequest(user_id=user(), target_ids=some(100))

                async def go() -> int:
                    await stub.Check(request)
                    return 0

                return go

            return check
        if base in ("getinfo20", "getinfo1"):
            fixed = {"celebrity": job.celebrity, "small": job.small_user}.get(variant)

            def info() -> Call:
                targets = [fixed] if fixed else some(20)
                request = pb.GetInfoRequest(user_id=user(), target_ids=targets)

                async def go() -> int:
                    await stub.GetInfo(request)
                    return 0

                return go

            return info
        if base == "list":

            def page() -> Call:
                token = rng.choice(job.deep_tokens) if variant == "deep" else ""
                request = pb.ListRequest(
                    user_id=job.celebrity,
                    follow_type=pb.FOLLOW_TYPE_FAN,
                    page_size=100,
                    page_token=token,
                )

                async def go() -> int:
                    response = await stub.List(request)
                    if len(response.entries) != 100:
                        raise RuntimeError(f"short page: {len(response.entries)} entries")
                    return 0

                return go

            return page
        if base in ("follow20", "follow1", "unfollow20"):
            if variant == "celebrity":
                plan: Any = ((a, [job.celebrity]) for a in job.actors)
            else:
                plan = plans[base]
            unfollow = base == "unfollow20"

            def follow() -> Call:
                actor, targets = next(plan)

                async def go() -> int:
                    if unfollow:
                        await stub.Unfollow(pb.UnfollowRequest(user_id=actor, target_ids=targets))
                        return len(targets)
                    response = await stub.Follow(
                        pb.FollowRequest(user_id=actor, target_ids=targets)
                    )
                    return sum(1 for r in response.results if r.code == pb.RESULT_CODE_OK)

                return go

            return follow
    if kind == "db":
        from server.errors import FollowType
        from server.store import Store

        store = Store(clients.pool)
        if base == "check100":

            def check() -> Call:
                u, targets = user(), some(100)

                async def go() -> int:
                    await store.check(u, targets)
                    return 0

                return go

            return check
        if base == "getinfo20":

            def info() -> Call:
                ids = [user(), *some(20)]

                async def go() -> int:
                    await store.counts(ids)
                    return 0

                return go

            return info
        if base == "list":

            def page() -> Call:
                async def go() -> int:
                    await store.page(job.celebrity, FollowType.FAN, 101, None)
                    return 0

                return go

            return page
        if base == "follow20":
            db_plan = Plan(plan_seed + 7_777_777, users, 20)  # other edges than grpc:follow20

            def follow() -> Call:
                actor, targets = next(db_plan)

                async def go() -> int:
                    codes = await store.follow(actor, targets, 5000)
                    return sum(1 for c in codes.values() if c.value == 0)

                return go

            return follow
    if kind == "v4" and base == "check100":
        import orjson
        from yarl import URL

        url = f"http://{clients.target.http_address}/v4/follow/follow_check?"
        session = clients.http
        headers = {"Content-Type": "application/json"}

        def v4check() -> Call:
            # Built before the call, as the gRPC scenarios build their request messages,
            # and with orjson: the load generators share the CPUs with the server.
            body = orjson.dumps({"From_Account": user(), "To_Account": some(100)})
            query = f"{clients.target.v4_query}&random={rng.randrange(2**32)}"
            target = URL(url + query, encoded=True)

            async def go() -> int:
                async with session.post(target, data=body, headers=headers) as response:
                    data = orjson.loads(await response.read())
                if data.get("ErrorCode") != 0:
                    raise RuntimeError(f"v4 error {data.get('ErrorCode')}: {data.get('ErrorInfo')}")
                return 0

            return go

        return v4check
    raise ValueError(f"unknown scenario {job.scenario}")
