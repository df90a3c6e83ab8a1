"""Bad input at the gRPC door: hypothesis-driven requests to every RPC over a real channel,
huge messages, hostile ids, forged page tokens and raw bytes that are not valid protobuf.

Pinned throughout: no answer is ever INTERNAL or UNKNOWN, every failed call carries one
ErrorInfo, and a call that fails changes nothing in the database.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import asyncpg
import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from server import rules
from tests.helpers import error_info, import_users

EXAMPLES = 150
MESSAGE_LIMIT = 4 * 1024 * 1024
TABLES = ("accounts", "follow_counts", "follow_count_deltas", "following", "followers")
NEVER = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)

HOSTILE_IDS = [
    "'; DROP TABLE following; --",
    "Robert'); DROP TABLE accounts;--",
    "1' OR '1'='1",
    "../../etc/passwd",
    "..\\..\\windows\\win.ini",
    "/dev/null",
    "%00%2e%2e%2f",
    "${jndi:ldap://x/a}",
    "<script>alert(1)</script>",
    "a\x00b",
    "\x00",
    "line\nbreak",
    "tab\there",
    "\x1b[31mred",
    "\x7f",
    "\u0085next-line",
    "\u202eevil",
    "\ufeffbom",
    " ",
    "😀" * 8,
    "😀" * 9,
    "x" * 32,
    "x" * 33,
    "é" * 16,
    "é" * 17,
    "",
]

Snapshot = dict[str, list[tuple[Any, ...]]]


async def snapshot(conn: asyncpg.Connection) -> Snapshot:
    """Every row of every table the service writes, in a stable order."""
    out: Snapshot = {}
    for table in TABLES:
        rows = await conn.fetch(f"SELECT * FROM {table} ORDER BY 1, 2")
        out[table] = [tuple(r.values()) for r in rows]
    return out


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(db_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def seeded(
    follow_stub: pb_grpc.FollowServiceAsyncStub, account_stub: pb_grpc.AccountServiceAsyncStub
) -> None:
    """A few users and edges, so fuzzed calls meet real rows."""
    await import_users(account_stub, "alice", "bob", "carol", "'; DROP TABLE following; --")
    await follow_stub.Follow(pb.FollowRequest(user_id="alice", target_ids=["bob", "carol"]))
    await follow_stub.Follow(pb.FollowRequest(user_id="bob", target_ids=["alice"]))


def ids() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["alice", "bob", "carol", "dave", *HOSTILE_IDS]),
        st.text(max_size=40),
        st.text(alphabet=st.characters(codec="ascii"), max_size=40),
        st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    )


def tokens() -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(""),
        st.text(max_size=300),
        st.binary(min_size=1, max_size=120).map(
            lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
        ),
        st.sampled_from(["=", "====", "AAAA", "-_-_", "a" * 201, "../../etc/passwd"]),
    )


int32 = st.integers(-(2**31), 2**31 - 1)
id_lists = st.lists(ids(), max_size=120)


def requests() -> st.SearchStrategy[tuple[str, Any]]:
    """(method name, request) for every RPC, with random fields."""
    return st.one_of(
        st.builds(
            lambda u, t: ("Follow", pb.FollowRequest(user_id=u, target_ids=t)), ids(), id_lists
        ),
        st.builds(
            lambda u, t: ("Unfollow", pb.UnfollowRequest(user_id=u, target_ids=t)), ids(), id_lists
        ),
        st.builds(
            lambda u, t: ("Check", pb.CheckRequest(user_id=u, target_ids=t)), ids(), id_lists
        ),
        st.builds(
            lambda u, t: ("GetInfo", pb.GetInfoRequest(user_id=u, target_ids=t)), ids(), id_lists
        ),
        st.builds(
            lambda u, ft, size, token: (
                "List",
                pb.ListRequest(user_id=u, follow_type=ft, page_size=size, page_token=token),
            ),
            ids(),
            st.one_of(st.integers(-3, 5), int32),
            st.one_of(st.integers(-5, 1100), int32),
            tokens(),
        ),
        st.builds(
            lambda accounts: ("ImportAccounts", pb.ImportAccountsRequest(accounts=accounts)),
            st.lists(
                st.builds(
                    _account,
                    ids(),
                    st.none() | st.text(max_size=40) | st.just("n" * 501),
                    st.none() | st.text(max_size=40) | st.just("\x00"),
                ),
                max_size=110,
            ),
        ),
        st.builds(lambda u: ("CheckAccounts", pb.CheckAccountsRequest(user_ids=u)), id_lists),
        st.builds(lambda u: ("DeleteAccounts", pb.DeleteAccountsRequest(user_ids=u)), id_lists),
    )


def _account(user_id: str, nick: str | None, face_url: str | None) -> pb.Account:
    account = pb.Account(user_id=user_id)
    if nick is not None:
        account.nick = nick
    if face_url is not None:
        account.face_url = face_url
    return account


Call = Callable[..., Awaitable[Any]]


def stubs(
    follow_stub: pb_grpc.FollowServiceAsyncStub, account_stub: pb_grpc.AccountServiceAsyncStub
) -> dict[str, Call]:
    return {
        "Follow": follow_stub.Follow,
        "Unfollow": follow_stub.Unfollow,
        "List": follow_stub.List,
        "Check": follow_stub.Check,
        "GetInfo": follow_stub.GetInfo,
        "ImportAccounts": account_stub.ImportAccounts,
        "CheckAccounts": account_stub.CheckAccounts,
        "DeleteAccounts": account_stub.DeleteAccounts,
    }


async def call_and_check(conn: asyncpg.Connection, call: Call, request: Any) -> Any | None:
    """Make the call; on failure pin the code, the ErrorInfo and an unchanged database.
    Returns the response, or None when the call failed."""
    before = await snapshot(conn)
    try:
        return await call(request, timeout=30)
    except grpc.aio.AioRpcError as exc:
        failure = exc
    assert failure.code() not in NEVER, f"{failure.code()}: {failure.details()}"
    if failure.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:  # grpc's own size limit
        assert error_info(failure).domain == "follow.v1"
    assert await snapshot(conn) == before, "a failed call changed the database"
    return None


def _bad_items_left_no_trace(method: str, request: Any, response: Any, after: Snapshot) -> None:
    """Items answered with a non-OK code were not written."""
    if method != "Follow":
        return
    edges = {(r[0], r[1]) for r in after["following"]}
    for result in response.results:
        if result.code != pb.RESULT_CODE_OK:
            assert (request.user_id, result.user_id) not in edges or any(
                t == result.user_id and r.code == pb.RESULT_CODE_OK
                for t, r in zip(request.target_ids, response.results, strict=True)
            )


@pytest.mark.usefixtures("seeded")
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=requests())
async def test_random_requests_never_fail_internally_nor_change_state_on_error(
    follow_stub: pb_grpc.FollowServiceAsyncStub,
    account_stub: pb_grpc.AccountServiceAsyncStub,
    db: asyncpg.Connection,
    case: tuple[str, Any],
) -> None:
    """Random requests to every RPC (random ids incl. control characters, SQL and paths,
    oversized batches, random enums, negative and huge page sizes, forged tokens): never
    INTERNAL/UNKNOWN, a failure carries an ErrorInfo and leaves the database as it was, and
    per-item failures are not written."""
    method, request = case
    response = await call_and_check(db, stubs(follow_stub, account_stub)[method], request)
    if response is not None:
        _bad_items_left_no_trace(method, request, response, await snapshot(db))


@pytest.mark.usefixtures("seeded")
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    token=tokens(),
    owner=st.sampled_from(["alice", "bob"]),
    list_type=st.sampled_from([1, 2, 3]),
)
async def test_forged_page_tokens_are_invalid_argument(
    follow_stub: pb_grpc.FollowServiceAsyncStub,
    db: asyncpg.Connection,
    token: str,
    owner: str,
    list_type: int,
) -> None:
    """A page token the server did not issue for this (owner, list) is INVALID_ARGUMENT with
    reason INVALID_PAGE_TOKEN (or, for the empty token, the first page)."""
    request = pb.ListRequest(
        user_id=owner,
        follow_type=cast(pb.FollowType.ValueType, list_type),
        page_size=1,
        page_token=token,
    )
    failure = None
    try:
        await follow_stub.List(request)
    except grpc.aio.AioRpcError as exc:
        failure = exc
    if failure is None:
        assert token == ""
    else:
        assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(failure).reason == "INVALID_PAGE_TOKEN"


@pytest.mark.usefixtures("seeded")
async def test_tokens_from_another_user_or_list_or_altered_are_refused(
    follow_stub: pb_grpc.FollowServiceAsyncStub,
) -> None:
    """A genuine token replayed for another owner or list, or with one character changed,
    is refused rather than paging somewhere else."""
    first = await follow_stub.List(
        pb.ListRequest(user_id="alice", follow_type=pb.FOLLOW_TYPE_FOLLOWING, page_size=1)
    )
    token = first.next_page_token
    assert token
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    for user, list_type, tok in [
        ("bob", pb.FOLLOW_TYPE_FOLLOWING, token),
        ("alice", pb.FOLLOW_TYPE_FAN, token),
        ("alice", pb.FOLLOW_TYPE_FOLLOWING, flipped),
        ("alice", pb.FOLLOW_TYPE_FOLLOWING, token + "A"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await follow_stub.List(
                pb.ListRequest(user_id=user, follow_type=list_type, page_size=1, page_token=tok)
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).reason == "INVALID_PAGE_TOKEN"


HUGE = MESSAGE_LIMIT - 64 * 1024  # just under the 4 MiB limit, with room for framing


@pytest.mark.parametrize(
    ("method", "make"),
    [
        ("Follow", lambda s: pb.FollowRequest(user_id=s, target_ids=["bob"])),
        ("Follow", lambda s: pb.FollowRequest(user_id="alice", target_ids=[s])),
        ("Check", lambda s: pb.CheckRequest(user_id="alice", target_ids=[s[: len(s) // 2]] * 2)),
        (
            "List",
            lambda s: pb.ListRequest(user_id="alice", follow_type=pb.FOLLOW_TYPE_FAN, page_token=s),
        ),
        ("ImportAccounts", lambda s: pb.ImportAccountsRequest(accounts=[_account("z", s, None)])),
        ("CheckAccounts", lambda s: pb.CheckAccountsRequest(user_ids=[s])),
        ("DeleteAccounts", lambda s: pb.DeleteAccountsRequest(user_ids=[s[:1000]] * 100)),
    ],
    ids=[
        "follow-user",
        "follow-target",
        "check-targets",
        "list-token",
        "import-nick",
        "check-accounts",
        "delete-100",
    ],
)
@pytest.mark.usefixtures("seeded")
async def test_huge_strings_up_to_the_message_limit(
    follow_stub: pb_grpc.FollowServiceAsyncStub,
    account_stub: pb_grpc.AccountServiceAsyncStub,
    db: asyncpg.Connection,
    method: str,
    make: Callable[[str], Any],
) -> None:
    """Strings of almost 4 MiB in any field are refused (request-level or per item) without
    INTERNAL, without amplifying the input in the answer and without a state change."""
    request = make("é" * (HUGE // 2))
    assert request.ByteSize() < MESSAGE_LIMIT
    response = await call_and_check(db, stubs(follow_stub, account_stub)[method], request)
    if response is not None:
        # Per-item results echo the id as given (the contract), so the answer may be as big
        # as the request, but never bigger than it by more than the per-item codes/messages.
        per_item = 64 * rules.MAX_ACCOUNTS  # code and a short message for each of <= 100 items
        assert response.ByteSize() <= request.ByteSize() + per_item, "the answer amplifies input"
        for result in getattr(response, "results", getattr(response, "statuses", [])):
            assert result.code == pb.RESULT_CODE_INVALID_ARGUMENT


@pytest.mark.usefixtures("seeded")
async def test_message_over_the_limit_is_resource_exhausted(
    follow_stub: pb_grpc.FollowServiceAsyncStub, db: asyncpg.Connection
) -> None:
    """A request over 4 MiB is turned away by gRPC itself with RESOURCE_EXHAUSTED."""
    before = await snapshot(db)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await follow_stub.Follow(pb.FollowRequest(user_id="a" * MESSAGE_LIMIT, target_ids=["b"]))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await snapshot(db) == before


@pytest.mark.parametrize("hostile", HOSTILE_IDS)
async def test_hostile_ids_are_inert(
    follow_stub: pb_grpc.FollowServiceAsyncStub,
    account_stub: pb_grpc.AccountServiceAsyncStub,
    db: asyncpg.Connection,
    hostile: str,
) -> None:
    """An id that looks like SQL, a path or holds control characters is either a plain id
    (valid UTF-8, at most 32 bytes, no control characters) that round-trips exactly through
    import, follow, list, check and info, or it is refused with INVALID_ARGUMENT and nothing
    is written. Either way every table is still there."""
    await import_users(account_stub, "alice")
    acceptable = rules.user_id_problem(hostile) is None
    imported = await account_stub.ImportAccounts(
        pb.ImportAccountsRequest(accounts=[pb.Account(user_id=hostile, nick=hostile)])
    )
    assert [r.user_id for r in imported.results] == [hostile]
    if not acceptable:
        assert imported.results[0].code == pb.RESULT_CODE_INVALID_ARGUMENT
        before = await snapshot(db)
        followed = await follow_stub.Follow(pb.FollowRequest(user_id="alice", target_ids=[hostile]))
        assert followed.results[0].code == pb.RESULT_CODE_INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await follow_stub.Follow(pb.FollowRequest(user_id=hostile, target_ids=["alice"]))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).reason == "INVALID_USER_ID"
        assert await snapshot(db) == before
        return
    assert imported.results[0].code == pb.RESULT_CODE_OK
    await follow_stub.Follow(pb.FollowRequest(user_id="alice", target_ids=[hostile]))
    await follow_stub.Follow(pb.FollowRequest(user_id=hostile, target_ids=["alice"]))
    following = await follow_stub.List(
        pb.ListRequest(user_id="alice", follow_type=pb.FOLLOW_TYPE_MUTUAL)
    )
    assert [(e.user_id, e.nick) for e in following.entries] == [(hostile, hostile)]
    fans = await follow_stub.List(pb.ListRequest(user_id=hostile, follow_type=pb.FOLLOW_TYPE_FAN))
    assert [e.user_id for e in fans.entries] == ["alice"]
    checked = await follow_stub.Check(pb.CheckRequest(user_id="alice", target_ids=[hostile]))
    assert [(r.user_id, r.follow_type) for r in checked.results] == [
        (hostile, pb.FOLLOW_TYPE_MUTUAL)
    ]
    info = await follow_stub.GetInfo(pb.GetInfoRequest(user_id=hostile, target_ids=[hostile]))
    assert (info.infos[0].user_id, info.infos[0].mutual_count) == (hostile, 1)
    assert await db.fetchval("SELECT count(*) FROM following WHERE target_id = $1", hostile) == 1
    for table in TABLES:
        assert await db.fetchval("SELECT to_regclass($1) IS NOT NULL", table)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2) holding `payload`."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


RAW_METHODS = [
    "/follow.v1.FollowService/Follow",
    "/follow.v1.FollowService/Unfollow",
    "/follow.v1.FollowService/List",
    "/follow.v1.FollowService/Check",
    "/follow.v1.FollowService/GetInfo",
    "/follow.v1.AccountService/CheckAccounts",
    "/follow.v1.AccountService/DeleteAccounts",
]


@pytest.fixture
def raw_call(channel: grpc.aio.Channel) -> Callable[[str, bytes], Awaitable[bytes]]:
    """Call any method with hand-made request bytes (identity serializers)."""

    async def call(method: str, body: bytes) -> bytes:
        stub = channel.unary_unary(
            method, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        response: bytes = await stub(body, timeout=30)
        return response

    return call


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("method", RAW_METHODS)
async def test_invalid_utf8_on_the_wire_is_a_clear_invalid_argument(
    raw_call: Callable[[str, bytes], Awaitable[bytes]], db: asyncpg.Connection, method: str
) -> None:
    """A string field holding invalid UTF-8 (built by hand: protobuf refuses to make one)
    fails to parse. grpcio alone would answer UNKNOWN "Unexpected DecodeError" (aio server);
    the server answers INVALID_ARGUMENT with an ErrorInfo and changes nothing."""
    body = _field(1, b"alice\xff\xfe")  # field 1 is user_id / user_ids in every request here
    if method.endswith(("Follow", "Check", "GetInfo")):
        body = _field(1, b"alice") + _field(2, b"b\xc3\x28ob")  # target_ids
    before = await snapshot(db)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw_call(method, body)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "follow.v1")
    assert "UTF-8" in (caught.value.details() or "")
    assert await snapshot(db) == before


@pytest.mark.usefixtures("seeded")
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from([*RAW_METHODS, "/follow.v1.AccountService/ImportAccounts"]),
    body=st.binary(max_size=200),
)
async def test_random_bytes_never_fail_internally(
    raw_call: Callable[[str, bytes], Awaitable[bytes]],
    db: asyncpg.Connection,
    method: str,
    body: bytes,
) -> None:
    """Arbitrary bytes as a request (truncated varints, wrong wire types, garbage) are
    parsed or refused, never INTERNAL/UNKNOWN, and a refused one changes nothing."""

    async def call(request: bytes, **_: float) -> bytes:
        return await raw_call(method, request)

    await call_and_check(db, call, body)
