"""server/v4/commands.py over real HTTP: every command with the spec's sample bodies, the
per-item outcomes, JSON type errors, the core's request-level errors as v4 codes, paging."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest

from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from tests.support.threaded import ServiceInThread
from tests.v4_helpers import ShimFactory, V4Client

pytest_plugins = ["tests.v4_fixtures"]

Uid = Callable[[str], str]


async def test_spec_sample_bodies(make_shim: ShimFactory) -> None:
    """Each command answers the spec's sample request body (section 2) with the spec's
    response fields, in a fresh database."""
    v4 = await make_shim()
    imported = await v4.ok(
        "account_import",
        {"UserID": "UserID_002", "Nick": "NickNameTest2", "FaceUrl": "https://x/2.png"},
    )
    assert set(imported) == {"ActionStatus", "ErrorCode", "ErrorInfo", "ErrorDisplay"}
    multi = await v4.ok("multiaccount_import", {"Accounts": ["UserID_001", "UserID_003"]})
    assert multi["FailAccounts"] == []

    added = await v4.ok(
        "follow_add",
        {
            "From_Account": "UserID_001",
            "FollowItem": [{"To_Account": "UserID_002"}, {"To_Account": "UserID_003"}],
        },
    )
    assert added["ResultItem"] == [
        {"To_Account": "UserID_002", "ResultCode": 0, "ResultInfo": ""},
        {"To_Account": "UserID_003", "ResultCode": 0, "ResultInfo": ""},
    ]
    await v4.ok(
        "follow_add", {"From_Account": "UserID_003", "FollowItem": [{"To_Account": "UserID_001"}]}
    )

    check = await v4.ok(
        "follow_check", {"From_Account": "UserID_001", "To_Account": ["UserID_002", "UserID_003"]}
    )
    assert check["ResultItem"] == [
        {"To_Account": "UserID_002", "ResultCode": 0, "ResultInfo": "", "FollowType": 2},
        {"To_Account": "UserID_003", "ResultCode": 0, "ResultInfo": "", "FollowType": 3},
    ]

    page = await v4.ok(
        "follow_get",
        {"From_Account": "UserID_001", "FollowType": 2, "StartCursor": "", "WantNum": 100},
    )
    assert page["NextCursor"] == ""
    assert [i["To_Account"] for i in page["FollowItem"]] == ["UserID_003", "UserID_002"]
    item = page["FollowItem"][1]
    assert set(item) == {
        "To_Account",
        "FollowTime",
        "ProfileItem",
        "profile_sequence",
        "ProfileSequence",
    }
    assert item["ProfileItem"] == [
        {"Tag": "Tag_Profile_IM_Nick", "Value": "NickNameTest2"},
        {"Tag": "Tag_Profile_IM_Image", "Value": "https://x/2.png"},
    ]
    assert item["profile_sequence"] == item["ProfileSequence"]
    assert isinstance(item["FollowTime"], int)
    assert page["FollowItem"][0]["ProfileItem"] == []
    fans = await v4.ok(
        "follow_get",
        {"From_Account": "UserID_001", "FollowType": 1, "StartCursor": "", "WantNum": 100},
    )
    assert [i["To_Account"] for i in fans["FollowItem"]] == ["UserID_003"]
    mutual = await v4.ok("follow_get", {"From_Account": "UserID_001", "FollowType": 3})
    assert [i["To_Account"] for i in mutual["FollowItem"]] == ["UserID_003"]

    info = await v4.ok(
        "follow_get_info",
        {"From_Account": "UserID_001", "To_Account": ["UserID_001", "UserID_002"]},
    )
    assert info["FollowInfo"] == [
        {
            "To_Account": "UserID_001",
            "ResultCode": 0,
            "ResultInfo": "",
            "FollowerCount": 1,
            "FollowingCount": 2,
            "MutualFollowingCount": 1,
        },
        {
            "To_Account": "UserID_002",
            "ResultCode": 0,
            "ResultInfo": "",
            "FollowerCount": 1,
            "FollowingCount": 0,
            "MutualFollowingCount": 0,
        },
    ]

    deleted = await v4.ok(
        "follow_delete", {"From_Account": "UserID_001", "To_Account": ["UserID_002", "UserID_003"]}
    )
    assert deleted["ResultItem"] == [
        {"To_Account": "UserID_002", "ResultCode": 0, "ResultInfo": ""},
        {"To_Account": "UserID_003", "ResultCode": 0, "ResultInfo": ""},
    ]

    new_form = await v4.ok(
        "multiaccount_import",
        {"AccountList": [{"UserID": "UserID_004", "Nick": "n4", "FaceUrl": "https://x/4.png"}]},
    )
    assert new_form["FailAccounts"] == []
    status = await v4.ok(
        "account_check", {"CheckItem": [{"UserID": "UserID_004"}, {"UserID": "UserID_404"}]}
    )
    assert status["ResultItem"] == [
        {"UserID": "UserID_004", "ResultCode": 0, "ResultInfo": "", "AccountStatus": "Imported"},
        {"UserID": "UserID_404", "ResultCode": 0, "ResultInfo": "", "AccountStatus": "NotImported"},
    ]
    gone = await v4.ok("account_delete", {"DeleteItem": [{"UserID": "UserID_003"}]})
    assert gone["ResultItem"] == [{"UserID": "UserID_003", "ResultCode": 0, "ResultInfo": ""}]
    after = await v4.ok(
        "follow_get_info", {"From_Account": "UserID_001", "To_Account": ["UserID_001"]}
    )
    assert after["FollowInfo"][0]["FollowerCount"] == 0


async def test_per_item_outcomes_of_follow_add(v4: V4Client, uid: Uid) -> None:
    """follow_add: self-follow 30001, unknown account 30003, bad id 30001, the others done;
    ActionStatus stays OK."""
    a, b, ghost = uid("a"), uid("b"), uid("ghost")
    await v4.import_users(a, b)
    result = await v4.ok(
        "follow_add",
        {"From_Account": a, "FollowItem": [{"To_Account": t} for t in (a, ghost, b, "x" * 33)]},
    )
    codes = [(i["To_Account"], i["ResultCode"]) for i in result["ResultItem"]]
    assert codes == [(a, 30001), (ghost, 30003), (b, 0), ("x" * 33, 30001)]
    infos = [i["ResultInfo"] for i in result["ResultItem"]]
    assert "themselves" in infos[0]
    assert infos[2] == ""


async def test_repeated_follow_keeps_follow_time(v4: V4Client, uid: Uid) -> None:
    """Following again answers 0 and keeps the first FollowTime and the counts."""
    a, b = uid("a"), uid("b")
    await v4.import_users(a, b)
    body = {"From_Account": a, "FollowItem": [{"To_Account": b}]}
    await v4.ok("follow_add", body)
    first = await v4.ok("follow_get", {"From_Account": a, "FollowType": 2})
    await asyncio.sleep(1.1)
    again = await v4.ok("follow_add", body)
    assert again["ResultItem"][0]["ResultCode"] == 0
    second = await v4.ok("follow_get", {"From_Account": a, "FollowType": 2})
    assert second["FollowItem"] == first["FollowItem"]
    info = await v4.ok("follow_get_info", {"From_Account": a, "To_Account": [a]})
    assert info["FollowInfo"][0]["FollowingCount"] == 1


async def test_unfollow_not_followed_is_ok(v4: V4Client, uid: Uid) -> None:
    """Unfollowing someone not followed (or never imported) answers 0."""
    a, b = uid("a"), uid("b")
    await v4.import_users(a, b)
    result = await v4.ok("follow_delete", {"From_Account": a, "To_Account": [b, uid("ghost")]})
    assert [i["ResultCode"] for i in result["ResultItem"]] == [0, 0]


async def test_following_cap_is_32100_per_item(make_shim: ShimFactory) -> None:
    """Past the following limit (here 3), the items beyond it answer 32100 in request order."""
    v4 = await make_shim(max_following=3)
    users = [f"u{i}" for i in range(6)]
    await v4.import_users(*users)
    result = await v4.ok(
        "follow_add", {"From_Account": "u0", "FollowItem": [{"To_Account": u} for u in users[1:]]}
    )
    assert [i["ResultCode"] for i in result["ResultItem"]] == [0, 0, 0, 32100, 32100]
    assert "limit" in result["ResultItem"][3]["ResultInfo"]


async def test_follow_check_types(v4: V4Client, uid: Uid) -> None:
    """FollowType 0..3 seen from From_Account, as the spec's table says."""
    a, fan, followed, mutual, none = (uid(n) for n in ("a", "fan", "fd", "mu", "no"))
    await v4.import_users(a, fan, followed, mutual, none)
    await v4.ok(
        "follow_add",
        {"From_Account": a, "FollowItem": [{"To_Account": followed}, {"To_Account": mutual}]},
    )
    for other in (fan, mutual):
        await v4.ok("follow_add", {"From_Account": other, "FollowItem": [{"To_Account": a}]})
    result = await v4.ok(
        "follow_check", {"From_Account": a, "To_Account": [none, fan, followed, mutual]}
    )
    assert [i["FollowType"] for i in result["ResultItem"]] == [0, 1, 2, 3]


async def test_unknown_from_account_is_30003(v4: V4Client, uid: Uid) -> None:
    """A From_Account never imported fails the request with 30003 naming From_Account."""
    for command, body in (
        ("follow_add", {"From_Account": uid("ghost"), "FollowItem": [{"To_Account": "b"}]}),
        ("follow_get", {"From_Account": uid("ghost"), "FollowType": 1}),
        ("follow_get_info", {"From_Account": uid("ghost"), "To_Account": ["b"]}),
    ):
        code, info = await v4.fail(command, body)
        assert code == 30003, (command, info)
        assert info.startswith("From_Account"), info


@pytest.mark.parametrize(
    ("command", "field", "limit"),
    [
        ("follow_add", "FollowItem", 20),
        ("follow_delete", "To_Account", 20),
        ("follow_check", "To_Account", 100),
        ("follow_get_info", "To_Account", 20),
        ("multiaccount_import", "Accounts", 100),
        ("account_check", "CheckItem", 100),
        ("account_delete", "DeleteItem", 100),
    ],
)
async def test_too_many_items_is_30001(v4: V4Client, command: str, field: str, limit: int) -> None:
    """One item over the core's batch limit fails the whole request with 30001 naming the field."""
    ids = [f"u{i}" for i in range(limit + 1)]
    items: list[object]
    if field == "FollowItem":
        items = [{"To_Account": u} for u in ids]
    elif field in ("CheckItem", "DeleteItem"):
        items = [{"UserID": u} for u in ids]
    else:
        items = list(ids)
    code, info = await v4.fail(command, {"From_Account": "a", field: items})
    assert code == 30001
    assert field in info
    assert str(limit) in info


@pytest.mark.parametrize(
    ("command", "body", "code", "field"),
    [
        ("follow_add", {"From_Account": 5, "FollowItem": []}, 60015, "From_Account"),
        (
            "follow_add",
            {"From_Account": "a", "FollowItem": [{"To_Account": 1}]},
            60015,
            "FollowItem[0].To_Account",
        ),
        ("follow_add", {"From_Account": "a", "FollowItem": "b"}, 30001, "FollowItem"),
        ("follow_add", {"From_Account": "a", "FollowItem": ["b"]}, 30001, "FollowItem[0]"),
        ("follow_delete", {"From_Account": "a", "To_Account": "b"}, 60015, "To_Account"),
        ("follow_check", {"From_Account": "a", "To_Account": ["b", None]}, 60015, "To_Account[1]"),
        ("follow_get", {"From_Account": "a", "FollowType": "1"}, 30001, "FollowType"),
        ("follow_get", {"From_Account": "a", "FollowType": 1, "WantNum": 1.5}, 30001, "WantNum"),
        ("follow_get", {"From_Account": "a", "FollowType": 1, "WantNum": True}, 30001, "WantNum"),
        (
            "follow_get",
            {"From_Account": "a", "FollowType": 1, "StartCursor": 7},
            30001,
            "StartCursor",
        ),
        ("follow_get_info", {"From_Account": ["a"], "To_Account": ["b"]}, 60015, "From_Account"),
        ("account_import", {"UserID": 1}, 60015, "UserID"),
        ("account_import", {"UserID": "a", "Nick": 1}, 30001, "Nick"),
        ("multiaccount_import", {"Accounts": [1]}, 60015, "Accounts[0]"),
        ("multiaccount_import", {"AccountList": [{"UserID": 2}]}, 60015, "AccountList[0].UserID"),
        (
            "multiaccount_import",
            {"AccountList": [{"UserID": "a", "FaceUrl": []}]},
            30001,
            "AccountList[0].FaceUrl",
        ),
        ("multiaccount_import", {"Accounts": ["a"], "AccountList": []}, 30001, "Accounts"),
        ("account_check", {"CheckItem": [{"UserID": {}}]}, 60015, "CheckItem[0].UserID"),
        ("account_delete", {"DeleteItem": {"UserID": "a"}}, 30001, "DeleteItem"),
    ],
)
async def test_wrong_json_types(
    v4: V4Client, command: str, body: object, code: int, field: str
) -> None:
    """A field of the wrong JSON type: 30001, or 60015 for account id fields; ErrorInfo
    names the field."""
    got, info = await v4.fail(command, body)
    assert got == code, info
    assert info.startswith(field), info


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"From_Account": "", "To_Account": ["b"]}, "From_Account"),
        ({"To_Account": ["b"]}, "From_Account"),
        ({"From_Account": "x" * 33, "To_Account": ["b"]}, "From_Account"),
        ({"From_Account": "a", "To_Account": []}, "To_Account"),
        ({"From_Account": "a"}, "To_Account"),
    ],
)
async def test_core_validation_is_30001(v4: V4Client, body: object, field: str) -> None:
    """Empty, missing or too long ids and empty batches are judged by the core: 30001."""
    code, info = await v4.fail("follow_check", body)
    assert code == 30001
    assert info.startswith(field), info


async def test_follow_get_parameters(v4: V4Client, uid: Uid) -> None:
    """FollowType outside 1..3, negative WantNum, and a forged cursor are 30001; WantNum
    above 1000 (even above int32) is clamped, not an error."""
    a = uid("a")
    await v4.import_users(a)
    for body, field in (
        ({"From_Account": a, "FollowType": 0}, "FollowType"),
        ({"From_Account": a, "FollowType": 4}, "FollowType"),
        ({"From_Account": a, "FollowType": 2**40}, "FollowType"),
        ({"From_Account": a, "FollowType": 1, "WantNum": -1}, "WantNum"),
        ({"From_Account": a, "FollowType": 1, "StartCursor": "forged"}, "StartCursor"),
        (
            {
                "From_Account": a,
                "FollowType": 1,
                "StartCursor": "AQAGYNFlCElyVXNlcklEXzAwMwM3OWntQwHhOZTjDf2fyAo",
            },
            "StartCursor",
        ),
    ):
        code, info = await v4.fail("follow_get", body)
        assert code == 30001, info
        assert info.startswith(field), info
    for want in (1001, 2**31, 2**63):
        await v4.ok("follow_get", {"From_Account": a, "FollowType": 1, "WantNum": want})


async def test_cursor_of_another_list_is_30001(v4: V4Client, uid: Uid) -> None:
    """A NextCursor is bound to its user and list: reused elsewhere it is 30001."""
    a, b, c = uid("a"), uid("b"), uid("c")
    await v4.import_users(a, b, c)
    await v4.ok(
        "follow_add", {"From_Account": a, "FollowItem": [{"To_Account": b}, {"To_Account": c}]}
    )
    page = await v4.ok("follow_get", {"From_Account": a, "FollowType": 2, "WantNum": 1})
    cursor = page["NextCursor"]
    assert cursor
    for body in (
        {"From_Account": a, "FollowType": 1, "StartCursor": cursor},
        {"From_Account": b, "FollowType": 2, "StartCursor": cursor},
    ):
        code, _ = await v4.fail("follow_get", body)
        assert code == 30001
    rest = await v4.ok(
        "follow_get", {"From_Account": a, "FollowType": 2, "WantNum": 1, "StartCursor": cursor}
    )
    assert rest["NextCursor"] == ""
    assert len(rest["FollowItem"]) == 1


async def test_account_import_item_failure_is_request_failure(v4: V4Client) -> None:
    """account_import has no per-item list: a bad UserID fails the request with 30001."""
    code, info = await v4.fail("account_import", {"UserID": "x" * 33})
    assert code == 30001
    assert info.startswith("UserID")
    code, info = await v4.fail("account_import", {})
    assert code == 30001


async def test_multiaccount_import_fail_accounts(v4: V4Client, uid: Uid) -> None:
    """FailAccounts lists the ids that could not be imported; the others are imported;
    importing again updates Nick without a second account."""
    good, bad = uid("good"), "y" * 40
    result = await v4.ok("multiaccount_import", {"Accounts": [good, bad, ""]})
    assert result["FailAccounts"] == [bad, ""]
    await v4.ok("multiaccount_import", {"AccountList": [{"UserID": good, "Nick": "N"}]})
    status = await v4.ok("account_check", {"CheckItem": [{"UserID": good}, {"UserID": bad}]})
    assert [(i["AccountStatus"], i["ResultCode"]) for i in status["ResultItem"]] == [
        ("Imported", 0),
        ("NotImported", 30001),
    ]


async def test_paging_2500_fans(v4: V4Client, threaded_shim: ServiceInThread, uid: Uid) -> None:
    """2,500 fans read with WantNum 1000 come in pages of 1000, 1000, 500, each fan once,
    newest first, and the last NextCursor is ""."""
    star = uid("star")
    fans = [uid(f"f{i:04d}") for i in range(2500)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{threaded_shim.port}") as channel:
        accounts = pb_grpc.AccountServiceStub(channel)
        follow = pb_grpc.FollowServiceStub(channel)
        everyone = [star, *fans]
        await asyncio.gather(
            *(
                accounts.ImportAccounts(
                    pb.ImportAccountsRequest(
                        accounts=[pb.Account(user_id=u) for u in everyone[i : i + 100]]
                    )
                )
                for i in range(0, len(everyone), 100)
            )
        )
        sem = asyncio.Semaphore(16)

        async def follow_star(fan: str) -> None:
            async with sem:
                await follow.Follow(pb.FollowRequest(user_id=fan, target_ids=[star]))

        await asyncio.gather(*(follow_star(f) for f in fans))
    seen: list[str] = []
    times: list[int] = []
    sizes: list[int] = []
    cursor = ""
    while True:
        page = await v4.ok(
            "follow_get",
            {"From_Account": star, "FollowType": 1, "StartCursor": cursor, "WantNum": 1000},
        )
        sizes.append(len(page["FollowItem"]))
        seen.extend(i["To_Account"] for i in page["FollowItem"])
        times.extend(i["FollowTime"] for i in page["FollowItem"])
        cursor = page["NextCursor"]
        if not cursor:
            break
    assert sizes == [1000, 1000, 500]
    assert sorted(seen) == sorted(fans)
    assert times == sorted(times, reverse=True)
    info = await v4.ok("follow_get_info", {"From_Account": star, "To_Account": [star]})
    assert info["FollowInfo"][0]["FollowerCount"] == 2500


async def test_an_invalid_id_is_echoed_cut_to_a_bounded_length(v4: V4Client) -> None:
    """A 200 kB id comes back as its first 64 characters and "...", in every per-item
    answer (To_Account, UserID, FailAccounts): the answer does not grow with the input."""
    await v4.import_users("echo-a")
    huge = "h" * 200_000
    cut = "h" * 64 + "..."
    answers = {
        "follow_add": {"From_Account": "echo-a", "FollowItem": [{"To_Account": huge}]},
        "follow_delete": {"From_Account": "echo-a", "To_Account": [huge]},
        "follow_check": {"From_Account": "echo-a", "To_Account": [huge]},
        "follow_get_info": {"From_Account": "echo-a", "To_Account": [huge]},
        "account_check": {"CheckItem": [{"UserID": huge}]},
        "account_delete": {"DeleteItem": [{"UserID": huge}]},
    }
    for command, body in answers.items():
        payload = await v4.ok(command, body)
        items = payload.get("ResultItem") or payload["FollowInfo"]
        (item,) = items
        assert item.get("To_Account", item.get("UserID")) == cut, command
        assert item["ResultCode"] == 30001, command
        assert len(str(payload)) < 1000, command
    failed = await v4.ok("multiaccount_import", {"Accounts": ["echo-b", huge]})
    assert failed["FailAccounts"] == [cut]
    # At the limit nothing is cut: 64 characters (invalid, over 32 bytes) come back whole.
    exact = "e" * 64
    payload = await v4.ok("follow_check", {"From_Account": "echo-a", "To_Account": [exact]})
    assert payload["ResultItem"][0]["To_Account"] == exact
