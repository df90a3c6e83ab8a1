"""Admission control: a bound on in-flight calls per process, and each call's deadline.

Without a bound, a flood queues without limit: every waiting call holds its request, a
coroutine and, soon, a place in the pool's queue, and all of them time out together. Past
`limit` calls in flight a new call is refused at once with RESOURCE_EXHAUSTED (OVERLOADED),
which a client can back off from; memory then stays proportional to the limit.

The interceptor also publishes the call's deadline (`call_deadline`, in event-loop time) so
the store can bound its waits for a connection and for the database by the time the caller
has left (server.store): a call never holds a connection past the moment nobody waits for
its answer.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from server.errors import Reason, ServiceError

# Event-loop time at which the current call's deadline passes; None when it has none.
call_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "call_deadline", default=None
)

DEFAULT_MAX_IN_FLIGHT = 512
# Health and reflection answer even when the service is saturated: a load balancer must
# tell "busy" from "dead".
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


def remaining(deadline: float | None) -> float | None:
    """Seconds left until `deadline` (event-loop time), never negative; None for none."""
    if deadline is None:
        return None
    return max(0.0, deadline - asyncio.get_running_loop().time())


class InFlightLimit(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuse calls past `limit` in flight in this process; publish each call's deadline."""

    def __init__(self, limit: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        self.limit = limit
        self.in_flight = 0
        self.rejected = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],  # type: ignore[type-arg]
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        behavior: Behavior = handler.unary_unary  # type: ignore[assignment]
        return grpc.unary_unary_rpc_method_handler(
            self._admit(behavior),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _admit(self, behavior: Behavior) -> Behavior:
        async def admitted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if self.in_flight >= self.limit:
                self.rejected += 1
                # Imported here: the servicer's modules import this one (the store reads
                # call_deadline), so a module-level import would be circular.
                from server.servicer import to_status

                status = to_status(
                    ServiceError(
                        Reason.OVERLOADED,
                        f"the server has {self.limit} calls in flight; retry with backoff",
                    )
                )
                await context.abort(status.code, status.details, status.trailing_metadata)
            self.in_flight += 1
            left = context.time_remaining()
            deadline = None if left is None else asyncio.get_running_loop().time() + left
            token = call_deadline.set(deadline)
            try:
                return await behavior(request, context)
            finally:
                call_deadline.reset(token)
                self.in_flight -= 1

        return admitted
