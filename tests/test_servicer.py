"""End to end over a real gRPC channel and a real PostgreSQL: every RPC of FollowService and
AccountService, every rule of section 5 of the v4 spec, and every error path."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest

from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from server.app import start_service
from server.config import Settings
from server.core import FollowCore
from server.cursor import CursorCodec
from server.rules import Limits
from server.servicer import AccountServicer, FollowServicer
from server.store import Store
from tests.conftest import ServiceFactory
from tests.helpers import error_info, import_users, whole_list

if TYPE_CHECKING:  # the async stub types exist only in the generated .pyi
    FollowStub = pb_grpc.FollowServiceAsyncStub
    AccountStub = pb_grpc.AccountServiceAsyncStub

OK = pb.RESULT_CODE_OK
INVALID = pb.RESULT_CODE_INVALID_ARGUMENT
NOT_FOUND = pb.RESULT_CODE_ACCOUNT_NOT_FOUND
LIMIT = pb.RESULT_CODE_FOLLOWING_LIMIT_REACHED
FAN = pb.FOLLOW_TYPE_FAN
FOLLOWING = pb.FOLLOW_TYPE_FOLLOWING
MUTUAL = pb.FOLLOW_TYPE_MUTUAL
NONE = pb.FOLLOW_TYPE_NONE
LISTS = (FAN, FOLLOWING, MUTUAL)

BAD_IDS = ["", "x" * 33, "é" * 16 + "x", "a\x00b", "a\nb", "a\x7f"]


# -- helpers ---------------------------------------------------------------------------------


async def follow(stub: FollowStub, user_id: str, *targets: str) -> list[int]:
    response = await stub.Follow(pb.FollowRequest(user_id=user_id, target_ids=targets))
    assert [r.user_id for r in response.results] == list(targets)
    for r in response.results:
        assert (r.message == "") == (r.code == OK), r
    return [r.code for r in response.results]


async def unfollow(stub: FollowStub, user_id: str, *targets: str) -> list[int]:
    response = await stub.Unfollow(pb.UnfollowRequest(user_id=user_id, target_ids=targets))
    assert [r.user_id for r in response.results] == list(targets)
    return [r.code for r in response.results]


async def check(stub: FollowStub, user_id: str, *targets: str) -> list[int]:
    response = await stub.Check(pb.CheckRequest(user_id=user_id, target_ids=targets))
    assert [r.user_id for r in response.results] == list(targets)
    return [r.follow_type for r in response.results]


async def counts(stub: FollowStub, user_id: str) -> tuple[int, int, int]:
    """(followers, following, mutual) of `user_id`, asked by the user themselves."""
    response = await stub.GetInfo(pb.GetInfoRequest(user_id=user_id, target_ids=[user_id]))
    (info,) = response.infos
    assert info.code == OK
    return info.follower_count, info.following_count, info.mutual_count


async def ids(stub: FollowStub, user_id: str, follow_type: int, page_size: int = 0) -> list[str]:
    return [e.user_id for e in await whole_list(stub, user_id, follow_type, page_size)]  # type: ignore[arg-type]


def micros(entry: pb.ListEntry) -> int:
    return entry.follow_time.seconds * 1_000_000 + entry.follow_time.nanos // 1000


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def assert_error(
    error: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: str, field: str | None
) -> None:
    assert error.code() is code, error
    info = error_info(error)
    assert info.domain == "follow.v1"
    assert info.reason == reason
    if field is None:
        assert "field" not in info.metadata
    else:
        assert info.metadata["field"] == field
    details = error.details() or ""
    assert details
    assert "Traceback" not in details


async def assert_consistent(stub: FollowStub, users: Sequence[str]) -> None:
    """Counts equal the list lengths, lists have no duplicates, Check agrees with them."""
    for user in users:
        lists = {t: await ids(stub, user, t, page_size=3) for t in LISTS}
        for listed in lists.values():
            assert len(listed) == len(set(listed))
        followers, following, mutual = await counts(stub, user)
        assert (followers, following, mutual) == (
            len(lists[FAN]),
            len(lists[FOLLOWING]),
            len(lists[MUTUAL]),
        ), user
        assert set(lists[MUTUAL]) == set(lists[FAN]) & set(lists[FOLLOWING])
        others = [u for u in users if u != user]
        if others:
            for other, seen in zip(others, await check(stub, user, *others), strict=True):
                expected = (FAN if other in lists[FAN] else 0) | (
                    FOLLOWING if other in lists[FOLLOWING] else 0
                )
                assert seen == expected, (user, other)


# -- Follow ----------------------------------------------------------------------------------


async def test_follow_creates_both_sides(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """A follow shows in the follower's FOLLOWING list, the target's FAN list, both Checks
    and both users' counts."""
    await import_users(account_stub, "a", "b")
    assert await follow(follow_stub, "a", "b") == [OK]
    assert await ids(follow_stub, "a", FOLLOWING) == ["b"]
    assert await ids(follow_stub, "b", FAN) == ["a"]
    assert await ids(follow_stub, "a", FAN) == []
    assert await ids(follow_stub, "a", MUTUAL) == []
    assert await check(follow_stub, "a", "b") == [FOLLOWING]
    assert await check(follow_stub, "b", "a") == [FAN]
    assert await counts(follow_stub, "a") == (0, 1, 0)
    assert await counts(follow_stub, "b") == (1, 0, 0)


async def test_follow_back_makes_mutual(follow_stub: FollowStub, account_stub: AccountStub) -> None:
    """When B follows A back, both see MUTUAL in Check, in the MUTUAL list and in counts."""
    await import_users(account_stub, "a", "b")
    await follow(follow_stub, "a", "b")
    assert await follow(follow_stub, "b", "a") == [OK]
    assert await check(follow_stub, "a", "b") == [MUTUAL]
    assert await check(follow_stub, "b", "a") == [MUTUAL]
    assert await ids(follow_stub, "a", MUTUAL) == ["b"]
    assert await ids(follow_stub, "b", MUTUAL) == ["a"]
    assert await counts(follow_stub, "a") == (1, 1, 1)
    assert await counts(follow_stub, "b") == (1, 1, 1)


async def test_follow_invalid_target_is_per_item(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """A malformed target id (empty, over 32 bytes, control characters) fails only that
    item with INVALID_ARGUMENT; the other targets of the request are followed."""
    await import_users(account_stub, "a", "b", "c")
    for bad in BAD_IDS:
        response = await follow_stub.Follow(
            pb.FollowRequest(user_id="a", target_ids=["b", bad, "c"])
        )
        assert [(r.user_id, r.code) for r in response.results] == [
            ("b", OK),
            (bad, INVALID),
            ("c", OK),
        ]
        assert response.results[1].message
    assert sorted(await ids(follow_stub, "a", FOLLOWING)) == ["b", "c"]
    assert await counts(follow_stub, "a") == (0, 2, 0)


async def test_self_follow_is_per_item_invalid(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """Following oneself is a per-item INVALID_ARGUMENT (v4 30001) and creates nothing."""
    await import_users(account_stub, "a", "b")
    response = await follow_stub.Follow(pb.FollowRequest(user_id="a", target_ids=["a", "b"]))
    assert [r.code for r in response.results] == [INVALID, OK]
    assert "themselves" in response.results[0].message
    assert await ids(follow_stub, "a", FOLLOWING) == ["b"]
    assert await ids(follow_stub, "a", FAN) == []
    assert await counts(follow_stub, "a") == (0, 1, 0)


async def test_unknown_target_is_per_item_not_found(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """A target that was never imported answers ACCOUNT_NOT_FOUND (v4 30003) for that item
    only, with a message; nothing is stored for it."""
    await import_users(account_stub, "a", "b")
    response = await follow_stub.Follow(pb.FollowRequest(user_id="a", target_ids=["ghost", "b"]))
    assert [r.code for r in response.results] == [NOT_FOUND, OK]
    assert response.results[0].message == "account does not exist"
    assert await ids(follow_stub, "a", FOLLOWING) == ["b"]
    assert await counts(follow_stub, "a") == (0, 1, 0)


async def test_repeated_follow_keeps_first_time(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """Following someone already followed answers OK, keeps the first follow time on both
    copies of the edge and changes no count."""
    await import_users(account_stub, "a", "b", "c")
    await follow(follow_stub, "a", "b")
    (first,) = await whole_list(follow_stub, "a", FOLLOWING)
    await follow(follow_stub, "a", "c")
    assert await follow(follow_stub, "a", "b") == [OK]
    entries = await whole_list(follow_stub, "a", FOLLOWING)
    assert [e.user_id for e in entries] == ["c", "b"]  # b did not move to the top
    assert micros(entries[1]) == micros(first)
    (fan_entry,) = await whole_list(follow_stub, "b", FAN)
    assert micros(fan_entry) == micros(first)
    assert await counts(follow_stub, "a") == (0, 2, 0)
    assert await counts(follow_stub, "b") == (1, 0, 0)


async def test_follow_after_unfollow_is_a_new_follow(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """Unfollowing and following again is a new follow: a new, later time, top of the list."""
    await import_users(account_stub, "a", "b", "c")
    await follow(follow_stub, "a", "b")
    await follow(follow_stub, "a", "c")
    before = {e.user_id: micros(e) for e in await whole_list(follow_stub, "a", FOLLOWING)}
    await unfollow(follow_stub, "a", "b")
    await follow(follow_stub, "a", "b")
    entries = await whole_list(follow_stub, "a", FOLLOWING)
    assert [e.user_id for e in entries] == ["b", "c"]
    assert micros(entries[0]) > before["c"] > before["b"]


async def test_duplicate_target_in_one_request(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """A target repeated in one request is answered like the first occurrence and followed
    once."""
    await import_users(account_stub, "a", "b")
    assert await follow(follow_stub, "a", "b", "b", "ghost", "ghost", "a", "a") == [
        OK,
        OK,
        NOT_FOUND,
        NOT_FOUND,
        INVALID,
        INVALID,
    ]
    assert await ids(follow_stub, "a", FOLLOWING) == ["b"]
    assert await counts(follow_stub, "a") == (0, 1, 0)
    assert await counts(follow_stub, "b") == (1, 0, 0)
    assert await unfollow(follow_stub, "a", "b", "b") == [OK, OK]
    assert await counts(follow_stub, "a") == (0, 0, 0)
    assert await counts(follow_stub, "b") == (0, 0, 0)


async def test_following_cap_fails_targets_beyond_it_in_request_order(
    make_service: ServiceFactory,
) -> None:
    """With a cap of 3 and 2 already followed, only the first new target fits; the later
    new targets fail with FOLLOWING_LIMIT_REACHED in request order, while targets already
    followed, unknown or invalid keep their own codes."""
    service = await make_service(max_following=3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = pb_grpc.FollowServiceStub(channel)
        accounts = pb_grpc.AccountServiceStub(channel)
        await import_users(accounts, "a", "b", "c", "d", "e", "f", "g")
        assert await follow(stub, "a", "b", "c") == [OK, OK]
        assert await follow(stub, "a", "f", "b", "ghost", "d", "e", "a", "c", "g") == [
            OK,  # f: the one free slot
            OK,  # b: already followed
            NOT_FOUND,
            LIMIT,  # d
            LIMIT,  # e
            INVALID,  # self
            OK,  # c: already followed
            LIMIT,  # g
        ]
        assert sorted(await ids(stub, "a", FOLLOWING)) == ["b", "c", "f"]
        assert await counts(stub, "a") == (0, 3, 0)
        assert await counts(stub, "d") == (0, 0, 0)
        # at the cap, an already-followed target is still OK, a new one is not
        assert await follow(stub, "a", "b", "d") == [OK, LIMIT]
        response = await stub.Follow(pb.FollowRequest(user_id="a", target_ids=["e"]))
        assert response.results[0].message == "following limit reached"
        # room again after an unfollow; followers are not capped
        await unfollow(stub, "a", "c")
        assert await follow(stub, "a", "e", "d") == [OK, LIMIT]
        for fan in ("b", "c", "d", "e", "f", "g"):
            assert await follow(stub, fan, "a") == [OK]
        assert (await counts(stub, "a"))[0] == 6


async def test_cap_counts_a_batch_in_request_order(make_service: ServiceFactory) -> None:
    """A single request that crosses the cap follows exactly the first targets that fit."""
    service = await make_service(max_following=3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = pb_grpc.FollowServiceStub(channel)
        await import_users(pb_grpc.AccountServiceStub(channel), "a", "z", "y", "x", "w", "v")
        assert await follow(stub, "a", "z", "y", "x", "w", "v") == [OK, OK, OK, LIMIT, LIMIT]
        assert sorted(await ids(stub, "a", FOLLOWING)) == ["x", "y", "z"]


# -- Unfollow --------------------------------------------------------------------------------


async def test_unfollow_removes_both_sides_and_mutual(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """Unfollowing a mutual friend removes the edge, ends the mutual state for both, and
    leaves the other direction in place."""
    await import_users(account_stub, "a", "b")
    await follow(follow_stub, "a", "b")
    await follow(follow_stub, "b", "a")
    assert await unfollow(follow_stub, "a", "b") == [OK]
    assert await check(follow_stub, "a", "b") == [FAN]
    assert await check(follow_stub, "b", "a") == [FOLLOWING]
    assert await ids(follow_stub, "a", MUTUAL) == []
    assert await ids(follow_stub, "b", MUTUAL) == []
    assert await counts(follow_stub, "a") == (1, 0, 0)
    assert await counts(follow_stub, "b") == (0, 1, 0)


async def test_unfollow_not_followed_is_ok(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """Unfollowing someone not followed, or unknown, answers OK and changes nothing;
    malformed ids and oneself are per-item INVALID_ARGUMENT."""
    await import_users(account_stub, "a", "b", "c")
    await follow(follow_stub, "c", "a")
    assert await unfollow(follow_stub, "a", "b", "ghost", "c", "", "a") == [
        OK,
        OK,
        OK,
        INVALID,
        INVALID,
    ]
    assert await unfollow(follow_stub, "a", "b") == [OK]
    assert await counts(follow_stub, "a") == (1, 0, 0)
    assert await counts(follow_stub, "c") == (0, 1, 0)


# -- Check and GetInfo -----------------------------------------------------------------------


async def test_check_every_relationship(follow_stub: FollowStub, account_stub: AccountStub) -> None:
    """Check answers NONE, FAN, FOLLOWING and MUTUAL per target in request order (v4
    numbers 0 to 3); unknown targets and oneself are OK with NONE; malformed ids are
    per-item INVALID_ARGUMENT with NONE."""
    await import_users(account_stub, "me", "fan", "idol", "friend", "stranger")
    await follow(follow_stub, "fan", "me")
    await follow(follow_stub, "me", "idol", "friend")
    await follow(follow_stub, "friend", "me")
    response = await follow_stub.Check(
        pb.CheckRequest(
            user_id="me",
            target_ids=["stranger", "fan", "idol", "friend", "ghost", "me", "x" * 33, "fan"],
        )
    )
    assert [(r.code, r.follow_type) for r in response.results] == [
        (OK, NONE),
        (OK, FAN),
        (OK, FOLLOWING),
        (OK, MUTUAL),
        (OK, NONE),
        (OK, NONE),
        (INVALID, NONE),
        (OK, FAN),
    ]
    assert [int(t) for t in (NONE, FAN, FOLLOWING, MUTUAL)] == [0, 1, 2, 3]
    assert response.results[6].message
    assert all(r.message == "" for r in response.results if r.code == OK)


async def test_check_with_only_invalid_targets(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """A Check whose targets are all malformed still answers per item, and still insists
    the acting user exists."""
    await import_users(account_stub, "me")
    response = await follow_stub.Check(pb.CheckRequest(user_id="me", target_ids=["", "a\x01"]))
    assert [r.code for r in response.results] == [INVALID, INVALID]
    error = await rpc_error(follow_stub.Check(pb.CheckRequest(user_id="nobody", target_ids=[""])))
    assert_error(error, grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND", "user_id")


async def test_get_info_counts_per_target(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """GetInfo answers each target's follower, following and mutual counts in request
    order; unknown targets are ACCOUNT_NOT_FOUND and malformed ones INVALID_ARGUMENT, both
    with zero counts; the asker need not be among the targets."""
    await import_users(account_stub, "asker", "a", "b", "c")
    await follow(follow_stub, "a", "b", "c")
    await follow(follow_stub, "b", "a")
    response = await follow_stub.GetInfo(
        pb.GetInfoRequest(user_id="asker", target_ids=["a", "b", "c", "ghost", "", "a"])
    )
    assert [
        (i.user_id, i.code, i.follower_count, i.following_count, i.mutual_count)
        for i in response.infos
    ] == [
        ("a", OK, 1, 2, 1),
        ("b", OK, 1, 1, 1),
        ("c", OK, 1, 0, 0),
        ("ghost", NOT_FOUND, 0, 0, 0),
        ("", INVALID, 0, 0, 0),
        ("a", OK, 1, 2, 1),
    ]
    assert response.infos[3].message == "account does not exist"
    assert response.infos[4].message


# -- List ------------------------------------------------------------------------------------


async def test_list_newest_first_ties_by_id_descending(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """Lists are newest first; entries with the same time (one Follow call writes one time)
    are ordered by user id descending in byte order, whatever the page size."""
    tied = ["a", "B", "é", "z", "_", "zz"]
    await import_users(account_stub, "o", "first", "last", *tied)
    await follow(follow_stub, "o", "first")
    await follow(follow_stub, "o", *tied)
    await follow(follow_stub, "o", "last")
    by_bytes = sorted(tied, key=lambda u: u.encode(), reverse=True)
    assert by_bytes == ["é", "zz", "z", "a", "_", "B"]
    expected = ["last", *by_bytes, "first"]
    for size in (0, 1, 2, 3, 1000):
        assert await ids(follow_stub, "o", FOLLOWING, page_size=size) == expected
    entries = await whole_list(follow_stub, "o", FOLLOWING)
    assert len({micros(e) for e in entries[1:-1]}) == 1
    assert micros(entries[0]) > micros(entries[1]) > micros(entries[-1])


async def test_fan_list_ties_by_id_descending(
    follow_stub: FollowStub, account_stub: AccountStub, db_url: str
) -> None:
    """Fans who followed at the same microsecond are ordered by id descending (bytes), and
    paging through the tie neither repeats nor skips anyone."""
    fans = ["f1", "F2", "f3", "ü", "f10"]
    await import_users(account_stub, "o", *fans)
    for fan in fans:
        await follow(follow_stub, fan, "o")
    conn = await asyncpg.connect(db_url)
    try:  # make the tie exact: these follows came from separate calls
        await conn.execute(
            "UPDATE followers SET followed_at = '2024-01-02 03:04:05.123456+00' WHERE user_id = 'o'"
        )
    finally:
        await conn.close()
    expected = sorted(fans, key=lambda u: u.encode(), reverse=True)
    for size in (1, 2, 4, 0):
        assert await ids(follow_stub, "o", FAN, page_size=size) == expected


async def test_mutual_list_ordered_by_when_it_became_mutual(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """The MUTUAL list is ordered by when each relationship became mutual (the later of the
    two follows), not by when the user followed the other, and shows that time."""
    await import_users(account_stub, "a", "b", "c", "d")
    await follow(follow_stub, "a", "b")  # a->b first
    await follow(follow_stub, "a", "c")
    await follow(follow_stub, "c", "a")  # a<->c mutual now
    await follow(follow_stub, "d", "a")
    await follow(follow_stub, "b", "a")  # a<->b mutual later
    await follow(follow_stub, "a", "d")  # a<->d mutual last, by a's follow
    assert await ids(follow_stub, "a", FOLLOWING) == ["d", "c", "b"]
    mutual = await whole_list(follow_stub, "a", MUTUAL)
    assert [e.user_id for e in mutual] == ["d", "b", "c"]
    fans = {e.user_id: micros(e) for e in await whole_list(follow_stub, "a", FAN)}
    following = {e.user_id: micros(e) for e in await whole_list(follow_stub, "a", FOLLOWING)}
    for e in mutual:
        assert micros(e) == max(fans[e.user_id], following[e.user_id])
    (b_side,) = await whole_list(follow_stub, "b", MUTUAL)
    assert (b_side.user_id, micros(b_side)) == ("a", fans["b"])
    # ending and restarting a mutual relationship moves it to the top
    await unfollow(follow_stub, "c", "a")
    await follow(follow_stub, "c", "a")
    assert await ids(follow_stub, "a", MUTUAL) == ["c", "d", "b"]


async def test_list_entries_carry_profiles(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """Entries carry the other user's nick, face URL and profile_sequence, empty and 0 when
    none was imported, in every list type."""
    await account_stub.ImportAccounts(
        pb.ImportAccountsRequest(
            accounts=[
                pb.Account(user_id="o"),
                pb.Account(user_id="full", nick="Full Name", face_url="https://x/f.png"),
                pb.Account(user_id="bare"),
            ]
        )
    )
    await follow(follow_stub, "o", "full", "bare")
    await follow(follow_stub, "full", "o")
    following = {e.user_id: e for e in await whole_list(follow_stub, "o", FOLLOWING)}
    assert (following["full"].nick, following["full"].face_url) == ("Full Name", "https://x/f.png")
    assert following["full"].profile_sequence == 0
    assert (following["bare"].nick, following["bare"].face_url) == ("", "")
    (fan,) = await whole_list(follow_stub, "o", FAN)
    (mutual,) = await whole_list(follow_stub, "o", MUTUAL)
    for entry in (fan, mutual):
        assert (entry.user_id, entry.nick, entry.face_url) == (
            "full",
            "Full Name",
            "https://x/f.png",
        )


async def test_follow_time_has_microsecond_precision(
    follow_stub: FollowStub, account_stub: AccountStub, db_url: str
) -> None:
    """follow_time carries the stored timestamp to the microsecond (not seconds), on both
    sides of the edge."""
    users = [f"u{i}" for i in range(5)]
    await import_users(account_stub, "o", *users)
    for u in users:
        await follow(follow_stub, "o", u)
    entries = await whole_list(follow_stub, "o", FOLLOWING)
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch(
            "SELECT target_id, (extract(epoch FROM followed_at) * 1000000)::bigint AS us"
            " FROM following WHERE user_id = 'o'"
        )
    finally:
        await conn.close()
    stored = {r["target_id"]: r["us"] for r in rows}
    assert {e.user_id: micros(e) for e in entries} == stored
    assert all(e.follow_time.nanos % 1000 == 0 for e in entries)
    assert any(e.follow_time.nanos != 0 for e in entries)
    assert len(set(stored.values())) == len(users)
    for u in users:
        (fan,) = await whole_list(follow_stub, u, FAN)
        assert micros(fan) == stored[u]


async def test_page_size_default_clamp_and_negative(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """page_size 0 serves 100 entries, above 1000 serves 1000, negative is INVALID_ARGUMENT
    (INVALID_PAGE_SIZE); with 1001 entries the clamped page leaves exactly one for the
    next, and the count agrees."""
    targets = [f"t{i:04d}" for i in range(1001)]
    await import_users(account_stub, "star", *targets)
    for start in range(0, len(targets), 20):
        assert set(await follow(follow_stub, "star", *targets[start : start + 20])) == {OK}
    first = await follow_stub.List(pb.ListRequest(user_id="star", follow_type=FOLLOWING))
    assert len(first.entries) == 100
    assert first.next_page_token
    big = await follow_stub.List(
        pb.ListRequest(user_id="star", follow_type=FOLLOWING, page_size=2**31 - 1)
    )
    assert len(big.entries) == 1000
    rest = await follow_stub.List(
        pb.ListRequest(
            user_id="star", follow_type=FOLLOWING, page_size=5000, page_token=big.next_page_token
        )
    )
    assert len(rest.entries) == 1
    assert rest.next_page_token == ""
    seen = [e.user_id for e in (*big.entries, *rest.entries)]
    assert sorted(seen) == targets
    assert await counts(follow_stub, "star") == (0, 1001, 0)
    for size in (-1, -(2**31)):
        error = await rpc_error(
            follow_stub.List(pb.ListRequest(user_id="star", follow_type=FOLLOWING, page_size=size))
        )
        assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_SIZE", "page_size")


async def test_exact_page_has_no_next_token(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """A list of exactly page_size entries answers them with an empty next_page_token
    (AIP-158: empty means the end), and an empty list answers no entries and no token."""
    await import_users(account_stub, "o", "a", "b", "c")
    await follow(follow_stub, "o", "a", "b", "c")
    page = await follow_stub.List(pb.ListRequest(user_id="o", follow_type=FOLLOWING, page_size=3))
    assert len(page.entries) == 3
    assert page.next_page_token == ""
    page = await follow_stub.List(pb.ListRequest(user_id="o", follow_type=FOLLOWING, page_size=2))
    assert len(page.entries) == 2
    assert page.next_page_token
    empty = await follow_stub.List(pb.ListRequest(user_id="o", follow_type=FAN))
    assert list(empty.entries) == []
    assert empty.next_page_token == ""


async def test_list_type_must_be_a_list(follow_stub: FollowStub, account_stub: AccountStub) -> None:
    """NONE (0) or an unknown number as the list selector is INVALID_ARGUMENT with reason
    INVALID_FOLLOW_TYPE and field follow_type."""
    await import_users(account_stub, "o")
    for follow_type in (0, 4, -1, 99):
        error = await rpc_error(
            follow_stub.List(pb.ListRequest(user_id="o", follow_type=follow_type))  # type: ignore[arg-type]
        )
        assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FOLLOW_TYPE", "follow_type")


async def _pages(
    stub: FollowStub,
    owner: str,
    follow_type: int,
    size: int,
    between: Callable[[int], Awaitable[None]],
) -> list[str]:
    """Page to the end, calling `between(page_number)` after each page."""
    seen: list[str] = []
    token = ""
    number = 0
    while True:
        page = await stub.List(
            pb.ListRequest(
                user_id=owner,
                follow_type=follow_type,  # type: ignore[arg-type]
                page_size=size,
                page_token=token,
            )
        )
        assert len(page.entries) <= size
        seen.extend(e.user_id for e in page.entries)
        token = page.next_page_token
        if not token:
            return seen
        number += 1
        await between(number)


async def test_following_paging_survives_writes_between_pages(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """Paging the FOLLOWING list to the end sees every entry that existed before the first
    page and still exists exactly once, while new follows, unfollows (of seen and unseen
    entries) and re-follows happen between pages."""
    original = [f"u{i:02d}" for i in range(30)]
    extra = ["n1", "n2", "n3"]
    await import_users(account_stub, "o", "x", *original, *extra)
    for start in range(0, 30, 10):  # three batches: ties inside each batch
        await follow(follow_stub, "o", *original[start : start + 10])

    async def between(page: int) -> None:
        if page == 1:  # page 1 held u29..u23
            await follow(follow_stub, "o", "n1")
            await unfollow(follow_stub, "o", "u25", "u05")  # one seen, one not yet
        elif page == 2:
            await follow(follow_stub, "o", "u25", "n2")  # a seen entry comes back on top
            await follow(follow_stub, "o", "u10")  # already followed: keeps its place
            await follow(follow_stub, "x", "o")
        elif page == 3:
            await unfollow(follow_stub, "o", "u02")
            await follow(follow_stub, "o", "u02", "n3")  # unseen entry moves: now new

    seen = await _pages(follow_stub, "o", FOLLOWING, 7, between)
    assert len(seen) == len(set(seen))
    assert set(seen) == set(original) - {"u05", "u02"}
    assert seen[:7] == [f"u{i}" for i in range(29, 22, -1)]
    await assert_consistent(follow_stub, ["o", "x", "u25", "u05", "n1"])


async def test_fan_paging_survives_writes_between_pages(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """Paging the FAN list while fans come and go never repeats a fan and never skips one
    that was there before the first page and stayed."""
    fans = [f"f{i:02d}" for i in range(20)]
    await import_users(account_stub, "o", "late1", "late2", *fans)
    for fan in fans:
        await follow(follow_stub, fan, "o")
    removed = set()

    async def between(page: int) -> None:
        if page == 1:  # page 1 held f19..f15
            await follow(follow_stub, "late1", "o")
            await unfollow(follow_stub, "f17", "o")
            await follow(follow_stub, "f17", "o")  # seen fan returns on top: not repeated
            await unfollow(follow_stub, "f03", "o")
            removed.add("f03")
        elif page == 2:
            await follow(follow_stub, "late2", "o")
            await follow(follow_stub, "o", "f01")  # a fan becoming mutual keeps its fan place

    seen = await _pages(follow_stub, "o", FAN, 5, between)
    assert len(seen) == len(set(seen))
    assert set(seen) == set(fans) - removed
    assert seen[:5] == ["f19", "f18", "f17", "f16", "f15"]


async def test_mutual_paging(follow_stub: FollowStub, account_stub: AccountStub) -> None:
    """The MUTUAL list pages to the end in order without repeats, across ties too."""
    friends = [f"m{i}" for i in range(7)]
    await import_users(account_stub, "o", *friends)
    for friend in friends:
        await follow(follow_stub, friend, "o")
    await follow(follow_stub, "o", *friends)  # all become mutual at one instant
    expected = sorted(friends, reverse=True)
    for size in (1, 2, 3, 7, 8):
        assert await ids(follow_stub, "o", MUTUAL, page_size=size) == expected


async def _token(stub: FollowStub, owner: str, follow_type: int) -> str:
    page = await stub.List(
        pb.ListRequest(user_id=owner, follow_type=follow_type, page_size=1)  # type: ignore[arg-type]
    )
    assert page.next_page_token
    return page.next_page_token


async def test_page_token_is_bound_to_user_and_list(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """A page token only continues the (user, list) it came from: used for another user's
    list or another list type it is INVALID_ARGUMENT with reason INVALID_PAGE_TOKEN."""
    await import_users(account_stub, "a", "b", "c", "d")
    await follow(follow_stub, "a", "b", "c", "d")
    await follow(follow_stub, "b", "a", "c", "d")
    await follow(follow_stub, "c", "a", "b")
    await follow(follow_stub, "d", "a")
    token = await _token(follow_stub, "a", FOLLOWING)
    assert token.replace("-", "").replace("_", "").isalnum()
    # it works where it belongs
    ok = await follow_stub.List(
        pb.ListRequest(user_id="a", follow_type=FOLLOWING, page_size=1, page_token=token)
    )
    assert len(ok.entries) == 1
    for owner, follow_type in (("b", FOLLOWING), ("a", FAN), ("a", MUTUAL), ("c", MUTUAL)):
        error = await rpc_error(
            follow_stub.List(
                pb.ListRequest(user_id=owner, follow_type=follow_type, page_token=token)
            )
        )
        assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token")


async def test_bad_page_tokens(follow_stub: FollowStub, account_stub: AccountStub) -> None:
    """Tampered, garbage, truncated and overlong tokens are INVALID_ARGUMENT with reason
    INVALID_PAGE_TOKEN, never an internal error, and the message shows no SQL."""
    await import_users(account_stub, "a", "b", "c")
    await follow(follow_stub, "a", "b", "c")
    token = await _token(follow_stub, "a", FOLLOWING)
    middle = len(token) // 2
    tampered = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    for bad in (
        tampered,
        token[:-4],
        token + "!",
        token + "AAAA",
        "garbage",
        "!!!!",
        "%00",
        "A" * 5000,
        "é" * 10,
        " ",
    ):
        error = await rpc_error(
            follow_stub.List(pb.ListRequest(user_id="a", follow_type=FOLLOWING, page_token=bad))
        )
        assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token")
        assert "SELECT" not in (error.details() or "")


async def test_page_token_survives_a_server_restart(
    make_service: ServiceFactory,
) -> None:
    """Tokens do not expire: a token from one server process continues paging on another
    over the same database (the key is kept in the database)."""
    first = await make_service()
    second = await make_service()
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as one,
        grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as two,
    ):
        stub_one = pb_grpc.FollowServiceStub(one)
        await import_users(pb_grpc.AccountServiceStub(one), "a", "b", "c")
        await follow(stub_one, "a", "b", "c")
        token = await _token(stub_one, "a", FOLLOWING)
        page = await pb_grpc.FollowServiceStub(two).List(
            pb.ListRequest(user_id="a", follow_type=FOLLOWING, page_token=token)
        )
        assert [e.user_id for e in page.entries] == ["b"]


# -- request-level errors --------------------------------------------------------------------


def _acting_call(stub: FollowStub, rpc: str, user: str) -> Awaitable[object]:
    """One call of `rpc` by `user` about the imported user "b"."""
    if rpc == "Follow":
        return stub.Follow(pb.FollowRequest(user_id=user, target_ids=["b"]))
    if rpc == "Unfollow":
        return stub.Unfollow(pb.UnfollowRequest(user_id=user, target_ids=["b"]))
    if rpc == "Check":
        return stub.Check(pb.CheckRequest(user_id=user, target_ids=["b"]))
    if rpc == "GetInfo":
        return stub.GetInfo(pb.GetInfoRequest(user_id=user, target_ids=["b"]))
    assert rpc == "List"
    return stub.List(pb.ListRequest(user_id=user, follow_type=FAN))


@pytest.mark.parametrize("rpc", ["Follow", "Unfollow", "Check", "GetInfo", "List"])
async def test_unknown_acting_user_is_not_found(
    follow_stub: FollowStub, account_stub: AccountStub, rpc: str
) -> None:
    """An acting user who was never imported fails the whole call with NOT_FOUND, reason
    USER_NOT_FOUND, field user_id, and nothing is written."""
    await import_users(account_stub, "b")
    error = await rpc_error(_acting_call(follow_stub, rpc, "ghost"))
    assert_error(error, grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND", "user_id")
    assert await counts(follow_stub, "b") == (0, 0, 0)


@pytest.mark.parametrize("rpc", ["Follow", "Unfollow", "Check", "GetInfo", "List"])
async def test_malformed_acting_user_is_invalid_argument(
    follow_stub: FollowStub, account_stub: AccountStub, rpc: str
) -> None:
    """A malformed acting user id (empty, over 32 bytes, control characters) fails the call
    with INVALID_ARGUMENT, reason INVALID_USER_ID, field user_id."""
    await import_users(account_stub, "b")
    for bad in BAD_IDS:
        error = await rpc_error(_acting_call(follow_stub, rpc, bad))
        assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_USER_ID", "user_id")


BATCHES = [
    ("Follow", 20, "target_ids"),
    ("Unfollow", 20, "target_ids"),
    ("Check", 100, "target_ids"),
    ("GetInfo", 20, "target_ids"),
    ("ImportAccounts", 100, "accounts"),
    ("CheckAccounts", 100, "user_ids"),
    ("DeleteAccounts", 100, "user_ids"),
]


def _batch_call(
    follow_stub: FollowStub, account_stub: AccountStub, rpc: str, items: list[str]
) -> Awaitable[object]:
    if rpc == "Follow":
        return follow_stub.Follow(pb.FollowRequest(user_id="me", target_ids=items))
    if rpc == "Unfollow":
        return follow_stub.Unfollow(pb.UnfollowRequest(user_id="me", target_ids=items))
    if rpc == "Check":
        return follow_stub.Check(pb.CheckRequest(user_id="me", target_ids=items))
    if rpc == "GetInfo":
        return follow_stub.GetInfo(pb.GetInfoRequest(user_id="me", target_ids=items))
    if rpc == "ImportAccounts":
        return account_stub.ImportAccounts(
            pb.ImportAccountsRequest(accounts=[pb.Account(user_id=u) for u in items])
        )
    if rpc == "CheckAccounts":
        return account_stub.CheckAccounts(pb.CheckAccountsRequest(user_ids=items))
    assert rpc == "DeleteAccounts"
    return account_stub.DeleteAccounts(pb.DeleteAccountsRequest(user_ids=items))


@pytest.mark.parametrize(("rpc", "maximum", "field"), BATCHES)
async def test_batch_limits(
    follow_stub: FollowStub, account_stub: AccountStub, rpc: str, maximum: int, field: str
) -> None:
    """A batch of 0 items (MISSING_ITEMS) or one over the limit (TOO_MANY_ITEMS: 21 follow
    targets, 101 check targets, 21 GetInfo targets, 101 accounts) fails the whole call with
    INVALID_ARGUMENT naming the field and changes nothing; exactly the limit is served."""
    people = [f"p{i:03d}" for i in range(maximum + 1)]
    await import_users(account_stub, "me", *people)
    error = await rpc_error(_batch_call(follow_stub, account_stub, rpc, []))
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "MISSING_ITEMS", field)
    error = await rpc_error(_batch_call(follow_stub, account_stub, rpc, people))
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_ITEMS", field)
    assert str(maximum) in (error.details() or "")
    # nothing happened: nobody was followed, deleted or re-imported
    assert await counts(follow_stub, "me") == (0, 0, 0)
    statuses = await account_stub.CheckAccounts(pb.CheckAccountsRequest(user_ids=people[:100]))
    assert all(s.imported for s in statuses.statuses)
    response = await _batch_call(follow_stub, account_stub, rpc, people[:maximum])
    assert response is not None


async def test_failed_batch_writes_nothing(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """A Follow of 21 valid targets is refused as a whole: not even the first 20 are
    followed."""
    people = [f"p{i:02d}" for i in range(21)]
    await import_users(account_stub, "me", *people)
    await rpc_error(follow_stub.Follow(pb.FollowRequest(user_id="me", target_ids=people)))
    assert await counts(follow_stub, "me") == (0, 0, 0)
    assert await ids(follow_stub, "me", FOLLOWING) == []


# -- accounts --------------------------------------------------------------------------------


async def _profile(stub: FollowStub, viewer: str, user: str) -> tuple[str, str, int]:
    for entry in await whole_list(stub, viewer, FOLLOWING):
        if entry.user_id == user:
            return entry.nick, entry.face_url, entry.profile_sequence
    raise AssertionError(f"{viewer} does not follow {user}")


async def _import(stub: AccountStub, *accounts: pb.Account) -> list[int]:
    response = await stub.ImportAccounts(pb.ImportAccountsRequest(accounts=accounts))
    assert [r.user_id for r in response.results] == [a.user_id for a in accounts]
    return [r.code for r in response.results]


async def test_reimport_updates_only_given_fields(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """Re-importing keeps one account, updates nick and face URL only where given, and
    bumps profile_sequence only when something really changed."""
    await import_users(account_stub, "viewer")
    assert await _import(account_stub, pb.Account(user_id="u")) == [OK]
    await follow(follow_stub, "viewer", "u")
    assert await _profile(follow_stub, "viewer", "u") == ("", "", 0)
    steps: list[tuple[pb.Account, tuple[str, str, int]]] = [
        (pb.Account(user_id="u", nick="One"), ("One", "", 1)),
        (pb.Account(user_id="u", nick="One"), ("One", "", 1)),  # same value: no bump
        (pb.Account(user_id="u"), ("One", "", 1)),  # nothing given: nothing changes
        (pb.Account(user_id="u", face_url="https://f/1"), ("One", "https://f/1", 2)),
        (pb.Account(user_id="u", nick="Two", face_url="https://f/1"), ("Two", "https://f/1", 3)),
        (pb.Account(user_id="u", nick="Two", face_url="https://f/1"), ("Two", "https://f/1", 3)),
        (pb.Account(user_id="u", nick=""), ("", "https://f/1", 4)),  # explicit empty clears
    ]
    for account, expected in steps:
        assert await _import(account_stub, account) == [OK]
        assert await _profile(follow_stub, "viewer", "u") == expected, account
    # re-import keeps relationships and counts
    assert await counts(follow_stub, "u") == (1, 0, 0)


async def test_import_per_item_errors(follow_stub: FollowStub, account_stub: AccountStub) -> None:
    """Malformed ids and over-long or NUL-bearing profile fields fail only their item with
    INVALID_ARGUMENT; the good accounts of the same request are imported."""
    codes = await _import(
        account_stub,
        pb.Account(user_id="good1", nick="n"),
        pb.Account(user_id=""),
        pb.Account(user_id="x" * 33),
        pb.Account(user_id="long_nick", nick="n" * 501),
        pb.Account(user_id="nul_face", face_url="a\x00b"),
        pb.Account(user_id="good2", nick="é" * 250),
    )
    assert codes == [OK, INVALID, INVALID, INVALID, INVALID, OK]
    statuses = await account_stub.CheckAccounts(
        pb.CheckAccountsRequest(user_ids=["good1", "long_nick", "nul_face", "good2"])
    )
    assert [s.imported for s in statuses.statuses] == [True, False, False, True]


async def test_import_same_account_twice_in_one_request(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """The same id twice in one import is like two imports in a row: later fields win,
    fields given only earlier are kept, and there is one account."""
    codes = await _import(
        account_stub,
        pb.Account(user_id="u", nick="early", face_url="https://early"),
        pb.Account(user_id="u", nick="late"),
        pb.Account(user_id="v"),
    )
    assert codes == [OK, OK, OK]
    await follow(follow_stub, "v", "u")
    nick, face, _ = await _profile(follow_stub, "v", "u")
    assert (nick, face) == ("late", "https://early")


async def test_check_accounts(account_stub: AccountStub) -> None:
    """CheckAccounts tells imported from not imported per id in request order, and answers
    malformed ids with a per-item INVALID_ARGUMENT."""
    await import_users(account_stub, "a", "b")
    await account_stub.DeleteAccounts(pb.DeleteAccountsRequest(user_ids=["b"]))
    response = await account_stub.CheckAccounts(
        pb.CheckAccountsRequest(user_ids=["a", "b", "ghost", "", "a", "a\tb"])
    )
    assert [(s.user_id, s.code, s.imported) for s in response.statuses] == [
        ("a", OK, True),
        ("b", OK, False),
        ("ghost", OK, False),
        ("", INVALID, False),
        ("a", OK, True),
        ("a\tb", INVALID, False),
    ]
    assert response.statuses[3].message


async def test_delete_account_removes_everything_and_fixes_counts(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """Deleting an account removes its relationships in both directions and corrects the
    follower, following and mutual counts of everyone it touched; the account is gone."""
    await import_users(account_stub, "gone", "friend", "idol", "fan", "other")
    await follow(follow_stub, "gone", "friend", "idol")
    await follow(follow_stub, "friend", "gone", "idol")
    await follow(follow_stub, "fan", "gone", "friend")
    await follow(follow_stub, "other", "friend")
    everyone = ["gone", "friend", "idol", "fan", "other"]
    await assert_consistent(follow_stub, everyone)
    assert await counts(follow_stub, "friend") == (3, 2, 1)

    response = await account_stub.DeleteAccounts(
        pb.DeleteAccountsRequest(user_ids=["gone", "never_was", "gone", ""])
    )
    assert [r.code for r in response.results] == [OK, OK, OK, INVALID]

    assert await counts(follow_stub, "friend") == (2, 1, 0)
    assert await counts(follow_stub, "idol") == (1, 0, 0)
    assert await counts(follow_stub, "fan") == (0, 1, 0)
    assert await check(follow_stub, "friend", "gone") == [NONE]
    assert await ids(follow_stub, "friend", MUTUAL) == []
    assert "gone" not in await ids(follow_stub, "idol", FAN)
    await assert_consistent(follow_stub, ["friend", "idol", "fan", "other"])
    statuses = await account_stub.CheckAccounts(pb.CheckAccountsRequest(user_ids=["gone"]))
    assert not statuses.statuses[0].imported
    # the deleted user can no longer act, nor be followed
    error = await rpc_error(follow_stub.Follow(pb.FollowRequest(user_id="gone", target_ids=["x"])))
    assert_error(error, grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND", "user_id")
    assert await follow(follow_stub, "fan", "gone") == [NOT_FOUND]
    # importing the id again starts from nothing
    await import_users(account_stub, "gone")
    assert await counts(follow_stub, "gone") == (0, 0, 0)
    assert await ids(follow_stub, "gone", FAN) == []


async def test_delete_several_connected_accounts_at_once(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """Deleting two accounts that follow each other in one request leaves no edge behind
    and the survivors' counts exact."""
    await import_users(account_stub, "a", "b", "c")
    await follow(follow_stub, "a", "b", "c")
    await follow(follow_stub, "b", "a", "c")
    await follow(follow_stub, "c", "a", "b")
    response = await account_stub.DeleteAccounts(pb.DeleteAccountsRequest(user_ids=["a", "b"]))
    assert [r.code for r in response.results] == [OK, OK]
    assert await counts(follow_stub, "c") == (0, 0, 0)
    await assert_consistent(follow_stub, ["c"])


async def test_counts_always_equal_list_lengths(
    follow_stub: FollowStub, account_stub: AccountStub
) -> None:
    """After a mix of follows, repeats, unfollows, mutual changes and a deletion, every
    user's counts equal the lengths of the lists the service returns."""
    users = [f"u{i}" for i in range(6)]
    await import_users(account_stub, *users)
    await follow(follow_stub, "u0", "u1", "u2", "u3", "u4", "u5")
    await follow(follow_stub, "u1", "u0", "u2", "u0")
    await follow(follow_stub, "u2", "u0", "u1")
    await follow(follow_stub, "u3", "u0")
    await unfollow(follow_stub, "u0", "u2", "u5")
    await follow(follow_stub, "u0", "u2")
    await unfollow(follow_stub, "u1", "u3")
    await follow(follow_stub, "u5", "u4", "u3", "u1")
    await assert_consistent(follow_stub, users)
    await account_stub.DeleteAccounts(pb.DeleteAccountsRequest(user_ids=["u2"]))
    await assert_consistent(follow_stub, [u for u in users if u != "u2"])


# -- database trouble ------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
async def dead_db_stub() -> AsyncIterator[tuple[FollowStub, AccountStub]]:
    """The real servicers, core and store over a pool whose database URL points at a closed
    local port: every database call fails to connect."""
    url = f"postgresql://postgres@127.0.0.1:{_closed_port()}/follow"
    pool = await asyncpg.create_pool(url, min_size=0, max_size=2, timeout=2)
    assert pool is not None
    core = FollowCore(Store(pool), CursorCodec(b"k" * 32), Limits())
    server = grpc.aio.server()
    pb_grpc.add_FollowServiceServicer_to_server(FollowServicer(core), server)
    pb_grpc.add_AccountServiceServicer_to_server(AccountServicer(core), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.FollowServiceStub(channel), pb_grpc.AccountServiceStub(channel)
    finally:
        await server.stop(0)
        await pool.close()


def _assert_unavailable(error: grpc.aio.AioRpcError) -> None:
    assert_error(error, grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE", None)
    details = error.details() or ""
    for leak in ("SELECT", "INSERT", "follow_counts", "postgres", "127.0.0.1", "Errno", "asyncpg"):
        assert leak not in details, details


async def test_database_unreachable_is_unavailable(
    dead_db_stub: tuple[FollowStub, AccountStub],
) -> None:
    """With the database unreachable every RPC fails with UNAVAILABLE, reason
    DATABASE_UNAVAILABLE, and the message carries no SQL, address or driver text."""
    follow_stub, account_stub = dead_db_stub
    calls: list[Awaitable[object]] = [
        follow_stub.Follow(pb.FollowRequest(user_id="a", target_ids=["b"])),
        follow_stub.Unfollow(pb.UnfollowRequest(user_id="a", target_ids=["b"])),
        follow_stub.Check(pb.CheckRequest(user_id="a", target_ids=["b"])),
        follow_stub.GetInfo(pb.GetInfoRequest(user_id="a", target_ids=["b"])),
        follow_stub.List(pb.ListRequest(user_id="a", follow_type=FAN)),
        account_stub.ImportAccounts(pb.ImportAccountsRequest(accounts=[pb.Account(user_id="a")])),
        account_stub.CheckAccounts(pb.CheckAccountsRequest(user_ids=["a"])),
        account_stub.DeleteAccounts(pb.DeleteAccountsRequest(user_ids=["a"])),
    ]
    for call in calls:
        _assert_unavailable(await rpc_error(call))


async def test_request_errors_come_before_the_database(
    dead_db_stub: tuple[FollowStub, AccountStub],
) -> None:
    """A malformed request is refused as INVALID_ARGUMENT even while the database is down:
    validation needs no database, so the caller learns the real problem."""
    follow_stub, _ = dead_db_stub
    error = await rpc_error(follow_stub.Follow(pb.FollowRequest(user_id="", target_ids=["b"])))
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_USER_ID", "user_id")
    error = await rpc_error(follow_stub.List(pb.ListRequest(user_id="a", follow_type=0)))  # type: ignore[arg-type]
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FOLLOW_TYPE", "follow_type")


async def test_closed_pool_is_unavailable(make_service: ServiceFactory, db_url: str) -> None:
    """When the service's database connections are gone (pool terminated, backends killed)
    calls answer UNAVAILABLE / DATABASE_UNAVAILABLE rather than INTERNAL."""
    service = await make_service()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = pb_grpc.FollowServiceStub(channel)
        await import_users(pb_grpc.AccountServiceStub(channel), "a", "b")
        assert await follow(stub, "a", "b") == [OK]
        service.pool.terminate()
        _assert_unavailable(
            await rpc_error(stub.Check(pb.CheckRequest(user_id="a", target_ids=["b"])))
        )
        _assert_unavailable(
            await rpc_error(stub.Follow(pb.FollowRequest(user_id="b", target_ids=["a"])))
        )


# -- database failures at the servicer boundary -------------------------------------------


async def test_statement_timeout_is_deadline_exceeded(
    db_url: str, make_service: ServiceFactory
) -> None:
    """A statement the database cancels (statement_timeout while waiting on a row lock)
    answers DEADLINE_EXCEEDED with reason DEADLINE_EXCEEDED and no SQL in the message; the
    failed call wrote nothing."""
    # asyncpg passes unknown URL parameters on as server settings: every pooled connection
    # of this service cancels statements after 300 ms.
    running = await make_service()
    joiner = "&" if "?" in db_url else "?"
    slow = await start_service(
        Settings(grpc_listen="127.0.0.1:0"), f"{db_url}{joiner}statement_timeout=300", migrate=False
    )
    blocker = await asyncpg.connect(db_url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{slow.port}") as ch:
            stub = pb_grpc.FollowServiceStub(ch)
            await import_users(pb_grpc.AccountServiceStub(ch), "a", "b")
            async with blocker.transaction():
                await blocker.execute("SELECT 1 FROM follow_counts WHERE user_id = 'a' FOR UPDATE")
                error = await rpc_error(
                    stub.Follow(pb.FollowRequest(user_id="a", target_ids=["b"]), timeout=10)
                )
            assert_error(error, grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", None)
            assert "FOR UPDATE" not in (error.details() or "")
            assert "statement" not in (error.details() or "")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as other:
                assert await counts(pb_grpc.FollowServiceStub(other), "a") == (0, 0, 0)
    finally:
        await blocker.close()
        await slow.stop(0)


async def test_unexpected_database_error_is_internal_without_sql(
    db_url: str, follow_stub: FollowStub, account_stub: pb_grpc.AccountServiceAsyncStub
) -> None:
    """An unexpected database error (here a dropped table) answers INTERNAL with the plain
    message "internal error": no SQL text, table name or stack trace reaches the caller."""
    await import_users(account_stub, "a")
    admin = await asyncpg.connect(db_url)
    try:
        await admin.execute("DROP TABLE followers")
    finally:
        await admin.close()
    error = await rpc_error(
        follow_stub.List(pb.ListRequest(user_id="a", follow_type=pb.FOLLOW_TYPE_FAN))
    )
    assert_error(error, grpc.StatusCode.INTERNAL, "INTERNAL", None)
    assert error.details() == "internal error"
