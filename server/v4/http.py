"""The v4 shim's HTTP side (aiohttp): routing, body limits, HTTPS, and its start and graceful
stop.

Every answered request is HTTP 200 with the v4 envelope, errors included; an unexpected
exception is logged and answered 30006, never a 500. Bytes that are not HTTP/1.1 at all (a
gRPC client pointed at this port, a scanner) are answered 400 by aiohttp and logged as one
warning line, without a traceback.
"""

from __future__ import annotations

import logging
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from aiohttp import http_exceptions, web

from server import tls
from server.admission import InFlightLimit
from server.core import FollowCore
from server.errors import StartupError
from server.metrics import Metrics
from server.origin import RESTAPI, Origin, call_origin
from server.v4 import backend as backends
from server.v4.commands import COMMANDS
from server.v4.envelope import (
    HTTP_PARSE_ERROR,
    INTERNAL_ERROR,
    UNKNOWN_COMMAND,
    Authenticator,
    V4Error,
    fail,
    ok,
    parse_body,
)
from server.v4.observe import observe_requests
from server.v4.usersig import UserSigVerifier

if TYPE_CHECKING:  # the runtime's options, read here; the shim does not import the CLI
    from server.config import Settings

log = logging.getLogger(__name__)

OPENAPI_PATH = "/v4/openapi.yaml"
OPENAPI = (Path(__file__).parent / "openapi.yaml").read_bytes()
# The document's one `servers` entry, replaced when served by the address the caller used.
_OPENAPI_SERVER = b"  - url: http://127.0.0.1:8080\n"
# A Host header fit to echo into the document: a name or address and an optional port.
_HOST_HEADER = re.compile(r"[A-Za-z0-9.-]{1,253}(:\d{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:\d{1,5})?")
_JSON = "application/json"
LINGER_SECONDS = 1.0
COMMAND_LIST = ", ".join(f"POST /v4/{name}" for name in COMMANDS)


class _NotHttpFilter(logging.Filter):
    """aiohttp logs bytes that do not parse as HTTP at ERROR with a traceback; one WARNING
    line says the same (and names the usual cause: a gRPC client on the v4 port)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, http_exceptions.HttpProcessingError):
            return True
        text = str(exc.message if hasattr(exc, "message") else exc)
        why = (
            "an HTTP/2 connection preface (a gRPC client? gRPC is served on --grpc-listen)"
            if "PRI" in text
            else " ".join(text.split())[:120]
        )
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg = "v4 shim: answered 400 to %s, whose bytes are not HTTP/1.1: %s"
        record.args = (remote, why)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        return True


_NOT_HTTP = _NotHttpFilter()


class Shim:
    """The request handler: envelope checks, then one call of the contract."""

    def __init__(
        self,
        auth: Authenticator,
        backend: backends.Backend,
        max_body_bytes: int,
        metrics: Metrics | None = None,
        scheme: str = "http",
    ) -> None:
        self._scheme = scheme
        # HOST:PORT where the shim listens (set once bound), for a request without a usable
        # Host header.
        self.address = "127.0.0.1:8080"
        self._metrics = metrics
        self._auth = auth
        self._backend = backend
        self._max_body = max_body_bytes

    def application(self) -> web.Application:
        # client_max_size bounds request.read() as it reads, chunked bodies included
        app = web.Application(
            client_max_size=self._max_body, middlewares=[observe_requests(self._metrics)]
        )
        app.router.add_get(OPENAPI_PATH, self.openapi)
        app.router.add_post("/v4/{service}/{command}", self.handle)
        app.router.add_route("*", "/{tail:.*}", self.unknown)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        try:
            command = COMMANDS.get(
                f"{request.match_info['service']}/{request.match_info['command']}"
            )
            if command is None:
                raise V4Error(
                    UNKNOWN_COMMAND,
                    f"no such command: POST {request.path}; the commands are {COMMAND_LIST}",
                )
            length = request.content_length
            if length is not None and length > self._max_body:
                return self._too_large(length)
            self._auth.check(request.query)
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return self._too_large(None)
            origin = call_origin.set(Origin(request.remote or "", RESTAPI))
            try:
                payload = ok(await command(self._backend, parse_body(raw)))
            finally:
                call_origin.reset(origin)
        except V4Error as exc:
            payload = fail(exc.code, exc.info)
        except Exception:
            log.exception("v4 %s failed unexpectedly", request.path)
            payload = fail(INTERNAL_ERROR, "internal error; try again")
        response = web.Response(body=payload, content_type=_JSON)
        if not request.content.at_eof():
            response.force_close()  # an unread body is not drained: the connection goes
        return response

    def _too_large(self, length: int | None) -> web.Response:
        size = f"{length} bytes" if length is not None else "larger than that"
        response = web.Response(
            body=fail(
                HTTP_PARSE_ERROR,
                f"request body is {size}; at most {self._max_body} bytes are accepted",
            ),
            content_type=_JSON,
        )
        response.force_close()
        return response

    async def unknown(self, request: web.Request) -> web.Response:
        response = web.Response(
            body=fail(
                UNKNOWN_COMMAND,
                f"no such command: {request.method} {request.path};"
                f" the commands are {COMMAND_LIST}",
            ),
            content_type=_JSON,
        )
        if not request.content.at_eof():
            response.force_close()
        return response

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI document, its `servers` entry the address this request came to."""
        host = request.headers.get("Host", "")
        if not _HOST_HEADER.fullmatch(host):
            host = self.address
        served = OPENAPI.replace(
            _OPENAPI_SERVER, f"  - url: {self._scheme}://{host}\n".encode("ascii"), 1
        )
        return web.Response(body=served, content_type="application/yaml")


@dataclass
class RunningShim:
    """A listening v4 shim and what stop() must close."""

    runner: web.AppRunner
    host: str
    port: int
    channel: grpc.aio.Channel | None = None

    async def stop(self) -> None:
        """Stop listening, let in-flight requests finish (the grace given at start)."""
        await self.runner.cleanup()
        if self.channel is not None:
            await self.channel.close(None)


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT (or [v6]:PORT) as (host, port); the settings have checked its form."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def authenticator(settings: Settings) -> Authenticator:
    verifier = None
    if settings.insecure_no_auth:
        log.warning(
            "!!! v4 shim runs WITHOUT AUTHENTICATION (--insecure-no-auth): UserSigs are not"
            " checked; anyone who can reach %s can change every relationship !!!",
            settings.http_listen,
        )
    else:
        if settings.sdkappid is None or settings.secret_key is None:
            raise ValueError("the v4 shim needs an sdkappid and a secret key")
        verifier = UserSigVerifier(settings.sdkappid, settings.secret_key)
    return Authenticator(settings.sdkappid, frozenset(settings.admins), verifier)


async def start_shim(
    settings: Settings,
    core: FollowCore | None = None,
    metrics: Metrics | None = None,
    *,
    admission: InFlightLimit | None = None,
    reuse_port: bool = False,
) -> RunningShim:
    """Serve the shim on settings.http_listen: in-process over `core`, or, with
    settings.grpc_target, over a channel to that gRPC server. `reuse_port` lets the
    processes of --workers share the port (SO_REUSEPORT)."""
    channel = None
    if settings.grpc_target:
        channel = tls.target_channel(
            settings.grpc_target,
            settings.grpc_target_ca,
            settings.grpc_target_cert,
            settings.grpc_target_key,
        )
        backend = backends.over_channel(channel)
    elif core is not None:
        backend = backends.in_process(core, admission)
    else:
        raise ValueError("the v4 shim needs a core or a --grpc-target")
    if metrics is not None:
        metrics.add_v4_commands(COMMANDS)
    try:
        context: ssl.SSLContext | None = tls.http_ssl_context(
            settings.http_tls_cert, settings.http_tls_key
        )
    except tls.TlsConfigError:
        if channel is not None:
            await channel.close(None)
        raise
    if context is None:
        tls.warn_plaintext_http(settings.http_listen)
    scheme = "https" if context is not None else "http"
    logging.getLogger("aiohttp.server").addFilter(_NOT_HTTP)  # once: filters are a set
    shim = Shim(authenticator(settings), backend, settings.max_body_bytes, metrics, scheme)
    runner = web.AppRunner(
        shim.application(),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=settings.grace_seconds,
        # After refusing a body, discard what the client still sends for at most this long
        # (so it can read the answer) and then close; never buffer it.
        lingering_time=LINGER_SECONDS,
    )
    await runner.setup()
    host, port = split_address(settings.http_listen)
    site = web.TCPSite(runner, host, port, ssl_context=context, reuse_port=reuse_port or None)
    try:
        await site.start()
    except BaseException as exc:
        await runner.cleanup()
        if channel is not None:
            await channel.close(None)
        if isinstance(exc, OSError):
            raise StartupError(
                f"--http-listen {settings.http_listen}: cannot listen there: {exc.strerror or exc}"
            ) from None
        raise
    bound = runner.addresses[0][1]
    shim.address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
    log.info(
        "v4 shim listening on %s://%s:%d (sdkappid %s, admins %s, %s)",
        scheme,
        host,
        bound,
        settings.sdkappid if settings.sdkappid is not None else "any",
        ",".join(settings.admins),
        f"gRPC target {settings.grpc_target}" if settings.grpc_target else "in-process core",
    )
    return RunningShim(runner, host, bound, channel)
