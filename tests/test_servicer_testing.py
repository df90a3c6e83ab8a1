"""Servicer-level tests with grpcio-testing (grpc_testing), over the real database.

What this module covers, plainly: the servicers' handlers (request -> core -> store ->
PostgreSQL, and failures -> google.rpc.Status) driven through grpc_testing's server, beside
the real-channel tests of tests/test_servicer.py. What grpc_testing cannot check here: the
asyncio ServicerContext itself (its abort, deadlines, metadata), which the bridge below
replaces; tests/test_servicer.py covers those over a real channel.

grpc_testing cannot drive grpc.aio servicers by itself: its server calls each handler
synchronously on a thread of its own and takes the return value as the response, so an
`async def` handler "answers" with an un-awaited coroutine (pinned below by
test_grpc_testing_alone_cannot_await_async_handlers). It also drops the trailing metadata
of an abort, which is where the google.rpc.Status with the ErrorInfo travels.

So the servicers are handed to grpc_testing through a small bridge: a synchronous servicer
whose handlers submit the real async handler to the test's event loop and wait for it,
with server.status.InProcessContext (the v4 shim's in-process backend uses the same one)
as the ServicerContext: the bridge turns the aio `await context.abort(code, details,
trailing_metadata)` into grpc_testing's set_code / set_details / set_trailing_metadata, the
way a synchronous servicer reports a status. Everything behind the servicers (FollowCore,
Store, asyncpg pool, PostgreSQL) is real.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import grpc_testing
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from follow.v1 import follow_pb2 as pb
from server.core import FollowCore
from server.cursor import CursorCodec
from server.rules import Limits
from server.servicer import AccountServicer, FollowServicer
from server.status import AbortedError, InProcessContext
from server.store import Store

FOLLOW_SERVICE = pb.DESCRIPTOR.services_by_name["FollowService"]
ACCOUNT_SERVICE = pb.DESCRIPTOR.services_by_name["AccountService"]
STATUS_DETAILS_KEY = "grpc-status-details-bin"
MAX_FOLLOWING = 3


class SyncBridge:
    """A synchronous servicer for grpc_testing that runs an aio servicer's handlers on
    `loop` and reports their aborts the synchronous way."""

    def __init__(self, servicer: object, loop: asyncio.AbstractEventLoop) -> None:
        self._servicer = servicer
        self._loop = loop

    def __getattr__(self, name: str) -> Callable[[Message, Any], Message | None]:
        handler = getattr(self._servicer, name)

        def call(request: Message, context: Any) -> Message | None:
            aio_context = InProcessContext(tuple(context.invocation_metadata() or ()))
            future = asyncio.run_coroutine_threadsafe(handler(request, aio_context), self._loop)
            try:
                response: Message = future.result(timeout=60)
            except AbortedError as aborted:
                context.set_trailing_metadata(aborted.trailing_metadata)
                context.set_code(aborted.code)
                context.set_details(aborted.details)
                return None
            return response

        return call


@dataclass
class Outcome:
    """How a call through grpc_testing ended: response or status, with trailers."""

    response: Any
    code: grpc.StatusCode
    details: str
    trailing_metadata: Sequence[tuple[str, str | bytes]]

    def error_info(self) -> error_details_pb2.ErrorInfo:
        """The one ErrorInfo of the google.rpc.Status in the trailing metadata (AIP-193)."""
        raw = [v for k, v in self.trailing_metadata if k == STATUS_DETAILS_KEY]
        assert len(raw) == 1, self.trailing_metadata
        assert isinstance(raw[0], bytes)
        status = status_pb2.Status.FromString(raw[0])
        assert status.code == self.code.value[0]
        assert status.message == self.details
        infos = []
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                infos.append(info)
        assert len(infos) == 1
        assert infos[0].domain == "follow.v1"
        return infos[0]


class Harness:
    """grpc_testing's server over the bridged servicers and the real core."""

    def __init__(self, server: Any, core: FollowCore, pool: asyncpg.Pool) -> None:
        self.server = server
        self.core = core
        self.pool = pool

    async def call(self, method: str, request: Message) -> Outcome:
        service = FOLLOW_SERVICE if method in FOLLOW_SERVICE.methods_by_name else ACCOUNT_SERVICE
        rpc = self.server.invoke_unary_unary(
            service.methods_by_name[method], (("x-test", "1"),), request, 30
        )
        # termination() blocks until the handler thread is done; the handler needs this
        # event loop, so wait for it on another thread.
        response, trailing, code, details = await asyncio.to_thread(rpc.termination)
        return Outcome(response, code, details, trailing)

    async def ok(self, method: str, request: Message) -> Any:
        outcome = await self.call(method, request)
        assert outcome.code is grpc.StatusCode.OK, (outcome.code, outcome.details)
        assert type(outcome.response).__name__ == f"{method}Response"
        return outcome.response


async def _core(db_url: str, **pool_settings: str) -> tuple[FollowCore, asyncpg.Pool]:
    pool = await asyncpg.create_pool(
        db_url, min_size=1, max_size=4, server_settings=pool_settings or None
    )
    assert pool is not None
    store = Store(pool)
    core = FollowCore(store, CursorCodec(await store.cursor_key()), Limits(MAX_FOLLOWING))
    return core, pool


@pytest.fixture
async def harness(db_url: str) -> AsyncIterator[Harness]:
    """grpc_testing's server over the real servicers, core, store and a fresh database,
    with a following cap of 3."""
    core, pool = await _core(db_url)
    loop = asyncio.get_running_loop()
    server = grpc_testing.server_from_dictionary(
        {
            FOLLOW_SERVICE: SyncBridge(FollowServicer(core), loop),
            ACCOUNT_SERVICE: SyncBridge(AccountServicer(core), loop),
        },
        grpc_testing.strict_real_time(),
    )
    try:
        yield Harness(server, core, pool)
    finally:
        await pool.close()


async def _import(h: Harness, *user_ids: str) -> None:
    response = await h.ok(
        "ImportAccounts",
        pb.ImportAccountsRequest(accounts=[pb.Account(user_id=u) for u in user_ids]),
    )
    assert [r.code for r in response.results] == [pb.RESULT_CODE_OK] * len(user_ids)


# -- grpc_testing and async servicers ---------------------------------------------------------


async def test_grpc_testing_alone_cannot_await_async_handlers(db_url: str) -> None:
    """grpc_testing hands back an aio handler's coroutine object as if it were the response
    (status OK, nothing ran): the reason for the bridge above. If a grpcio-testing release
    learns to await handlers, this fails and the bridge can go."""
    core, pool = await _core(db_url)
    try:
        server = grpc_testing.server_from_dictionary(
            {FOLLOW_SERVICE: FollowServicer(core)}, grpc_testing.strict_real_time()
        )
        rpc = server.invoke_unary_unary(
            FOLLOW_SERVICE.methods_by_name["Check"],
            (),
            pb.CheckRequest(user_id="nobody", target_ids=["x"]),
            5,
        )
        response, _, code, _ = await asyncio.to_thread(rpc.termination)
        assert inspect.iscoroutine(response)
        assert code is grpc.StatusCode.OK  # although "nobody" does not exist
        response.close()
    finally:
        await pool.close()


# -- FollowService ------------------------------------------------------------------------------


async def test_follow_check_list_getinfo_unfollow(harness: Harness) -> None:
    """Each FollowService handler turns its request into a core call and the result back
    into the response message: per-item codes and messages, FollowType values, list
    entries with times, counts."""
    await _import(harness, "a", "b", "c")
    response = await harness.ok(
        "Follow", pb.FollowRequest(user_id="a", target_ids=["b", "ghost", "a", "c"])
    )
    assert [(r.user_id, r.code, bool(r.message)) for r in response.results] == [
        ("b", pb.RESULT_CODE_OK, False),
        ("ghost", pb.RESULT_CODE_ACCOUNT_NOT_FOUND, True),
        ("a", pb.RESULT_CODE_INVALID_ARGUMENT, True),
        ("c", pb.RESULT_CODE_OK, False),
    ]
    await harness.ok("Follow", pb.FollowRequest(user_id="b", target_ids=["a"]))

    check = await harness.ok("Check", pb.CheckRequest(user_id="a", target_ids=["b", "c", "x"]))
    assert [r.follow_type for r in check.results] == [
        pb.FOLLOW_TYPE_MUTUAL,
        pb.FOLLOW_TYPE_FOLLOWING,
        pb.FOLLOW_TYPE_NONE,
    ]

    page = await harness.ok(
        "List", pb.ListRequest(user_id="a", follow_type=pb.FOLLOW_TYPE_FOLLOWING, page_size=1)
    )
    assert [e.user_id for e in page.entries] == ["c"]
    assert page.next_page_token
    assert page.entries[0].HasField("follow_time")
    assert page.entries[0].follow_time.seconds > 1_600_000_000
    assert page.entries[0].follow_time.nanos % 1000 == 0
    rest = await harness.ok(
        "List",
        pb.ListRequest(
            user_id="a", follow_type=pb.FOLLOW_TYPE_FOLLOWING, page_token=page.next_page_token
        ),
    )
    assert [e.user_id for e in rest.entries] == ["b"]
    assert rest.next_page_token == ""

    info = await harness.ok("GetInfo", pb.GetInfoRequest(user_id="c", target_ids=["a", "b"]))
    assert [(i.follower_count, i.following_count, i.mutual_count) for i in info.infos] == [
        (1, 2, 1),
        (1, 1, 1),
    ]

    response = await harness.ok("Unfollow", pb.UnfollowRequest(user_id="a", target_ids=["b", "z"]))
    assert [r.code for r in response.results] == [pb.RESULT_CODE_OK, pb.RESULT_CODE_OK]
    check = await harness.ok("Check", pb.CheckRequest(user_id="b", target_ids=["a"]))
    assert [r.follow_type for r in check.results] == [pb.FOLLOW_TYPE_FOLLOWING]


async def test_cap_from_limits(harness: Harness) -> None:
    """The servicer reports the core's FOLLOWING_LIMIT_REACHED for targets past the cap the
    core was built with (3 here), in request order."""
    await _import(harness, "a", "b", "c", "d", "e")
    response = await harness.ok(
        "Follow", pb.FollowRequest(user_id="a", target_ids=["b", "c", "d", "e"])
    )
    assert [r.code for r in response.results] == [
        pb.RESULT_CODE_OK,
        pb.RESULT_CODE_OK,
        pb.RESULT_CODE_OK,
        pb.RESULT_CODE_FOLLOWING_LIMIT_REACHED,
    ]
    assert response.results[3].message == "following limit reached"


@pytest.mark.parametrize(
    ("method", "request_", "code", "reason", "field"),
    [
        (
            "Follow",
            pb.FollowRequest(user_id="nobody", target_ids=["a"]),
            grpc.StatusCode.NOT_FOUND,
            "USER_NOT_FOUND",
            "user_id",
        ),
        (
            "List",
            pb.ListRequest(user_id="nobody", follow_type=pb.FOLLOW_TYPE_FAN),
            grpc.StatusCode.NOT_FOUND,
            "USER_NOT_FOUND",
            "user_id",
        ),
        (
            "Check",
            pb.CheckRequest(user_id="a" * 33, target_ids=["a"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_USER_ID",
            "user_id",
        ),
        (
            "GetInfo",
            pb.GetInfoRequest(user_id="a", target_ids=["a"] * 21),
            grpc.StatusCode.INVALID_ARGUMENT,
            "TOO_MANY_ITEMS",
            "target_ids",
        ),
        (
            "Unfollow",
            pb.UnfollowRequest(user_id="a"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "MISSING_ITEMS",
            "target_ids",
        ),
        (
            "List",
            pb.ListRequest(user_id="a", follow_type=pb.FOLLOW_TYPE_NONE),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FOLLOW_TYPE",
            "follow_type",
        ),
        (
            "List",
            pb.ListRequest(user_id="a", follow_type=pb.FOLLOW_TYPE_FAN, page_size=-5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PAGE_SIZE",
            "page_size",
        ),
        (
            "List",
            pb.ListRequest(user_id="a", follow_type=pb.FOLLOW_TYPE_FAN, page_token="nope"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
            "page_token",
        ),
        (
            "ImportAccounts",
            pb.ImportAccountsRequest(accounts=[pb.Account(user_id=f"u{i}") for i in range(101)]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "TOO_MANY_ITEMS",
            "accounts",
        ),
        (
            "DeleteAccounts",
            pb.DeleteAccountsRequest(),
            grpc.StatusCode.INVALID_ARGUMENT,
            "MISSING_ITEMS",
            "user_ids",
        ),
    ],
)
async def test_request_errors_become_status_with_error_info(
    harness: Harness,
    method: str,
    request_: Message,
    code: grpc.StatusCode,
    reason: str,
    field: str,
) -> None:
    """A request-level failure aborts with its gRPC code, a human message, and a
    google.rpc.Status in the trailers carrying one ErrorInfo with domain, reason and field;
    no response message is sent."""
    await _import(harness, "a")
    outcome = await harness.call(method, request_)
    assert outcome.response is None
    assert outcome.code is code
    assert outcome.details
    info = outcome.error_info()
    assert info.reason == reason
    assert dict(info.metadata) == {"field": field}


# -- AccountService -----------------------------------------------------------------------------


async def test_account_handlers(harness: Harness) -> None:
    """Import reads optional nick/face_url presence (absent keeps, given replaces), Check
    reports imported per id, Delete answers per id and removes the account."""
    response = await harness.ok(
        "ImportAccounts",
        pb.ImportAccountsRequest(
            accounts=[
                pb.Account(user_id="a", nick="Ann", face_url="https://a"),
                pb.Account(user_id="b"),
                pb.Account(user_id="bad\x00"),
            ]
        ),
    )
    assert [r.code for r in response.results] == [
        pb.RESULT_CODE_OK,
        pb.RESULT_CODE_OK,
        pb.RESULT_CODE_INVALID_ARGUMENT,
    ]
    await harness.ok(
        "ImportAccounts", pb.ImportAccountsRequest(accounts=[pb.Account(user_id="a", nick="A2")])
    )
    await harness.ok("Follow", pb.FollowRequest(user_id="b", target_ids=["a"]))
    page = await harness.ok(
        "List", pb.ListRequest(user_id="b", follow_type=pb.FOLLOW_TYPE_FOLLOWING)
    )
    (entry,) = page.entries
    assert (entry.nick, entry.face_url, entry.profile_sequence) == ("A2", "https://a", 1)

    checked = await harness.ok(
        "CheckAccounts", pb.CheckAccountsRequest(user_ids=["a", "b", "c", ""])
    )
    assert [(s.imported, s.code) for s in checked.statuses] == [
        (True, pb.RESULT_CODE_OK),
        (True, pb.RESULT_CODE_OK),
        (False, pb.RESULT_CODE_OK),
        (False, pb.RESULT_CODE_INVALID_ARGUMENT),
    ]
    deleted = await harness.ok("DeleteAccounts", pb.DeleteAccountsRequest(user_ids=["a", "zz"]))
    assert [r.code for r in deleted.results] == [pb.RESULT_CODE_OK, pb.RESULT_CODE_OK]
    info = await harness.ok("GetInfo", pb.GetInfoRequest(user_id="b", target_ids=["b", "a"]))
    assert [(i.code, i.following_count) for i in info.infos] == [
        (pb.RESULT_CODE_OK, 0),
        (pb.RESULT_CODE_ACCOUNT_NOT_FOUND, 0),
    ]


async def test_terminated_pool_is_unavailable(harness: Harness) -> None:
    """Through grpc_testing too, a call after the pool is gone answers UNAVAILABLE with
    reason DATABASE_UNAVAILABLE."""
    await _import(harness, "a")
    harness.pool.terminate()
    outcome = await harness.call("Check", pb.CheckRequest(user_id="a", target_ids=["b"]))
    assert outcome.code is grpc.StatusCode.UNAVAILABLE
    assert outcome.error_info().reason == "DATABASE_UNAVAILABLE"
    assert "pool" not in outcome.details


def _reason(trailing: Sequence[tuple[str, str | bytes]]) -> str:
    raw = dict(trailing)[STATUS_DETAILS_KEY]
    assert isinstance(raw, bytes)
    (detail,) = status_pb2.Status.FromString(raw).details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    reason: str = info.reason
    return reason


async def test_bridge_runs_handlers_concurrently(harness: Harness) -> None:
    """Several grpc_testing calls in flight at once all complete on the one event loop
    (the bridge does not serialise or deadlock them), and each gets its own answer."""
    await _import(harness, *(f"u{i}" for i in range(6)))
    calls: list[Awaitable[Outcome]] = [
        harness.call("Follow", pb.FollowRequest(user_id=f"u{i}", target_ids=[f"u{(i + 1) % 6}"]))
        for i in range(6)
    ]
    outcomes = await asyncio.wait_for(asyncio.gather(*calls), timeout=60)
    assert [o.code for o in outcomes] == [grpc.StatusCode.OK] * 6
    info = await harness.ok(
        "GetInfo", pb.GetInfoRequest(user_id="u0", target_ids=[f"u{i}" for i in range(6)])
    )
    assert [(i.follower_count, i.following_count) for i in info.infos] == [(1, 1)] * 6
