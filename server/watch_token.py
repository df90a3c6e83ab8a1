"""Watch positions (follow.v1.EventService): where a stream stands, and its opaque token.

A position is an outbox row's (txid, id), the order server.outbox reads in, plus how many
of that row's per-edge events were delivered (a Follow of 3 users is one row and 3 events),
so a stream cut inside a row resumes with the next event of the same row. The token is
signed with a key derived from the key of the List page tokens (Store.cursor_key, one per
database, so every server process of a deployment accepts every other's tokens) under a
label of its own, so a page token is never taken for a position or the other way round; a
forged or altered one is refused instead of silently starting somewhere else.

Every Watch event carries its own position, so a token is made per event: the MAC is keyed
BLAKE2b (a MAC by design, 128-bit tag, a few times cheaper than HMAC-SHA256 in CPython),
and the events of one row share the hash state of their common prefix (`row_token_bytes`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from server.errors import Reason, ServiceError
from server.outbox import Position

# `done` of a cursor past every event of its row (the row's last event, a heartbeat).
COMPLETE = 2**32 - 1

_LABEL = b"follow.v1.EventService/Watch position\x00"
_VERSION = 2  # 1 (an unreleased draft) was HMAC-SHA256 over the same payload
_ROW = struct.Struct(">BQq")  # version, txid, row id
_DONE = struct.Struct(">I")  # events of the row delivered
_PAYLOAD = struct.Struct(">BQqI")  # the two together
_MAC_BYTES = 16
_URL_SAFE = bytes.maketrans(b"+/", b"-_")
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]{1,100}")


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    """A stream's place: every event before `position`'s row, and the first `done` events
    of that row (all of them when COMPLETE), have been delivered."""

    position: Position
    done: int = COMPLETE

    @property
    def complete(self) -> bool:
        return self.done == COMPLETE

    @property
    def read_from(self) -> Position:
        """The position to read rows after so that the rest of this cursor's row comes too."""
        if self.complete:
            return self.position
        return Position(self.position.txid, self.position.id - 1)


class WatchTokens:
    """Encode and check the position tokens of Watch."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the token key must be at least 16 bytes")
        # A key of positions' own (BLAKE2b takes at most 64 bytes; the page tokens' key is
        # used with HMAC, never as is here).
        self._key = hmac.digest(key, _LABEL, "sha256")

    def _mac(self, payload: bytes) -> bytes:
        return hashlib.blake2b(payload, key=self._key, digest_size=_MAC_BYTES).digest()

    def encode(self, cursor: Cursor) -> str:
        payload = _PAYLOAD.pack(_VERSION, cursor.position.txid, cursor.position.id, cursor.done)
        return _b64(payload + self._mac(payload))

    def row_token_bytes(self, position: Position, dones: Iterable[int]) -> list[bytes]:
        """The tokens of Cursor(position, done) for each of `dones`, as encode() makes them
        but as ASCII bytes (what the Watch message's encoder writes): the row's part is
        packed and hashed once."""
        row = _ROW.pack(_VERSION, position.txid, position.id)
        state = hashlib.blake2b(row, key=self._key, digest_size=_MAC_BYTES)
        tokens = []
        pack, b64, url_safe = _DONE.pack, binascii.b2a_base64, _URL_SAFE
        for done in dones:  # _b64 inlined: its call per event cost more than the encoding
            tail = pack(done)
            mac = state.copy()
            mac.update(tail)
            tokens.append(
                b64(row + tail + mac.digest(), newline=False).translate(url_safe).rstrip(b"=")
            )
        return tokens

    def decode(self, token: str) -> Cursor:
        """The cursor of a token this service issued; INVALID_POSITION for anything else."""

        def invalid(why: str) -> ServiceError:
            return ServiceError(
                Reason.INVALID_POSITION, f"not a position this service issued: {why}", "start_after"
            )

        # b64decode skips characters outside the alphabet, which would accept "<token>!".
        if not _TOKEN_CHARS.fullmatch(token):
            raise invalid("expected up to 100 characters of URL-safe base64")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise invalid("not URL-safe base64") from None
        if len(raw) != _PAYLOAD.size + _MAC_BYTES:
            raise invalid("wrong length")
        payload, mac = raw[: _PAYLOAD.size], raw[_PAYLOAD.size :]
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise invalid("altered, or signed by another deployment")
        version, txid, row_id, done = _PAYLOAD.unpack(payload)
        if version != _VERSION:
            raise invalid("unknown version")
        return Cursor(Position(txid, row_id), done)


def _b64(raw: bytes) -> str:
    """URL-safe base64 without padding (binascii directly: base64's wrapper costs more than
    the MAC)."""
    return binascii.b2a_base64(raw, newline=False).translate(_URL_SAFE).rstrip(b"=").decode()
