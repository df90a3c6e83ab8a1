"""server.watch_token (Watch positions) and the request checks of server.watch_servicer, in
process: a position round-trips, and anything this service did not sign is refused with
INVALID_POSITION; a cursor inside a row reads that row again."""

from __future__ import annotations

import base64
import hmac
import struct
from collections.abc import Callable

import pytest

from follow.v1 import events_pb2 as ev
from server.errors import Reason, ServiceError
from server.outbox import MAX_ID, Position
from server.watch_servicer import check_request
from server.watch_token import COMPLETE, Cursor, WatchTokens

KEY = b"0123456789abcdef0123456789abcdef"


def test_a_position_round_trips_and_is_url_safe() -> None:
    """Every cursor the hub makes (inside a row, a whole row, past a horizon) encodes to a
    short URL-safe token that decodes to itself."""
    tokens = WatchTokens(KEY)
    for cursor in (
        Cursor(Position(5, 7), 1),
        Cursor(Position(5, 7)),
        Cursor(Position(2**40, MAX_ID)),
    ):
        token = tokens.encode(cursor)
        assert len(token) <= 60
        assert token.replace("-", "").replace("_", "").isalnum()
        assert tokens.decode(token) == cursor


def test_a_rows_tokens_are_those_encode_makes() -> None:
    """The tokens made together for the events of one row (one hash of the row's part) are
    exactly encode()'s, and decode to each event's cursor."""
    tokens = WatchTokens(KEY)
    position = Position(2**40, 12345)
    dones = [1, 2, 3, COMPLETE]
    made = [t.decode() for t in tokens.row_token_bytes(position, dones)]
    assert made == [tokens.encode(Cursor(position, d)) for d in dones]
    assert [tokens.decode(t) for t in made] == [Cursor(position, d) for d in dones]


def test_a_token_of_the_draft_format_is_refused() -> None:
    """A position of the unreleased draft (version 1, HMAC-SHA256 with the page-token key)
    is INVALID_POSITION, never read as a place in the stream."""
    payload = struct.pack(">BQqI", 1, 5, 7, 1)
    mac = hmac.new(KEY, b"follow.v1.EventService/Watch position\x00" + payload, "sha256")
    old = base64.urlsafe_b64encode(payload + mac.digest()[:16]).rstrip(b"=").decode()
    with pytest.raises(ServiceError) as refused:
        WatchTokens(KEY).decode(old)
    assert refused.value.reason is Reason.INVALID_POSITION


def test_a_cursor_inside_a_row_reads_the_row_again() -> None:
    """A partial cursor reads from just before its row (the rest of the row comes again);
    a complete one reads after it."""
    assert Cursor(Position(9, 4), 2).read_from == Position(9, 3)
    assert Cursor(Position(9, 4), COMPLETE).read_from == Position(9, 4)
    assert not Cursor(Position(9, 4), 2).complete


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1],
        lambda t: t + "A",
        lambda t: t[:5] + ("B" if t[5] == "A" else "A") + t[6:],
        lambda t: t + "!",
        lambda t: "",
        lambda t: "x" * 101,
        lambda t: base64.urlsafe_b64encode(b"\x01" * 37).decode().rstrip("="),
    ],
)
def test_anything_not_signed_here_is_invalid_position(mangle: Callable[[str], str]) -> None:
    """Truncated, extended, altered, non-base64, over-long and made-up tokens are refused
    with INVALID_POSITION naming start_after."""
    tokens = WatchTokens(KEY)
    token = mangle(tokens.encode(Cursor(Position(5, 7), 1)))
    with pytest.raises(ServiceError) as refused:
        tokens.decode(token)
    assert refused.value.reason is Reason.INVALID_POSITION
    assert refused.value.field == "start_after"


def test_a_token_of_another_key_is_refused() -> None:
    """A position signed with another database's key does not decode here."""
    token = WatchTokens(b"k" * 32).encode(Cursor(Position(1, 1)))
    with pytest.raises(ServiceError):
        WatchTokens(KEY).decode(token)


def test_request_checks() -> None:
    """Up to 100 valid user ids; start_after or only_new, not both; an empty request starts
    from the oldest (no cursor)."""
    tokens = WatchTokens(KEY)
    assert check_request(ev.WatchRequest(), tokens) is None
    assert check_request(ev.WatchRequest(only_new=True, user_ids=["a"] * 100), tokens) is None
    token = tokens.encode(Cursor(Position(3, 3)))
    assert check_request(ev.WatchRequest(start_after=token), tokens) == Cursor(Position(3, 3))
    for request, reason in (
        (ev.WatchRequest(user_ids=["a"] * 101), Reason.TOO_MANY_ITEMS),
        (ev.WatchRequest(user_ids=["a", "x" * 33]), Reason.INVALID_USER_ID),
        (ev.WatchRequest(start_after=token, only_new=True), Reason.INVALID_POSITION),
    ):
        with pytest.raises(ServiceError) as refused:
            check_request(request, tokens)
        assert refused.value.reason is reason
