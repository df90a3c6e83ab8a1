"""The error vocabulary: per-item result codes and request-level reasons, and the two kinds
of operator-facing failure (a configuration that cannot work, a start or run that failed).

One table maps each reason to its gRPC status code and v4 number, so both doors say the same
thing; proto/follow/v1/follow.proto documents the same table (tests/test_errors.py compares
the two both ways).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc


class ItemCode(enum.IntEnum):
    """Per-item outcome; the numbers are follow.v1.ResultCode's."""

    OK = 0
    INVALID_ARGUMENT = 1
    ACCOUNT_NOT_FOUND = 2
    FOLLOWING_LIMIT_REACHED = 3


class FollowType(enum.IntEnum):
    """Relationship seen from a user; the numbers are follow.v1.FollowType's and v4's."""

    NONE = 0
    FAN = 1
    FOLLOWING = 2
    MUTUAL = 3


ITEM_V4_CODES: dict[ItemCode, int] = {
    ItemCode.OK: 0,
    ItemCode.INVALID_ARGUMENT: 30001,
    ItemCode.ACCOUNT_NOT_FOUND: 30003,
    ItemCode.FOLLOWING_LIMIT_REACHED: 32100,
}


class Reason(enum.StrEnum):
    """Why a whole request failed: google.rpc.ErrorInfo.reason."""

    INVALID_USER_ID = "INVALID_USER_ID"
    MISSING_ITEMS = "MISSING_ITEMS"
    TOO_MANY_ITEMS = "TOO_MANY_ITEMS"
    INVALID_FOLLOW_TYPE = "INVALID_FOLLOW_TYPE"
    INVALID_PAGE_SIZE = "INVALID_PAGE_SIZE"
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"  # noqa: S105 - a reason name, not a secret
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    USER_NOT_FOUND = "USER_NOT_FOUND"
    CONTENTION = "CONTENTION"
    DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    OVERLOADED = "OVERLOADED"
    INTERNAL = "INTERNAL"
    # follow.v1.EventService/Watch (proto/follow/v1/events.proto)
    INVALID_POSITION = "INVALID_POSITION"
    POSITION_EXPIRED = "POSITION_EXPIRED"
    TOO_MANY_WATCHERS = "TOO_MANY_WATCHERS"
    SHUTTING_DOWN = "SHUTTING_DOWN"


@dataclass(frozen=True, slots=True)
class ReasonMapping:
    """How one failure reason shows at each door: its gRPC status code and its v4 ErrorCode."""

    grpc_code: grpc.StatusCode
    v4_code: int


REASONS: dict[Reason, ReasonMapping] = {
    Reason.INVALID_USER_ID: ReasonMapping(grpc.StatusCode.INVALID_ARGUMENT, 30001),
    Reason.MISSING_ITEMS: ReasonMapping(grpc.StatusCode.INVALID_ARGUMENT, 30001),
    Reason.TOO_MANY_ITEMS: ReasonMapping(grpc.StatusCode.INVALID_ARGUMENT, 30001),
    Reason.INVALID_FOLLOW_TYPE: ReasonMapping(grpc.StatusCode.INVALID_ARGUMENT, 30001),
    Reason.INVALID_PAGE_SIZE: ReasonMapping(grpc.StatusCode.INVALID_ARGUMENT, 30001),
    Reason.INVALID_PAGE_TOKEN: ReasonMapping(grpc.StatusCode.INVALID_ARGUMENT, 30001),
    Reason.INVALID_ARGUMENT: ReasonMapping(grpc.StatusCode.INVALID_ARGUMENT, 30001),
    Reason.USER_NOT_FOUND: ReasonMapping(grpc.StatusCode.NOT_FOUND, 30003),
    Reason.CONTENTION: ReasonMapping(grpc.StatusCode.ABORTED, 30006),
    Reason.DATABASE_UNAVAILABLE: ReasonMapping(grpc.StatusCode.UNAVAILABLE, 30006),
    Reason.DEADLINE_EXCEEDED: ReasonMapping(grpc.StatusCode.DEADLINE_EXCEEDED, 30007),
    Reason.OVERLOADED: ReasonMapping(grpc.StatusCode.RESOURCE_EXHAUSTED, 30006),
    Reason.INTERNAL: ReasonMapping(grpc.StatusCode.INTERNAL, 30006),
    # Watch is gRPC only; the v4 numbers say what a v4 caller would read if it ever met one.
    Reason.INVALID_POSITION: ReasonMapping(grpc.StatusCode.INVALID_ARGUMENT, 30001),
    Reason.POSITION_EXPIRED: ReasonMapping(grpc.StatusCode.OUT_OF_RANGE, 30001),
    Reason.TOO_MANY_WATCHERS: ReasonMapping(grpc.StatusCode.RESOURCE_EXHAUSTED, 30006),
    Reason.SHUTTING_DOWN: ReasonMapping(grpc.StatusCode.UNAVAILABLE, 30006),
}

# A failed gRPC call that carries no follow.v1 ErrorInfo (a remote server that cannot be
# reached, a deadline passed on the client side): its v4 code by status; anything else 30006.
STATUS_V4_CODES: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.DEADLINE_EXCEEDED: 30007,
    grpc.StatusCode.UNAVAILABLE: 30006,
    grpc.StatusCode.INVALID_ARGUMENT: 30001,
    grpc.StatusCode.NOT_FOUND: 30003,
}


def v4_code(reason: str | None, status: grpc.StatusCode) -> int:
    """The v4 number of a failed call: by its ErrorInfo reason, else by its status."""
    if reason is not None and reason in Reason.__members__:
        return REASONS[Reason(reason)].v4_code
    return STATUS_V4_CODES.get(status, 30006)


ERROR_DOMAIN = "follow.v1"


class ServiceError(Exception):
    """A request that fails as a whole and changes nothing. A message about a field starts
    with the field's name ("page_token: ..."), added here when the raiser left it out, so
    every such message reads the same way at both doors."""

    def __init__(self, reason: Reason, message: str, field: str | None = None) -> None:
        if field and not message.startswith(f"{field}: "):
            message = f"{field}: {message}"
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field

    @property
    def mapping(self) -> ReasonMapping:
        return REASONS[self.reason]


class ConfigError(Exception):
    """A flag, variable, file or folder that cannot work: nothing was started, the operator
    fixes the invocation. One line says what is wrong and what to do; exit status 2."""

    exit_code = 2


class StartupError(Exception):
    """A valid configuration that could not start or keep running (a port already taken, the
    database unreachable or refusing to start). One line says why; exit status 1."""

    exit_code = 1
