"""Each v4 command: its JSON body -> one follow.v1 request -> its response -> v4 JSON.

Only JSON shape and types are checked here (30001, 60015 for account ids). Ids, limits,
batch sizes, cursors and per-item outcomes are the core's; its codes become v4 numbers
through the tables in server/errors.py.

Per-item answers echo each id as given, except that an id over ECHO_CHARS characters (never
a valid one: ids are at most 32 bytes) is cut to its first ECHO_CHARS characters and "...",
so a 200 kB id does not come back as a 200 kB answer. Results are in request order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from follow.v1 import follow_pb2 as pb
from server.errors import ITEM_V4_CODES, v4_code
from server.v4.backend import Backend, CallFailedError
from server.v4.envelope import ACCOUNT_TYPE, INTERNAL_ERROR, PARAM_ERROR, V4Error, json_type

Body = dict[str, object]

_ITEM_CODES: dict[int, int] = {int(item): code for item, code in ITEM_V4_CODES.items()}
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
ECHO_CHARS = 64
_NICK = "Tag_Profile_IM_Nick"
_IMAGE = "Tag_Profile_IM_Image"


@dataclass(frozen=True, slots=True)
class Command:
    """One v4 command: its translation to follow.v1 and the field names its errors use."""

    run: Callable[[Backend, Body], Awaitable[Body]]
    # the contract's field names -> this command's v4 field names, for error messages
    fields: Mapping[str, str]

    async def __call__(self, backend: Backend, body: Body) -> Body:
        try:
            return await self.run(backend, body)
        except CallFailedError as exc:
            raise translate(exc, self.fields) from None


def translate(exc: CallFailedError, fields: Mapping[str, str]) -> V4Error:
    """A failed call as a v4 error whose ErrorInfo names the v4 field."""
    code = v4_code(exc.reason, exc.status)
    if exc.reason is None:
        return V4Error(code, f"the follow service did not answer ({exc.status.name}); try again")
    message = exc.message or "internal error"
    if exc.field:
        prefix = f"{exc.field}: "
        message = message.removeprefix(prefix)
        message = f"{fields.get(exc.field, exc.field)}: {message}"
    return V4Error(code, message)


def _item_code(code: int) -> int:
    return _ITEM_CODES.get(code, INTERNAL_ERROR)


def _cut(user_id: str) -> str:
    """An echoed id, bounded (see the module docstring); call only when it is too long."""
    return user_id[:ECHO_CHARS] + "..."


# -- JSON field readers: absent fields get the contract's zero value, which the core judges --


def _account(body: Mapping[str, object], name: str, where: str = "") -> str:
    value = body.get(name, "")
    if not isinstance(value, str):
        raise V4Error(
            ACCOUNT_TYPE, f"{where}{name} must be a string (an account id), not {json_type(value)}"
        )
    return value


def _array(body: Body, name: str, code: int) -> list[object]:
    value = body.get(name, [])
    if not isinstance(value, list):
        raise V4Error(code, f"{name} must be an array, not {json_type(value)}")
    return value


def _accounts(body: Body, name: str) -> list[str]:
    """An array of account ids, like To_Account: [\"u1\", \"u2\"]."""
    ids = _array(body, name, ACCOUNT_TYPE)
    if all(value.__class__ is str for value in ids):
        return ids  # type: ignore[return-value]
    for i, value in enumerate(ids):
        if not isinstance(value, str):
            raise V4Error(
                ACCOUNT_TYPE,
                f"{name}[{i}] must be a string (an account id), not {json_type(value)}",
            )
    return ids  # type: ignore[return-value]


def _objects(body: Body, name: str) -> list[Mapping[str, object]]:
    """An array of objects, like FollowItem: [{\"To_Account\": \"u2\"}]."""
    items = _array(body, name, PARAM_ERROR)
    for i, value in enumerate(items):
        if not isinstance(value, dict):
            raise V4Error(PARAM_ERROR, f"{name}[{i}] must be an object, not {json_type(value)}")
    return items  # type: ignore[return-value]


def _object_accounts(body: Body, name: str, key: str) -> list[str]:
    return [_account(item, key, f"{name}[{i}].") for i, item in enumerate(_objects(body, name))]


def _int32(body: Body, name: str) -> int:
    """An integer field, clamped into int32: the core judges the value, not its width."""
    value = body.get(name, 0)
    if not isinstance(value, int) or isinstance(value, bool):
        raise V4Error(PARAM_ERROR, f"{name} must be an integer, not {json_type(value)}")
    return min(max(value, _INT32_MIN), _INT32_MAX)


def _text(body: Mapping[str, object], name: str, where: str = "") -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise V4Error(PARAM_ERROR, f"{where}{name} must be a string, not {json_type(value)}")
    return value


# -- follow commands ------------------------------------------------------------------------


def _result_items(results: Iterable[pb.ItemResult]) -> list[Body]:
    return [
        {
            "To_Account": r.user_id if len(r.user_id) <= ECHO_CHARS else _cut(r.user_id),
            "ResultCode": _item_code(r.code),
            "ResultInfo": r.message,
        }
        for r in results
    ]


async def follow_add(backend: Backend, body: Body) -> Body:
    request = pb.FollowRequest(
        user_id=_account(body, "From_Account"),
        target_ids=_object_accounts(body, "FollowItem", "To_Account"),
    )
    return {"ResultItem": _result_items((await backend.Follow(request)).results)}


async def follow_delete(backend: Backend, body: Body) -> Body:
    request = pb.UnfollowRequest(
        user_id=_account(body, "From_Account"), target_ids=_accounts(body, "To_Account")
    )
    return {"ResultItem": _result_items((await backend.Unfollow(request)).results)}


async def follow_check(backend: Backend, body: Body) -> Body:
    request = pb.CheckRequest(
        user_id=_account(body, "From_Account"), target_ids=_accounts(body, "To_Account")
    )
    response = await backend.Check(request)
    codes = _ITEM_CODES
    return {
        "ResultItem": [
            {
                "To_Account": r.user_id if len(r.user_id) <= ECHO_CHARS else _cut(r.user_id),
                "ResultCode": codes.get(r.code, INTERNAL_ERROR),
                "ResultInfo": r.message,
                "FollowType": r.follow_type,
            }
            for r in response.results
        ]
    }


def _profile(entry: pb.ListEntry) -> list[Body]:
    items: list[Body] = []
    if entry.nick:
        items.append({"Tag": _NICK, "Value": entry.nick})
    if entry.face_url:
        items.append({"Tag": _IMAGE, "Value": entry.face_url})
    return items


async def follow_get(backend: Backend, body: Body) -> Body:
    cursor = _text(body, "StartCursor")
    request = pb.ListRequest(
        user_id=_account(body, "From_Account"),
        follow_type=_int32(body, "FollowType"),  # type: ignore[arg-type]
        page_size=_int32(body, "WantNum"),
        page_token=cursor or "",
    )
    response = await backend.List(request)
    return {
        "FollowItem": [
            {
                "To_Account": e.user_id,
                "FollowTime": e.follow_time.seconds,
                "ProfileItem": _profile(e),
                "profile_sequence": e.profile_sequence,
                "ProfileSequence": e.profile_sequence,
            }
            for e in response.entries
        ],
        "NextCursor": response.next_page_token,
    }


async def follow_get_info(backend: Backend, body: Body) -> Body:
    request = pb.GetInfoRequest(
        user_id=_account(body, "From_Account"), target_ids=_accounts(body, "To_Account")
    )
    response = await backend.GetInfo(request)
    return {
        "FollowInfo": [
            {
                "To_Account": i.user_id if len(i.user_id) <= ECHO_CHARS else _cut(i.user_id),
                "ResultCode": _item_code(i.code),
                "ResultInfo": i.message,
                "FollowerCount": i.follower_count,
                "FollowingCount": i.following_count,
                "MutualFollowingCount": i.mutual_count,
            }
            for i in response.infos
        ]
    }


# -- account commands -----------------------------------------------------------------------


def _account_message(item: Mapping[str, object], where: str = "") -> pb.Account:
    return pb.Account(
        user_id=_account(item, "UserID", where),
        nick=_text(item, "Nick", where),
        face_url=_text(item, "FaceUrl", where),
    )


async def account_import(backend: Backend, body: Body) -> Body:
    request = pb.ImportAccountsRequest(accounts=[_account_message(body)])
    (result,) = (await backend.ImportAccounts(request)).results
    if result.code != pb.RESULT_CODE_OK:
        raise V4Error(_item_code(result.code), f"UserID: {result.message}")
    return {}


async def multiaccount_import(backend: Backend, body: Body) -> Body:
    if "Accounts" in body and "AccountList" in body:
        raise V4Error(PARAM_ERROR, "Accounts and AccountList: give one of them, not both")
    if "AccountList" in body:
        accounts = [
            _account_message(item, f"AccountList[{i}].")
            for i, item in enumerate(_objects(body, "AccountList"))
        ]
    else:
        accounts = [pb.Account(user_id=u) for u in _accounts(body, "Accounts")]
    response = await backend.ImportAccounts(pb.ImportAccountsRequest(accounts=accounts))
    return {
        "FailAccounts": [
            r.user_id if len(r.user_id) <= ECHO_CHARS else _cut(r.user_id)
            for r in response.results
            if r.code != pb.RESULT_CODE_OK
        ]
    }


async def account_check(backend: Backend, body: Body) -> Body:
    request = pb.CheckAccountsRequest(user_ids=_object_accounts(body, "CheckItem", "UserID"))
    response = await backend.CheckAccounts(request)
    return {
        "ResultItem": [
            {
                "UserID": s.user_id if len(s.user_id) <= ECHO_CHARS else _cut(s.user_id),
                "ResultCode": _item_code(s.code),
                "ResultInfo": s.message,
                "AccountStatus": "Imported" if s.imported else "NotImported",
            }
            for s in response.statuses
        ]
    }


async def account_delete(backend: Backend, body: Body) -> Body:
    request = pb.DeleteAccountsRequest(user_ids=_object_accounts(body, "DeleteItem", "UserID"))
    response = await backend.DeleteAccounts(request)
    return {
        "ResultItem": [
            {
                "UserID": r.user_id if len(r.user_id) <= ECHO_CHARS else _cut(r.user_id),
                "ResultCode": _item_code(r.code),
                "ResultInfo": r.message,
            }
            for r in response.results
        ]
    }


_FOLLOW = {"user_id": "From_Account", "target_ids": "To_Account"}

# "<service>/<command>" of the URL path /v4/<service>/<command>
COMMANDS: dict[str, Command] = {
    "follow/follow_add": Command(follow_add, {**_FOLLOW, "target_ids": "FollowItem"}),
    "follow/follow_delete": Command(follow_delete, _FOLLOW),
    "follow/follow_check": Command(follow_check, _FOLLOW),
    "follow/follow_get": Command(
        follow_get,
        {
            "user_id": "From_Account",
            "follow_type": "FollowType",
            "page_size": "WantNum",
            "page_token": "StartCursor",
        },
    ),
    "follow/follow_get_info": Command(follow_get_info, _FOLLOW),
    "im_open_login_svc/account_import": Command(account_import, {"accounts": "UserID"}),
    "im_open_login_svc/multiaccount_import": Command(
        multiaccount_import, {"accounts": "Accounts or AccountList"}
    ),
    "im_open_login_svc/account_check": Command(account_check, {"user_ids": "CheckItem"}),
    "im_open_login_svc/account_delete": Command(account_delete, {"user_ids": "DeleteItem"}),
}
