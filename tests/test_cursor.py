"""server.cursor: page tokens are opaque, URL-safe, bound to (owner, list) and validated."""

from __future__ import annotations

import base64
import re

import pytest

from server.cursor import CursorCodec, Position
from server.errors import Reason, ServiceError

KEY = b"k" * 32


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def _refused(codec: CursorCodec, token: str, owner: str = "alice", list_type: int = 1) -> str:
    with pytest.raises(ServiceError) as caught:
        codec.decode(token, owner, list_type)
    assert caught.value.reason is Reason.INVALID_PAGE_TOKEN
    assert caught.value.field == "page_token"
    return caught.value.message


@pytest.mark.parametrize(
    "position",
    [
        Position(0, "a"),
        Position(1_702_262_118_123_456, "UserID_002"),
        Position(-1, "x" * 32),  # before the epoch
        Position(2**62, "é用😀"),
    ],
)
def test_round_trip(position: Position) -> None:
    """What encode writes, decode reads back exactly, for the same owner and list."""
    codec = CursorCodec(KEY)
    token = codec.encode("alice", 2, position)
    assert codec.decode(token, "alice", 2) == position


def test_token_is_url_safe_and_opaque() -> None:
    """Tokens use only URL-safe characters, no padding, and do not show the user id."""
    token = CursorCodec(KEY).encode("alice", 1, Position(123, "bob_the_user"))
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert "bob_the_user" not in token


def test_bound_to_owner() -> None:
    """A token issued for one user's list is refused for another user's."""
    codec = CursorCodec(KEY)
    token = codec.encode("alice", 1, Position(5, "b"))
    assert "another user or list" in _refused(codec, token, owner="alicf")


@pytest.mark.parametrize("other_type", [2, 3])
def test_bound_to_list_type(other_type: int) -> None:
    """A token from the fans list cannot page the following or mutual list."""
    codec = CursorCodec(KEY)
    token = codec.encode("alice", 1, Position(5, "b"))
    _refused(codec, token, list_type=other_type)


def test_owner_and_type_do_not_alias() -> None:
    """Owner and list type are framed in the MAC, so no (owner, type) pair can pass for
    another (e.g. owner "a" with type 1 against owner "a\\x01")."""
    codec = CursorCodec(KEY)
    token = codec.encode("ab", 1, Position(5, "b"))
    _refused(codec, token, owner="a", list_type=1)
    _refused(codec, token, owner="abc", list_type=1)


def test_other_key_refuses() -> None:
    """A token minted with another database's key (another deployment) is refused."""
    token = CursorCodec(b"x" * 32).encode("alice", 1, Position(5, "b"))
    _refused(CursorCodec(KEY), token)


def test_every_bit_is_covered() -> None:
    """Flipping any single bit of a token's bytes is detected: nothing in it is unsigned."""
    codec = CursorCodec(KEY)
    raw = _unb64(codec.encode("alice", 1, Position(1_700_000_000_000_000, "bob")))
    for index in range(len(raw)):
        for bit in range(8):
            altered = bytearray(raw)
            altered[index] ^= 1 << bit
            _refused(codec, _b64(bytes(altered)))


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("!!!!", "base64"),
        ("a", "base64"),
        ("", "too short"),
        ("AAAA", "too short"),
        ("A" * 201, "too long"),
        (_b64(b"\x00" * 40), "altered"),
    ],
)
def test_garbage_is_refused(token: str, why: str) -> None:
    """Malformed, truncated and overlong tokens are INVALID_PAGE_TOKEN with a reason, never
    an exception of another type."""
    assert why in _refused(CursorCodec(KEY), token)


def test_unknown_version_is_refused_even_when_signed() -> None:
    """A correctly signed token of an unknown format version is refused, so a future
    format can never be misread by this one."""
    codec = CursorCodec(KEY)
    payload = bytes([2]) + (5).to_bytes(8, "big") + b"bob"
    token = _b64(payload + codec._mac("alice", 1, payload))
    assert "version" in _refused(codec, token)


@pytest.mark.parametrize("user_id", [b"\xff\xfe", b"", b"a\x00"])
def test_signed_token_with_a_bad_user_id_is_refused(user_id: bytes) -> None:
    """Even a validly signed payload must carry a valid user id to be used in a query."""
    codec = CursorCodec(KEY)
    payload = bytes([1]) + (5).to_bytes(8, "big") + user_id
    token = _b64(payload + codec._mac("alice", 1, payload))
    assert "user id" in _refused(codec, token) or "too short" in _refused(codec, token)


def test_key_must_be_long_enough() -> None:
    """A short key would make tokens forgeable; the codec refuses it."""
    with pytest.raises(ValueError, match="at least 16 bytes"):
        CursorCodec(b"short")


@pytest.mark.parametrize("extra", ["!", ".", "=", " ", "+", "/", "%3D", "\n"])
def test_characters_outside_the_alphabet_are_refused(extra: str) -> None:
    """A valid token with a stray character (padding, standard-base64 `+`/`/`, URL
    escapes, whitespace) is malformed and refused, not decoded as if it were absent."""
    codec = CursorCodec(KEY)
    token = codec.encode("alice", 1, Position(5, "bob"))
    assert codec.decode(token, "alice", 1) == Position(5, "bob")
    _refused(codec, token + extra)
    _refused(codec, token[:3] + extra + token[3:])
