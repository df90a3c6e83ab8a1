"""Each call's deadline, published by the door that admitted it and read by the store.

A door (the gRPC call wrapper, the in-process v4 backend) sets `call_deadline` for the call
it runs; the store bounds its waits for a connection and for the database by it
(server.store), so a call never holds a connection past the moment nobody waits for its
answer. A module of its own, below every layer that reads or writes it: the store must not
import a door to learn the time its caller has left.
"""

from __future__ import annotations

import asyncio
import contextvars

# Event-loop time at which the current call's deadline passes; None when it has none.
call_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "call_deadline", default=None
)


def remaining(deadline: float | None) -> float | None:
    """Seconds left until `deadline` (event-loop time), never negative; None for none."""
    if deadline is None:
        return None
    return max(0.0, deadline - asyncio.get_running_loop().time())


def start(seconds: float) -> contextvars.Token[float | None]:
    """Set the current call's deadline `seconds` from now; reset it with the token."""
    return call_deadline.set(asyncio.get_running_loop().time() + seconds)
