"""Admission control: a bound on in-flight calls per process, shared by both doors.

Without a bound, a flood queues without limit: every waiting call holds its request, a
coroutine and, soon, a place in the pool's queue, and all of them time out together. Past
`limit` calls in flight a new call is refused at once with RESOURCE_EXHAUSTED (OVERLOADED),
which a client can back off from; memory then stays proportional to the limit.

The gRPC call wrapper (server.interceptor) and the in-process v4 backend
(server.v4.backend) each admit a call through `enter()` / `leave()` of the same
InFlightLimit, so a v4 request and a gRPC call count against one bound. This is plain
bookkeeping, not a grpc interceptor of its own: one wrapper per method, chosen when the
method is registered, costs one coroutine frame per call instead of a walk through the
interceptor chain.
"""

from __future__ import annotations

import grpc

from server.errors import Reason, ServiceError
from server.status import to_status

DEFAULT_MAX_IN_FLIGHT = 512
# Health and reflection answer even when the service is saturated: a load balancer must
# tell "busy" from "dead".
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def exempt(method: str) -> bool:
    """Whether `method` ('/pkg.Service/Method') answers even past the in-flight limit."""
    return method.startswith(EXEMPT_PREFIXES)


class InFlightLimit:
    """The count of admitted calls in flight in this process and its bound."""

    def __init__(self, limit: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        self.limit = limit
        self.in_flight = 0
        self.rejected = 0

    def enter(self) -> grpc.Status | None:
        """Admit one call (None), or refuse it: the status to end it with (and count it).
        An admitted call must `leave()` once it is done."""
        if self.in_flight >= self.limit:
            self.rejected += 1
            return to_status(
                ServiceError(
                    Reason.OVERLOADED,
                    f"the server has {self.limit} calls in flight; retry with backoff",
                )
            )
        self.in_flight += 1
        return None

    def leave(self) -> None:
        self.in_flight -= 1
