"""The outermost gRPC interceptor: a request id for every call, metrics, a debug access line,
and a clear INVALID_ARGUMENT for a request that is not a valid protobuf message.

Malformed requests: grpcio deserializes a request before any handler code runs, and when
that fails (a string field holding invalid UTF-8, a truncated varint) it answers by itself:
grpcio 1.85's asyncio server says UNKNOWN "Unexpected <class DecodeError>: Error parsing
message ... String field had bad UTF-8" (the threaded server says INTERNAL "Exception
deserializing request!"). Both blame the server for the caller's bytes and carry no
ErrorInfo, so this interceptor swaps in a deserializer that never raises: a message
that does not parse becomes a `Malformed` marker, answered with INVALID_ARGUMENT and an
ErrorInfo (reason INVALID_ARGUMENT, domain follow.v1) before the servicer sees it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from server import logs
from server.errors import Reason, ServiceError
from server.metrics import Metrics

log = logging.getLogger(__name__)

_DETAILS_KEY = "grpc-status-details-bin"

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
    for key, value in context.trailing_metadata() or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                status = status_pb2.Status.FromString(value)
            except DecodeError:
                return None
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    reason: str = info.reason
                    return reason
    return None


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


class ObservingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every unary-unary method of the service (health and reflection too)."""

    def __init__(self, metrics: Metrics) -> None:
        logs.install_record_factory()
        self.metrics = metrics
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # type: ignore[type-arg]

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],  # type: ignore[type-arg]
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # unknown methods (UNIMPLEMENTED) and streams pass through
        behavior: Behavior = handler.unary_unary  # type: ignore[assignment]
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._observe(method, behavior),
            request_deserializer=lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = wrapped
        return wrapped

    def _observe(self, method: str, behavior: Behavior) -> Behavior:
        metrics = self.metrics

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            offered = None
            for key, value in context.invocation_metadata() or ():
                if key == logs.REQUEST_ID_HEADER:
                    offered = value
                    break
            rid = logs.accept_request_id(offered)
            token = logs.request_id.set(rid)
            started = time.perf_counter()
            metrics.grpc_in_flight.inc()
            code = grpc.StatusCode.OK
            reason: str | None = None
            try:
                await context.send_initial_metadata(((logs.REQUEST_ID_HEADER, rid),))
                if isinstance(request, Malformed):
                    await _abort_malformed(context, method, request)
                return await behavior(request, context)
            except BaseException as exc:
                code = _code_of(context, exc)
                reason = reason_of(context)
                raise
            finally:
                # The caller may already have its answer: record, log, and only then leave
                # the in-flight count, so "in flight == 0" means every call is on the page.
                elapsed = time.perf_counter() - started
                metrics.observe_grpc(method, code, reason, elapsed)
                log.debug(
                    "%s %s%s %.1fms",
                    method,
                    code.name,
                    f" {reason}" if reason else "",
                    elapsed * 1000,
                )
                metrics.grpc_in_flight.dec()
                logs.request_id.reset(token)

        return observed


async def _abort_malformed(
    context: grpc.aio.ServicerContext[Any, Any], method: str, request: Malformed
) -> None:
    # Imported here: server.servicer imports the store, which imports server.overload;
    # keeping this module light lets app.py import it first.
    from server.servicer import to_status

    log.info("%s: request is not a valid protobuf message (%s)", method, request.why)
    status = to_status(
        ServiceError(
            Reason.INVALID_ARGUMENT,
            "the request is not a valid protobuf message of this method's request type"
            " (a string field must hold valid UTF-8)",
        )
    )
    await context.abort(status.code, status.details, status.trailing_metadata)
