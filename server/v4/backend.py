"""How the shim reaches the core: always through the follow.v1 contract (request message in,
response message or a google.rpc.Status out).

- `over_channel`: the generated stubs over a grpc.aio channel, for a shim run alone against
  a remote server (--grpc-target).
- `in_process`: the same servicer methods the gRPC server runs, called directly with the
  protobuf request, for the shim inside `follow-server`. It skips a loopback HTTP/2 round
  trip per call (and any TLS on the gRPC port) while keeping exactly the contract's messages
  and errors: the servicers' abort() is caught and read like a remote call's trailers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc

from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from server import deadline, logs
from server.admission import InFlightLimit
from server.core import FollowCore
from server.servicer import AccountServicer, FollowServicer
from server.status import AbortedError, InProcessContext, error_detail

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Unary = Callable[[Req], Awaitable[Resp]]

DEFAULT_TIMEOUT_SECONDS = 10.0


class CallFailedError(Exception):
    """A follow.v1 call that failed as a whole."""

    def __init__(
        self, status: grpc.StatusCode, message: str, reason: str | None, field: str | None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.field = field

    @classmethod
    def from_trailers(
        cls,
        status: grpc.StatusCode,
        message: str | None,
        metadata: Sequence[tuple[str, str | bytes]] | None,
    ) -> CallFailedError:
        """Read the one follow.v1 ErrorInfo (AIP-193) from the status details, if any."""
        detail = error_detail(metadata)
        if detail is None:
            return cls(status, message or "", None, None)
        return cls(status, message or "", detail.reason, detail.field)


@dataclass(frozen=True, slots=True)
class Backend:
    """The follow.v1 methods, each a coroutine from request to response raising CallFailedError."""

    Follow: Unary[pb.FollowRequest, pb.FollowResponse]
    Unfollow: Unary[pb.UnfollowRequest, pb.UnfollowResponse]
    List: Unary[pb.ListRequest, pb.ListResponse]
    Check: Unary[pb.CheckRequest, pb.CheckResponse]
    GetInfo: Unary[pb.GetInfoRequest, pb.GetInfoResponse]
    ImportAccounts: Unary[pb.ImportAccountsRequest, pb.ImportAccountsResponse]
    CheckAccounts: Unary[pb.CheckAccountsRequest, pb.CheckAccountsResponse]
    DeleteAccounts: Unary[pb.DeleteAccountsRequest, pb.DeleteAccountsResponse]


def over_channel(channel: grpc.aio.Channel, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> Backend:
    follow = pb_grpc.FollowServiceStub(channel)
    accounts = pb_grpc.AccountServiceStub(channel)

    def remote(method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp]) -> Unary[Req, Resp]:
        async def call(request: Req) -> Resp:
            try:
                # The HTTP request's id goes on to the gRPC server's logs (server.logs).
                return await method(request, timeout=timeout, metadata=logs.outgoing_metadata())
            except grpc.aio.AioRpcError as exc:
                trailers = cast(Sequence[tuple[str, str | bytes]], exc.trailing_metadata() or ())
                raise CallFailedError.from_trailers(exc.code(), exc.details(), trailers) from None

        return call

    return Backend(
        Follow=remote(follow.Follow),
        Unfollow=remote(follow.Unfollow),
        List=remote(follow.List),
        Check=remote(follow.Check),
        GetInfo=remote(follow.GetInfo),
        ImportAccounts=remote(accounts.ImportAccounts),
        CheckAccounts=remote(accounts.CheckAccounts),
        DeleteAccounts=remote(accounts.DeleteAccounts),
    )


def in_process(
    core: FollowCore,
    admission: InFlightLimit | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> Backend:
    """Calls share the gRPC server's in-flight bound (`admission`, the one its call wrapper
    counts) and carry a deadline of `timeout` seconds, as a remote call would."""
    follow = FollowServicer(core)
    accounts = AccountServicer(core)
    context = cast(Any, InProcessContext())

    def local(method: Callable[[Req, Any], Awaitable[Resp]]) -> Unary[Req, Resp]:
        async def call(request: Req) -> Resp:
            if admission is not None:
                refused = admission.enter()
                if refused is not None:
                    raise CallFailedError.from_trailers(
                        refused.code, refused.details, refused.trailing_metadata
                    )
            token = deadline.start(timeout)
            try:
                return await method(request, context)
            except AbortedError as aborted:
                raise CallFailedError.from_trailers(
                    aborted.code, aborted.details, aborted.trailing_metadata
                ) from None
            finally:
                deadline.call_deadline.reset(token)
                if admission is not None:
                    admission.leave()

        return call

    return Backend(
        Follow=local(follow.Follow),
        Unfollow=local(follow.Unfollow),
        List=local(follow.List),
        Check=local(follow.Check),
        GetInfo=local(follow.GetInfo),
        ImportAccounts=local(accounts.ImportAccounts),
        CheckAccounts=local(accounts.CheckAccounts),
        DeleteAccounts=local(accounts.DeleteAccounts),
    )
