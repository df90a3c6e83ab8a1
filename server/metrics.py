"""Prometheus metrics: per-RPC and per-v4-command counts, errors and latency; the database
pool and health; an HTTP endpoint serving them (`--metrics-listen`, off by default).

Each running service owns one `Metrics` with its own registry, so two services in one
process (as in the tests) do not share counters. The gRPC side is recorded by
server.interceptor; the v4 shim records its commands with `Metrics.observe_v4`.

Labels are bounded: methods are the contract's, codes are gRPC status names, reasons are
server.errors.Reason values, v4 commands are checked against a fixed set. Nothing a caller
sends (ids, bodies, headers) becomes a label, and no setting (the secret key among them) is
ever exported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Latency buckets (seconds): sub-millisecond lookups up to calls that hit a deadline.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

OTHER = "other"
_MAX_V4_CHILDREN = 1024

GrpcObserver = Callable[[grpc.StatusCode, str | None, float], None]


def split_method(full_method: str) -> tuple[str, str]:
    """'/follow.v1.FollowService/Follow' -> ('follow.v1.FollowService', 'Follow')."""
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


class _PoolCollector(Collector):
    """Reads the pool's numbers at scrape time, so they are never stale."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        size = self._pool.get_size()
        idle = self._pool.get_idle_size()
        yield GaugeMetricFamily(
            "follow_db_pool_size", "Database connections open in the pool.", value=size
        )
        yield GaugeMetricFamily(
            "follow_db_pool_in_use",
            "Database connections checked out by calls.",
            value=size - idle,
        )
        yield GaugeMetricFamily(
            "follow_db_pool_idle", "Database connections open and idle.", value=idle
        )
        yield GaugeMetricFamily(
            "follow_db_pool_max",
            "Most connections the pool may open.",
            value=self._pool.get_max_size(),
        )


# Watch lag (event time to send), seconds: a stream at the tail sees the tailer's poll
# (0.1 s) and the horizon; one catching up from an old position, its age.
WATCH_LAG_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    60.0,
    600.0,
    3600.0,
    86400.0,
)
WATCH_KINDS = {1: "follow", 2: "unfollow", 3: "account_deleted"}  # the outbox's kinds


class WatchMetrics:
    """The Watch streams of one process (server.watch_hub, server.watch_servicer): open
    streams, events sent by kind, catch-up reads, lag from the change to its send."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.watchers = Gauge(
            "follow_watch_streams", "Watch streams open in this process.", registry=r
        )
        self.sent = Counter(
            "follow_watch_events_sent",
            "Watch events written to streams (per edge; heartbeats not counted), by kind.",
            ["kind"],
            registry=r,
        )
        self.catch_up_reads = Counter(
            "follow_watch_catch_up_reads",
            "Outbox reads by a Watch stream behind the shared ring (it started from an old"
            " position or read slower than events came).",
            registry=r,
        )
        self.lag = Histogram(
            "follow_watch_lag_seconds",
            "Time from a change (its call's time) to its Watch events being written to a stream"
            " (one observation per call per message).",
            buckets=WATCH_LAG_BUCKETS,
            registry=r,
        )
        # Label children looked up once: an event is sent in microseconds.
        self._sent = {kind: self.sent.labels(name) for kind, name in WATCH_KINDS.items()}

    def events_sent(self, kind: int, count: int, lag_seconds: float) -> None:
        """`count` events of one call written in one message, `lag_seconds` after the call:
        one lag observation for them (they share the call's time)."""
        child = self._sent.get(kind)
        if child is not None:
            child.inc(count)
        self.lag.observe(max(lag_seconds, 0.0))


class Metrics:
    """One process's Prometheus registry: gRPC and v4 calls, latency, in-flight, pool and
    database health, Watch streams."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.grpc_requests = Counter(
            "follow_grpc_requests",
            "gRPC calls answered, by method and status code.",
            ["service", "method", "code"],
            registry=r,
        )
        self.grpc_errors = Counter(
            "follow_grpc_errors",
            "gRPC calls that failed, by method, status code and google.rpc.ErrorInfo reason.",
            ["service", "method", "code", "reason"],
            registry=r,
        )
        self.grpc_latency = Histogram(
            "follow_grpc_request_duration_seconds",
            "Time from a gRPC call's arrival to its answer.",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.grpc_in_flight = Gauge(
            "follow_grpc_in_flight", "gRPC calls being served now.", registry=r
        )
        self.db_up = Gauge(
            "follow_db_up", "1 while the database answers the health probe, else 0.", registry=r
        )
        self.v4_requests = Counter(
            "follow_v4_requests",
            "v4 shim commands answered, by command and v4 ErrorCode (0 is success).",
            ["command", "error_code"],
            registry=r,
        )
        self.v4_errors = Counter(
            "follow_v4_errors",
            "v4 shim commands answered with a non-zero ErrorCode.",
            ["command", "error_code"],
            registry=r,
        )
        self.v4_latency = Histogram(
            "follow_v4_request_duration_seconds",
            "Time from a v4 request's arrival to its answer.",
            ["command"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.watch = WatchMetrics(r)
        self._pool: _PoolCollector | None = None
        # v4 label values: the shim's own command table (add_v4_commands), so a new command
        # is counted under its name and anything else under 'other'.
        self._v4_commands: frozenset[str] = frozenset()
        # (request path, v4 ErrorCode) -> (requests, latency, errors or None) label children
        self._v4_children: dict[tuple[str, int], tuple[Any, Any, Any]] = {}

    def add_v4_commands(self, names: Iterable[str]) -> None:
        """Count v4 requests for these commands ('follow/follow_add', ...) under their own
        names; the shim registers its command table when it starts."""
        self._v4_commands |= frozenset(names)
        self._v4_children.clear()

    def watch_pool(self, pool: asyncpg.Pool) -> None:
        if self._pool is None:
            self._pool = _PoolCollector(pool)
            self.registry.register(self._pool)

    def set_database_up(self, up: bool) -> None:
        self.db_up.set(1 if up else 0)

    def observe_grpc(
        self, full_method: str, code: grpc.StatusCode, reason: str | None, seconds: float
    ) -> None:
        self.grpc_observer(full_method)(code, reason, seconds)

    def grpc_observer(self, full_method: str) -> GrpcObserver:
        """The recorder of one method's calls. Label children are looked up once per
        (method, code) and kept: prometheus_client's labels() costs microseconds a call
        (string conversion, a lock, a dict), which a small call notices. Methods are the
        registered ones and codes a fixed enum, so the cache is bounded."""
        service, method = split_method(full_method)
        latency = self.grpc_latency.labels(service, method)
        requests: dict[grpc.StatusCode, Any] = {}
        counter, errors = self.grpc_requests, self.grpc_errors
        ok = grpc.StatusCode.OK

        def observe(code: grpc.StatusCode, reason: str | None, seconds: float) -> None:
            child = requests.get(code)
            if child is None:
                child = requests[code] = counter.labels(service, method, code.name)
            child.inc()
            latency.observe(seconds)
            if code is not ok:
                errors.labels(service, method, code.name, reason or "").inc()

        return observe

    def observe_v4(self, command: str, error_code: int, seconds: float) -> None:
        """Record one answered v4 request. `command` is 'follow/follow_add' and so on;
        anything not added by add_v4_commands (an unknown command, 60009) is counted as
        'other'."""
        children = self._v4_children.get((command, error_code))
        if children is None:
            name = command.strip("/").removeprefix("v4/")
            if name not in self._v4_commands:
                name = OTHER
            code = str(error_code)
            children = (
                self.v4_requests.labels(name, code),
                self.v4_latency.labels(name),
                self.v4_errors.labels(name, code) if error_code != 0 else None,
            )
            # Only the fixed commands' paths are kept (codes are a fixed set): a caller's
            # made-up paths must not grow the cache.
            if name != OTHER and len(self._v4_children) < _MAX_V4_CHILDREN:
                self._v4_children[(command, error_code)] = children
        requests, latency, errors = children
        requests.inc()
        latency.observe(seconds)
        if errors is not None:
            errors.inc()

    def exposition(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data


@dataclass
class MetricsServer:
    """The HTTP endpoint: GET /metrics in the Prometheus text format."""

    runner: web.AppRunner
    port: int

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_metrics_server(metrics: Metrics, listen: str) -> MetricsServer:
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - ":PORT" asks for every interface

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(
            body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, int(port_text))
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    port = _bound_port(runner)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return MetricsServer(runner, port)


def _bound_port(runner: web.AppRunner) -> int:
    for server in runner.sites:
        sockets = getattr(getattr(server, "_server", None), "sockets", None) or ()
        for sock in sockets:
            port: int = sock.getsockname()[1]
            return port
    raise OSError("metrics server has no socket")
