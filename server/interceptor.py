"""What every gRPC call passes through: a request id, metrics, a debug access line, admission
(server.admission), and a clear INVALID_ARGUMENT for a request that is not a valid protobuf
message.

Malformed requests: grpcio deserializes a request before any handler code runs, and when
that fails (a string field holding invalid UTF-8, a truncated varint) it answers by itself:
grpcio 1.85's asyncio server says UNKNOWN "Unexpected <class DecodeError>: Error parsing
message ... String field had bad UTF-8" (the threaded server says INTERNAL "Exception
deserializing request!"). Both blame the server for the caller's bytes and carry no
ErrorInfo, so the wrapper swaps in a deserializer that never raises: a message
that does not parse becomes a `Malformed` marker, answered with INVALID_ARGUMENT and an
ErrorInfo (reason INVALID_ARGUMENT, domain follow.v1) before the servicer sees it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from server import deadline, logs
from server.admission import InFlightLimit, exempt
from server.errors import Reason, ServiceError
from server.metrics import Metrics
from server.origin import call_origin, from_grpc_peer
from server.status import error_detail, to_status

log = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
Deserializer = Callable[[bytes], Any]


@dataclass(frozen=True, slots=True)
class Malformed:
    """A request whose bytes are not a valid message of the method's request type."""

    why: str


def lenient(deserializer: Deserializer | None) -> Deserializer | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return Malformed(type(exc).__name__)

    return parse


def reason_of(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The ErrorInfo reason in the status details the call ended with, if any."""
    detail = error_detail(context.trailing_metadata(), domain=None)
    return detail.reason if detail is not None else None


def _code_of(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # the aio context may report the raw number
        for candidate in grpc.StatusCode:
            if candidate.value[0] == code:
                return candidate
    if isinstance(exc, BaseException) and type(exc).__name__ == "CancelledError":
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class CallObserver:
    """Wraps every unary-unary method handler of the server (health and reflection too) once,
    when it is registered: request id, metrics, debug access line, malformed requests and,
    for the service's own methods, admission (server.admission) and the call's deadline.

    One wrapper chosen per method at registration, not grpc.aio interceptors: an
    interceptor runs per call (a HandlerCallDetails, a coroutine per interceptor and a
    handler lookup each), and two of them stacked cost a measurable share of a small call.
    Register through `server_for(server)` so every servicer's handlers pass through here.
    """

    def __init__(self, metrics: Metrics, limit: InFlightLimit | None = None) -> None:
        logs.install_record_factory()
        self.metrics = metrics
        self.limit = limit if limit is not None else InFlightLimit()
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # type: ignore[type-arg]

    def server_for(self, server: grpc.aio.Server) -> ObservedServer:
        """A stand-in for `server` that add_*Servicer_to_server functions register on."""
        return ObservedServer(server, self)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler | None) -> Any:  # type: ignore[type-arg]
        """The observed handler of `method` (unknown methods and streams pass through)."""
        if handler is None or handler.unary_unary is None:
            return handler
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        behavior: Behavior = handler.unary_unary  # type: ignore[assignment]
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._observe(method, behavior, admit=not exempt(method)),
            request_deserializer=lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = wrapped
        return wrapped

    def _observe(self, method: str, behavior: Behavior, admit: bool) -> Behavior:
        metrics = self.metrics
        observe = metrics.grpc_observer(method)
        in_flight_gauge = metrics.grpc_in_flight
        limit = self.limit
        header = logs.REQUEST_ID_HEADER
        accept = logs.accept_request_id
        request_id = logs.request_id
        now = time.perf_counter
        ok = grpc.StatusCode.OK
        start_deadline = deadline.start
        call_deadline = deadline.call_deadline

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            offered = None
            for key, value in context.invocation_metadata() or ():
                if key == header:
                    offered = value
                    break
            rid = accept(offered)
            token = request_id.set(rid)
            started = now()
            in_flight_gauge.inc()
            code = ok
            reason: str | None = None
            admitted = False
            deadline_token = None
            origin_token = call_origin.set(from_grpc_peer(context.peer()))
            try:
                await context.send_initial_metadata(((header, rid),))
                if isinstance(request, Malformed):
                    await _abort_malformed(context, method, request)
                if admit:
                    refused = limit.enter()
                    if refused is not None:
                        await context.abort(
                            refused.code, refused.details, refused.trailing_metadata
                        )
                    admitted = True
                    left = context.time_remaining()
                    if left is not None:
                        deadline_token = start_deadline(left)
                return await behavior(request, context)
            except BaseException as exc:
                code = _code_of(context, exc)
                reason = reason_of(context)
                raise
            finally:
                call_origin.reset(origin_token)
                if deadline_token is not None:
                    call_deadline.reset(deadline_token)
                if admitted:
                    limit.leave()
                # The caller may already have its answer: record, log, and only then leave
                # the in-flight count, so "in flight == 0" means every call is on the page.
                elapsed = now() - started
                observe(code, reason, elapsed)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "%s %s%s %.1fms",
                        method,
                        code.name,
                        f" {reason}" if reason else "",
                        elapsed * 1000,
                    )
                in_flight_gauge.dec()
                request_id.reset(token)

        return observed


class _ObservedGenericHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(
        self,
        inner: grpc.GenericRpcHandler,  # type: ignore[type-arg]
        observer: CallObserver,
    ) -> None:
        self._inner = inner
        self._observer = observer

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:  # type: ignore[type-arg]
        handler = self._inner.service(handler_call_details)
        wrapped: grpc.RpcMethodHandler | None = self._observer.wrap(  # type: ignore[type-arg]
            handler_call_details.method, handler
        )
        return wrapped


class ObservedServer:
    """What the generated add_*Servicer_to_server functions call on a server, wrapping each
    handler through a CallObserver before it reaches the real grpc.aio server."""

    def __init__(self, server: grpc.aio.Server, observer: CallObserver) -> None:
        self._server = server
        self._observer = observer

    def add_generic_rpc_handlers(
        self,
        handlers: Sequence[grpc.GenericRpcHandler],  # type: ignore[type-arg]
    ) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_ObservedGenericHandler(h, self._observer) for h in handlers)
        )

    def add_registered_method_handlers(
        self,
        service: str,
        handlers: dict[str, grpc.RpcMethodHandler],  # type: ignore[type-arg]
    ) -> None:
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service,
            {
                name: self._observer.wrap(f"/{service}/{name}", handler)
                for name, handler in handlers.items()
            },
        )


async def _abort_malformed(
    context: grpc.aio.ServicerContext[Any, Any], method: str, request: Malformed
) -> None:
    log.info("%s: request is not a valid protobuf message (%s)", method, request.why)
    status = to_status(
        ServiceError(
            Reason.INVALID_ARGUMENT,
            "the request is not a valid protobuf message of this method's request type"
            " (a string field must hold valid UTF-8)",
        )
    )
    await context.abort(status.code, status.details, status.trailing_metadata)
