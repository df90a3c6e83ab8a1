"""Assemble and run the service: database, pool, core, gRPC server, health and reflection
(grpc.reflection.v1, which current tools ask for first, and v1alpha for older ones)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import _async as health_aio  # the asyncio HealthServicer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from follow.v1 import events_pb2, follow_pb2, follow_pb2_grpc
from server import rules, runner, tls
from server.admission import InFlightLimit
from server.cleanup import DeletionCleaner
from server.config import Settings
from server.core import FollowCore
from server.cursor import CursorCodec
from server.database import create_pool, redact
from server.errors import StartupError
from server.interceptor import CallObserver
from server.metrics import Metrics, MetricsServer, start_metrics_server
from server.migrations import apply_migrations
from server.outbox import OutboxSource
from server.retention import EventRetention
from server.rules import Limits
from server.servicer import AccountServicer, FollowServicer
from server.store import Store
from server.v4.http import RunningShim, start_shim
from server.watch_hub import WatchHub
from server.watch_servicer import EventServicer, add_to_server
from server.watch_token import WatchTokens
from server.webhook_metrics import WebhookMetrics
from server.webhooks import WebhookConfig, Webhooks

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    follow_pb2.DESCRIPTOR.services_by_name["FollowService"].full_name,
    follow_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name,
    events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
)
HEALTH_INTERVAL_SECONDS = 1.0
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
_REFLECTION_V1_FILE = "grpc/reflection/v1/reflection.proto"


def largest_valid_request_bytes() -> int:
    """The encoded size of the largest request the contract accepts: ImportAccounts with
    MAX_ACCOUNTS accounts, each with a 32-byte id and a nick and face URL at their limit."""
    longest = "x" * rules.MAX_PROFILE_FIELD_BYTES
    account = follow_pb2.Account(
        user_id="u" * rules.MAX_USER_ID_BYTES, nick=longest, face_url=longest
    )
    return follow_pb2.ImportAccountsRequest(accounts=[account] * rules.MAX_ACCOUNTS).ByteSize()


# The gRPC receive limit: over twice the largest valid request (about 105 kB), so every valid
# request fits with room to spare, while a caller cannot make the server buffer megabytes
# for a call that can only fail. Larger requests get RESOURCE_EXHAUSTED from gRPC itself.
MAX_RECEIVE_BYTES = 256 * 1024

# HTTP/2 keepalive, for the long-lived Watch streams: the server pings an idle connection
# every 30 s and drops it when no answer comes within 10 s (a vanished client's stream ends,
# freeing its --max-watchers slot); clients may ping as often as every 10 s, also with no
# call open. Heartbeats (a message with no events, --watch-heartbeat-seconds) keep proxies
# from closing a quiet stream.
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]


def _reflection_v1_descriptor() -> None:
    """Put grpc.reflection.v1 in the default descriptor pool (once): the same messages as
    v1alpha under the stable package name, so the v1 service describes itself like any
    other. grpcio-reflection ships only the v1alpha descriptors."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_REFLECTION_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto.name, proto.package = _REFLECTION_V1_FILE, "grpc.reflection.v1"
    proto.ClearField("options")
    for message in proto.message_type:
        for field_ in message.field:
            if field_.HasField("type_name"):
                field_.type_name = field_.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.AddSerializedFile(proto.SerializeToString())


def enable_reflection(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Serve reflection as grpc.reflection.v1 and v1alpha. The two differ only in their
    package name, so one servicer answers both: the wire format is the same."""
    _reflection_v1_descriptor()
    names = (*service_names, reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(
        REFLECTION_V1,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))


@dataclass
class RunningService:
    """One started server process: what stop() must close, and what tests and the v4 shim reach
    into."""

    server: grpc.aio.Server
    port: int
    pool: asyncpg.Pool
    health: health_aio.HealthServicer
    store: Store
    core: FollowCore
    metrics: Metrics = field(default_factory=Metrics, repr=False)
    metrics_server: MetricsServer | None = field(default=None, repr=False)
    admission: InFlightLimit = field(default_factory=InFlightLimit, repr=False)
    cleaner: DeletionCleaner | None = field(default=None, repr=False)
    webhooks: Webhooks | None = field(default=None, repr=False)
    retention: EventRetention | None = field(default=None, repr=False)
    watch_hub: WatchHub | None = field(default=None, repr=False)
    _monitor: asyncio.Task[None] | None = field(default=None, repr=False)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    async def stop(self, grace: float) -> None:
        """Refuse new calls, let in-flight ones finish within `grace`, close the pool."""
        await self.health.enter_graceful_shutdown()
        if self._monitor is not None:
            # The stop flag ends the loop even if a cancel is swallowed on its way through a
            # library's wait (Python 3.11's wait_for can do that), and the bounded wait keeps
            # shutdown from ever hanging on it.
            self._stopping.set()
            self._monitor.cancel()
            await asyncio.wait({self._monitor}, timeout=HEALTH_INTERVAL_SECONDS * 3)
        if self.watch_hub is not None:
            # Streams never finish on their own: end them (UNAVAILABLE / SHUTTING_DOWN, the
            # client resumes elsewhere) rather than let them hold the grace period.
            await self.watch_hub.stop(max(min(grace, 5.0), 1.0))
        await self.server.stop(grace)
        if self.cleaner is not None:
            await self.cleaner.stop()
        if self.webhooks is not None:
            # Requests on the wire finish (within --callback-timeout) and are marked.
            await self.webhooks.stop()
        if self.retention is not None:
            await self.retention.stop()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        try:
            async with asyncio.timeout(max(grace, 1.0)):
                await self.pool.close()
        except TimeoutError:
            self.pool.terminate()


async def _watch_database(
    store: Store,
    health: health_aio.HealthServicer,
    stopping: asyncio.Event,
    metrics: Metrics | None = None,
) -> None:
    """SERVING only while the database answers."""
    last: int | None = None
    while not stopping.is_set():
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that lands
            # as the ping completes, and stop() would then wait for this loop forever.
            async with asyncio.timeout(HEALTH_INTERVAL_SECONDS * 2):
                await store.ping()
            status = health_pb2.HealthCheckResponse.SERVING
        except Exception:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        if metrics is not None:
            metrics.set_database_up(status == health_pb2.HealthCheckResponse.SERVING)
        if status != last:
            if last is not None and status == health_pb2.HealthCheckResponse.SERVING:
                # The database came back: the pooled connections died with it.
                await store.expire_connections()
            for name in ("", *SERVICE_NAMES):
                await health.set(name, status)
            if last is not None:
                log.warning(
                    "database health: %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                )
            last = status
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HEALTH_INTERVAL_SECONDS):
                await stopping.wait()


async def start_service(
    settings: Settings, database_url: str, *, reuse_port: bool = False, migrate: bool = True
) -> RunningService:
    files = tls.tls_files(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    server_tls = tls.load(files)
    try:
        if migrate:
            await apply_migrations(database_url)
        pool = await create_pool(database_url, settings.db_pool_size, int_timestamps=True)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StartupError(
            f"the database at {redact(database_url)} failed while the server was starting: {reason}"
        ) from None
    store = Store(pool, settings.db_acquire_timeout)
    key = await store.cursor_key()
    core = FollowCore(store, CursorCodec(key), Limits(settings.max_following))
    metrics = Metrics()
    metrics.watch_pool(pool)
    # Every unary method (health's too) is wrapped once, as it is registered, for request
    # ids, metrics and admission (server.interceptor): no per-call interceptor chain.
    # Reflection is a stream and registers on the server itself.
    admission = InFlightLimit(settings.max_in_flight)  # shared with the in-process v4 shim
    observer = CallObserver(metrics, admission)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            # Several worker processes (--workers) share the port; one alone keeps the
            # default refusal of a second server on the same port.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            *KEEPALIVE_OPTIONS,
        ],
    )
    observed: Any = observer.server_for(server)  # registers like a grpc.aio.Server
    follow_pb2_grpc.add_FollowServiceServicer_to_server(FollowServicer(core), observed)
    follow_pb2_grpc.add_AccountServiceServicer_to_server(AccountServicer(core), observed)
    # Watch: a stream, outside the unary wrapper and its in-flight bound (server.watch_servicer).
    watch_hub = WatchHub(
        OutboxSource(pool),
        max_watchers=settings.max_watchers,
        heartbeat_seconds=settings.watch_heartbeat_seconds,
        metrics=metrics.watch,
    )
    add_to_server(EventServicer(watch_hub, WatchTokens(key)), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, observed)
    enable_reflection(
        server, (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    )
    port = tls.add_port(server, settings.grpc_listen, server_tls)
    if port == 0:
        await pool.close()
        raise StartupError(
            f"--grpc-listen {settings.grpc_listen}: cannot listen there (the port is in use"
            " by another process, or the host is not this machine's)"
        )
    # Webhooks (server.webhooks): every URL gets its outbox position before the first call
    # can commit, so none of this run's events is missed.
    webhook_metrics = WebhookMetrics(metrics.registry)
    webhooks = await _start_webhooks(settings, database_url, webhook_metrics, pool)
    await server.start()
    running = RunningService(
        server, port, pool, health, store, core, metrics, admission=admission, watch_hub=watch_hub
    )
    if settings.metrics_listen:
        try:
            running.metrics_server = await _start_metrics(metrics, settings.metrics_listen)
        except StartupError:
            await running.stop(0)
            raise
    # Deleted accounts' edges go in the background, one runner per database (server.cleanup).
    running.cleaner = DeletionCleaner(store, database_url)
    running.cleaner.start()
    running.webhooks = webhooks
    # Outbox events and parked webhooks past --event-retention go (server.retention).
    running.retention = EventRetention(
        database_url, settings.event_retention, settings.callback_urls, webhook_metrics
    )
    running.retention.start()
    running._monitor = asyncio.create_task(
        _watch_database(store, health, running._stopping, metrics)
    )
    return running


async def _start_webhooks(
    settings: Settings, database_url: str, metrics: WebhookMetrics, pool: asyncpg.Pool
) -> Webhooks | None:
    config = WebhookConfig.from_settings(settings)
    if config is None:
        return None
    try:
        return await Webhooks.start(config, database_url, metrics)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        await pool.close()
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StartupError(
            f"the database at {redact(database_url)} failed while webhooks were starting: {reason}"
        ) from None


async def _start_metrics(metrics: Metrics, listen: str) -> MetricsServer:
    try:
        return await start_metrics_server(metrics, listen)
    except OSError as exc:
        raise StartupError(
            f"--metrics-listen {listen}: cannot listen there: {exc.strerror or exc}"
        ) from None


async def serve_v4_alone(settings: Settings) -> None:
    """--grpc-target: only the v4 shim, against a remote gRPC server; no database here."""
    metrics = Metrics()
    shim = await start_shim(settings, metrics=metrics)
    metrics_server = None
    if settings.metrics_listen:
        try:
            metrics_server = await _start_metrics(metrics, settings.metrics_listen)
        except StartupError:
            await shim.stop()
            raise
    await runner.until_signal()
    log.info("shutting down: finishing in-flight requests (grace %.1fs)", settings.grace_seconds)
    await shim.stop()
    if metrics_server is not None:
        await metrics_server.close()
    log.info("stopped")


async def serve_on(settings: Settings, database_url: str, worker: int | None = None) -> None:
    """One server process over a database that is already there, until SIGTERM or SIGINT.
    As worker `worker` of --workers, it shares its ports and leaves migrations to the
    parent (server.workers)."""
    running = await start_service(
        settings, database_url, reuse_port=worker is not None, migrate=worker is None
    )
    host = settings.grpc_listen.rsplit(":", 1)[0]
    if worker is None:
        log.info("gRPC listening on %s:%d", host, running.port)
    else:
        log.info(
            "worker %d (pid %d): gRPC listening on %s:%d", worker, os.getpid(), host, running.port
        )
    shim: RunningShim | None = None
    if settings.http_listen:
        try:
            shim = await start_shim(
                settings,
                running.core,
                running.metrics,
                admission=running.admission,
                reuse_port=worker is not None,
            )
        except BaseException:
            await running.stop(0)
            raise
    await runner.until_signal()
    log.info("shutting down: finishing in-flight calls (grace %.1fs)", settings.grace_seconds)
    if shim is not None:
        await shim.stop()
    await running.stop(settings.grace_seconds)
