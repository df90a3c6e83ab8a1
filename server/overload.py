"""Admission control: a bound on in-flight calls per process, and each call's deadline.

Without a bound, a flood queues without limit: every waiting call holds its request, a
coroutine and, soon, a place in the pool's queue, and all of them time out together. Past
`limit` calls in flight a new call is refused at once with RESOURCE_EXHAUSTED (OVERLOADED),
which a client can back off from; memory then stays proportional to the limit.

The call wrapper (server.interceptor) admits each call of the service's own methods here and
publishes the call's deadline (`call_deadline`, in event-loop time) so the store can bound
its waits for a connection and for the database by the time the caller has left
(server.store): a call never holds a connection past the moment nobody waits for its answer.
This is plain bookkeeping, not a grpc interceptor of its own: one wrapper per method,
chosen when the method is registered, costs one coroutine frame per call instead of a walk
through the interceptor chain.
"""

from __future__ import annotations

import asyncio
import contextvars

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


def remaining(deadline: float | None) -> float | None:
    """Seconds left until `deadline` (event-loop time), never negative; None for none."""
    if deadline is None:
        return None
    return max(0.0, deadline - asyncio.get_running_loop().time())


def exempt(method: str) -> bool:
    """Whether `method` ('/pkg.Service/Method') answers even past the in-flight limit."""
    return method.startswith(EXEMPT_PREFIXES)


class InFlightLimit:
    """The count of admitted calls in flight in this process and its bound."""

    def __init__(self, limit: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        self.limit = limit
        self.in_flight = 0
        self.rejected = 0

    def overloaded(self) -> grpc.Status:
        """The status a call past the limit is refused with (and counts it)."""
        self.rejected += 1
        # Imported here: the servicer's modules import this one (the store reads
        # call_deadline), so a module-level import would be circular.
        from server.servicer import to_status

        return to_status(
            ServiceError(
                Reason.OVERLOADED,
                f"the server has {self.limit} calls in flight; retry with backoff",
            )
        )
