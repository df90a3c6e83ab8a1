"""Opaque page tokens: a keyset position, bound to one (owner, list) by an HMAC.

A token carries the last entry's time (microseconds since the epoch) and user id. The MAC
covers the owner and list type too, so a token from another user's or list's paging, or
one with a single bit changed, is refused instead of silently paging somewhere else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
from dataclasses import dataclass

from server.errors import Reason, ServiceError
from server.rules import user_id_problem

_VERSION = 1
_HEADER = struct.Struct(">Bq")
_MAC_BYTES = 16
_MAX_TOKEN_CHARS = 200
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class Position:
    """Where the previous page ended: the last entry's time and id."""

    at_us: int
    user_id: str


class CursorCodec:
    """Page tokens: opaque, URL-safe, HMAC-bound to (owner, list type) so a forged or reused one
    is refused."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("cursor key must be at least 16 bytes")
        self._key = key

    def _mac(self, owner: str, list_type: int, payload: bytes) -> bytes:
        owner_bytes = owner.encode()
        message = struct.pack(">HB", len(owner_bytes), list_type) + owner_bytes + payload
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, owner: str, list_type: int, position: Position) -> str:
        payload = _HEADER.pack(_VERSION, position.at_us) + position.user_id.encode()
        raw = payload + self._mac(owner, list_type, payload)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def decode(self, token: str, owner: str, list_type: int) -> Position:
        def invalid(why: str) -> ServiceError:
            return ServiceError(
                Reason.INVALID_PAGE_TOKEN, f"page token is invalid: {why}", "page_token"
            )

        if len(token) > _MAX_TOKEN_CHARS:
            raise invalid("too long")
        # b64decode skips characters outside the alphabet, which would accept "<token>!".
        if not _TOKEN_CHARS.fullmatch(token):
            raise invalid("not URL-safe base64")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise invalid("not URL-safe base64") from None
        if len(raw) < _HEADER.size + 1 + _MAC_BYTES:
            raise invalid("too short")
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(owner, list_type, payload)):
            raise invalid("altered, or issued for another user or list")
        version, at_us = _HEADER.unpack_from(payload)
        if version != _VERSION:
            raise invalid("unknown version")
        try:
            user_id = payload[_HEADER.size :].decode()
        except UnicodeDecodeError:
            raise invalid("bad user id") from None
        if user_id_problem(user_id) is not None:
            raise invalid("bad user id")
        return Position(at_us, user_id)
