"""Bad input at the v4 door: random JSON, wrong types, invalid UTF-8, deep nesting, 10 MB
bodies and numbers out of range, over real HTTP to the real shim and service.

Pinned throughout: every answer is HTTP 200 with the v4 envelope (never a 500), and an
answer with a non-zero ErrorCode leaves the database as it was.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from TLSSigAPIv2 import TLSSigAPIv2

from follow.v1 import follow_pb2_grpc as pb_grpc
from server.app import RunningService
from server.config import Settings
from server.v4.http import RunningShim, start_shim
from tests.helpers import import_users
from tests.test_fuzz_grpc import HOSTILE_IDS, Snapshot, snapshot

APP = 1400000004
KEY = "fuzz-v4-key-0123456789abcdef0123"
EXAMPLES = 150
COMMANDS = [
    "follow/follow_add",
    "follow/follow_delete",
    "follow/follow_check",
    "follow/follow_get",
    "follow/follow_get_info",
    "im_open_login_svc/account_import",
    "im_open_login_svc/multiaccount_import",
    "im_open_login_svc/account_check",
    "im_open_login_svc/account_delete",
]
FIELDS = [
    "From_Account",
    "To_Account",
    "FollowItem",
    "FollowType",
    "WantNum",
    "StartCursor",
    "UserID",
    "Nick",
    "FaceUrl",
    "Accounts",
    "AccountList",
    "CheckItem",
    "DeleteItem",
    "TagList",
]
ENVELOPE = ("ActionStatus", "ErrorCode", "ErrorInfo", "ErrorDisplay")
SETTINGS_EXAMPLES = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def query() -> dict[str, str]:
    return {
        "sdkappid": str(APP),
        "identifier": "administrator",
        "usersig": TLSSigAPIv2(APP, KEY).gen_sig("administrator"),
        "random": "99",
        "contenttype": "json",
    }


class Door:
    """The shim over HTTP, with the database beside it to compare before and after."""

    def __init__(self, session: aiohttp.ClientSession, port: int, db: asyncpg.Connection) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}/v4"
        self.db = db
        self.query = query()

    async def post(self, command: str, body: Any) -> dict[str, Any]:
        """POST and insist on HTTP 200 with the envelope; a failure changed nothing."""
        before: Snapshot = await snapshot(self.db)
        async with self.session.post(
            f"{self.base}/{command}", params=self.query, data=body
        ) as response:
            assert response.status == 200, response.status
            payload = await response.json(content_type=None)
        assert isinstance(payload, dict)
        assert all(k in payload for k in ENVELOPE), payload
        assert isinstance(payload["ErrorCode"], int)
        if payload["ErrorCode"] != 0:
            assert payload["ActionStatus"] == "FAIL"
            assert payload["ErrorInfo"]
            assert await snapshot(self.db) == before, f"failed call changed state: {payload}"
        return payload


@pytest.fixture
async def door(
    service: RunningService, db_url: str, account_stub: pb_grpc.AccountServiceAsyncStub
) -> AsyncIterator[Door]:
    await import_users(account_stub, "alice", "bob", "carol")
    settings_ = Settings(http_listen="127.0.0.1:0", sdkappid=APP, secret_key=KEY)
    shim: RunningShim = await start_shim(settings_, service.core)
    db = await asyncpg.connect(db_url)
    try:
        async with aiohttp.ClientSession() as session:
            yield Door(session, shim.port, db)
    finally:
        await db.close()
        await shim.stop()


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(["alice", "bob", "carol", *HOSTILE_IDS]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), children, max_size=6),
    ),
    max_leaves=30,
)
bodies = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),
)


@SETTINGS_EXAMPLES
@given(command=st.sampled_from(COMMANDS), body=bodies)
async def test_random_json_bodies_get_an_envelope_and_change_nothing_on_error(
    door: Door, command: str, body: object
) -> None:
    """Random JSON (wrong types, missing and extra fields, out-of-range numbers, hostile ids)
    to every command: HTTP 200 with the envelope, never a 500, and an error changes nothing."""
    await door.post(command, json.dumps(body).encode())


@SETTINGS_EXAMPLES
@given(command=st.sampled_from(COMMANDS), body=st.binary(max_size=200))
async def test_random_bytes_get_an_envelope(door: Door, command: str, body: bytes) -> None:
    """Arbitrary bytes as a body (invalid UTF-8, truncated JSON): an envelope, never a 500."""
    await door.post(command, body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"From_Account": "al\xffice", "To_Account": ["bob"]}',
        b'{"From_Account": "alice", "To_Account": ["\xc3\x28"]}',
        b"\xef\xbb\xbf{}",
        b'{"From_Account": "\\ud800", "To_Account": ["bob"]}',
        b'{"From_Account": "a\\u0000b", "To_Account": ["bob"]}',
    ],
    ids=["invalid-utf8", "invalid-utf8-item", "bom", "lone-surrogate-escape", "nul-escape"],
)
async def test_invalid_utf8_and_odd_escapes_are_refused_clearly(door: Door, body: bytes) -> None:
    """Bytes that are not UTF-8, and JSON escapes for a lone surrogate or NUL, get a clear
    error (60003 for bytes, 30001/60015 or a per-item error for the escapes) and no 500."""
    payload = await door.post("follow/follow_add", body)
    if payload["ErrorCode"] == 0:
        assert all(item["ResultCode"] != 0 for item in payload.get("ResultItem", []))


@pytest.mark.parametrize("depth", [100, 2000, 100_000])
async def test_deeply_nested_bodies_are_refused(door: Door, depth: int) -> None:
    """Arrays and objects nested thousands deep are refused (JSON parser's depth limit or
    a type error), never a crash or a 500."""
    for body in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
        payload = await door.post("follow/follow_add", body)
        assert payload["ErrorCode"] != 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("WantNum", 2**63),
        ("WantNum", 2**64 + 1),
        ("WantNum", -1),
        ("WantNum", 1e308),
        ("WantNum", 1.5),
        ("FollowType", 2**40),
        ("FollowType", -5),
        ("FollowType", "Y_FollowType_Fans"),
        ("StartCursor", 12345678901234567890),
        ("StartCursor", "../../etc/passwd"),
    ],
)
async def test_numbers_out_of_range_in_follow_get(door: Door, field: str, value: object) -> None:
    """follow_get with numbers beyond int32/int64, negatives, fractions and forged cursors:
    an error envelope or a valid page, never a 500."""
    body: dict[str, object] = {
        "From_Account": "alice",
        "FollowType": 3,
        "WantNum": 10,
    }
    body[field] = value
    await door.post("follow/follow_get", json.dumps(body).encode())


async def test_ten_megabyte_body_is_refused_without_being_read(door: Door) -> None:
    """A 10 MB body (over the 1 MiB default) with a Content-Length, and the same chunked,
    get a clear error envelope, not a 500 and not a hang."""
    big = b'{"From_Account": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    payload = await door.post("follow/follow_add", io.BytesIO(big))
    assert payload["ErrorCode"] != 0
    assert "bytes" in payload["ErrorInfo"]

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 256 * 1024):
            yield big[start : start + 256 * 1024]

    payload = await door.post("follow/follow_add", chunks())
    assert payload["ErrorCode"] != 0
