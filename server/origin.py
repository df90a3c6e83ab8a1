"""Who made the current call, published by the door that admitted it and read by the store.

A change event (server.store writes one per acknowledged change, see the follow_events
table) records where the call came from, as the hosted service's webhooks report it: the
caller's IP address and the platform ("RESTAPI" for a v4 call, "gRPC" for a gRPC one). The
gRPC call wrapper sets it from the peer address; the v4 HTTP door from the HTTP client's
address. A module of its own, below every layer, like server.deadline.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

GRPC = "gRPC"
RESTAPI = "RESTAPI"


@dataclass(frozen=True, slots=True)
class Origin:
    """A call's caller: its IP address ('' when unknown) and the door's platform name."""

    client_ip: str
    platform: str


UNKNOWN = Origin("", GRPC)

call_origin: contextvars.ContextVar[Origin] = contextvars.ContextVar("call_origin", default=UNKNOWN)


def from_grpc_peer(peer: str | None) -> Origin:
    """The Origin of a gRPC peer string ('ipv4:127.0.0.1:5000', 'ipv6:[::1]:5000',
    'unix:/path'): the bare address for IP peers, '' for anything else."""
    if not peer:
        return UNKNOWN
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return Origin(rest.rpartition(":")[0], GRPC)
    if kind == "ipv6":
        host = rest.rpartition(":")[0]
        return Origin(host.strip("[]"), GRPC)
    return UNKNOWN
