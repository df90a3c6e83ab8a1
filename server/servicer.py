"""gRPC servicers: protobuf <-> core, and exceptions <-> google.rpc.Status. Nothing else."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import grpc

from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from server.core import AccountInput, FollowCore, ItemResult
from server.errors import Reason, ServiceError
from server.status import to_status

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Servicer = TypeVar("Servicer")
Handler = Callable[[Servicer, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]

_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.exceptions.OperatorInterventionError,
    # A connection the database dropped mid-transaction can fail again as the pool takes
    # it back ("cannot switch to state ...; another operation is in progress"), masking
    # the connection error; seen by the soak when PostgreSQL stops under load.
    asyncpg.InternalClientError,
)


def classify(exc: BaseException) -> ServiceError:
    """The ServiceError a failure is reported as; database trouble never leaks its text."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, asyncpg.QueryCanceledError):
        return ServiceError(Reason.DEADLINE_EXCEEDED, "the database did not answer in time")
    if isinstance(exc, _UNAVAILABLE_ERRORS):
        return ServiceError(
            Reason.DATABASE_UNAVAILABLE, "the database is unavailable; try again later"
        )
    return ServiceError(Reason.INTERNAL, "internal error")


def rpc(
    handler: Handler[Servicer, Req, Resp],
) -> Handler[Servicer, Req, Resp]:
    """Turn failures into a google.rpc.Status with one ErrorInfo (AIP-193)."""

    @functools.wraps(handler)
    async def wrapper(
        self: Servicer, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        try:
            return await handler(self, request, context)
        except Exception as exc:
            error = classify(exc)
            if error.reason is Reason.INTERNAL:
                log.exception("internal error in %s", handler.__name__)
            elif error is not exc:
                log.warning(
                    "%s failed: %s (%s)", handler.__name__, error.reason, type(exc).__name__
                )
            status = to_status(error)
            await context.abort(status.code, status.details, status.trailing_metadata)

    return wrapper


# Responses are filled in place (`add()`, then plain attribute sets) rather than built
# from a list of messages: a message passed to a repeated field's constructor is copied,
# and keyword construction costs more than setting the fields. For a Check of 100 targets
# that is several times cheaper (tests/bench measures it). Zero values are left unset.


def _fill_results(container: Any, items: list[ItemResult]) -> None:
    add = container.add
    for i in items:
        result = add()
        result.user_id = i.user_id
        if i.code:
            result.code = i.code
            result.message = i.message


class FollowServicer(pb_grpc.FollowServiceServicer):
    """follow.v1.FollowService over the core: protobuf in and out, failures as
    google.rpc.Status."""

    def __init__(self, core: FollowCore) -> None:
        self._core = core

    @rpc
    async def Follow(
        self,
        request: pb.FollowRequest,
        context: grpc.aio.ServicerContext[pb.FollowRequest, pb.FollowResponse],
    ) -> pb.FollowResponse:
        items = await self._core.follow(request.user_id, request.target_ids)
        response = pb.FollowResponse()
        _fill_results(response.results, items)
        return response

    @rpc
    async def Unfollow(
        self,
        request: pb.UnfollowRequest,
        context: grpc.aio.ServicerContext[pb.UnfollowRequest, pb.UnfollowResponse],
    ) -> pb.UnfollowResponse:
        items = await self._core.unfollow(request.user_id, request.target_ids)
        response = pb.UnfollowResponse()
        _fill_results(response.results, items)
        return response

    @rpc
    async def List(
        self,
        request: pb.ListRequest,
        context: grpc.aio.ServicerContext[pb.ListRequest, pb.ListResponse],
    ) -> pb.ListResponse:
        page = await self._core.list_page(
            request.user_id, request.follow_type, request.page_size, request.page_token
        )
        response = pb.ListResponse(next_page_token=page.next_page_token)
        add = response.entries.add
        for user_id, at_us, nick, face_url, profile_sequence in page.entries:
            entry = add()
            entry.user_id = user_id
            if nick:
                entry.nick = nick
            if face_url:
                entry.face_url = face_url
            if profile_sequence:
                entry.profile_sequence = profile_sequence
            seconds, micros = divmod(at_us, 1_000_000)
            follow_time = entry.follow_time
            follow_time.seconds = seconds
            follow_time.nanos = micros * 1000
        return response

    @rpc
    async def Check(
        self,
        request: pb.CheckRequest,
        context: grpc.aio.ServicerContext[pb.CheckRequest, pb.CheckResponse],
    ) -> pb.CheckResponse:
        results = await self._core.check(request.user_id, request.target_ids)
        response = pb.CheckResponse()
        add = response.results.add
        for user_id, code, message, follow_type in results:
            result = add()
            result.user_id = user_id
            if code:
                result.code = code  # type: ignore[assignment]
                result.message = message
            if follow_type:
                result.follow_type = follow_type  # type: ignore[assignment]
        return response

    @rpc
    async def GetInfo(
        self,
        request: pb.GetInfoRequest,
        context: grpc.aio.ServicerContext[pb.GetInfoRequest, pb.GetInfoResponse],
    ) -> pb.GetInfoResponse:
        results = await self._core.get_info(request.user_id, request.target_ids)
        response = pb.GetInfoResponse()
        add = response.infos.add
        for user_id, code, message, counts in results:
            info = add()
            info.user_id = user_id
            if code:
                info.code = code  # type: ignore[assignment]
                info.message = message
            info.follower_count = counts.followers
            info.following_count = counts.following
            info.mutual_count = counts.mutual
        return response


class AccountServicer(pb_grpc.AccountServiceServicer):
    """follow.v1.AccountService over the core: import, check and delete accounts."""

    def __init__(self, core: FollowCore) -> None:
        self._core = core

    @rpc
    async def ImportAccounts(
        self,
        request: pb.ImportAccountsRequest,
        context: grpc.aio.ServicerContext[pb.ImportAccountsRequest, pb.ImportAccountsResponse],
    ) -> pb.ImportAccountsResponse:
        accounts = [
            AccountInput(
                a.user_id,
                a.nick if a.HasField("nick") else None,
                a.face_url if a.HasField("face_url") else None,
            )
            for a in request.accounts
        ]
        items = await self._core.import_accounts(accounts)
        response = pb.ImportAccountsResponse()
        _fill_results(response.results, items)
        return response

    @rpc
    async def CheckAccounts(
        self,
        request: pb.CheckAccountsRequest,
        context: grpc.aio.ServicerContext[pb.CheckAccountsRequest, pb.CheckAccountsResponse],
    ) -> pb.CheckAccountsResponse:
        statuses = await self._core.check_accounts(request.user_ids)
        return pb.CheckAccountsResponse(
            statuses=[
                pb.AccountStatus(
                    user_id=s.user_id,
                    code=s.code.value,  # type: ignore[arg-type]
                    message=s.message,
                    imported=s.imported,
                )
                for s in statuses
            ]
        )

    @rpc
    async def DeleteAccounts(
        self,
        request: pb.DeleteAccountsRequest,
        context: grpc.aio.ServicerContext[pb.DeleteAccountsRequest, pb.DeleteAccountsResponse],
    ) -> pb.DeleteAccountsResponse:
        items = await self._core.delete_accounts(request.user_ids)
        response = pb.DeleteAccountsResponse()
        _fill_results(response.results, items)
        return response
