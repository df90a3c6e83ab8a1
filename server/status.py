"""google.rpc.Status with one follow.v1 ErrorInfo (AIP-193), both ways: what a door sends for
a ServiceError, and what a reader makes of a call's trailers. Every door and every client
helper (the gRPC call wrapper, the v4 backend, the tests) uses these two, so the wire form of
an error is written once."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.errors import ERROR_DOMAIN, ServiceError

DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    """The ErrorInfo a failed call carried: its reason and, if it names one, the field."""

    reason: str
    domain: str
    field: str | None


def to_status(error: ServiceError) -> grpc.Status:
    """The status a call failing with `error` ends with."""
    info = error_details_pb2.ErrorInfo(reason=error.reason.value, domain=ERROR_DOMAIN)
    if error.field:
        info.metadata["field"] = error.field
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(
        code=error.mapping.grpc_code.value[0], message=error.message, details=[detail]
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


def error_detail(
    metadata: Iterable[tuple[str, str | bytes]] | None, domain: str | None = ERROR_DOMAIN
) -> ErrorDetail | None:
    """The first ErrorInfo (of `domain`, or of any domain when None) in a call's trailing
    metadata; None when there is none or the details do not parse."""
    for key, value in metadata or ():
        if key != DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return None
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and (domain is None or info.domain == domain):
                return ErrorDetail(info.reason, info.domain, info.metadata.get("field"))
    return None


class AbortedError(Exception):
    """A servicer method called in process ended its call with abort()."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, Any], ...]
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


class InProcessContext:
    """What the servicers use of grpc.aio.ServicerContext, for calling them in process (the
    v4 shim's backend, servicer tests): an awaitable abort that raises AbortedError with the
    status a remote caller would have read, and the caller's metadata."""

    def __init__(self, invocation_metadata: tuple[tuple[str, Any], ...] = ()) -> None:
        self._invocation_metadata = invocation_metadata

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, Any]] = (),
    ) -> NoReturn:
        raise AbortedError(code, details, tuple(trailing_metadata))

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._invocation_metadata
