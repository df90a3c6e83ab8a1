"""follow.v1.WatchResponse written straight to protobuf's wire format, for the Watch stream's
hot path.

Building the message with the protobuf runtime cost ~5 us per event (an `events.add()` and
seven field writes through upb, then the serialisation); the fields of an event are few and
fixed, and most of them (kind, user id, event time) are the same for every event of one
outbox row. So a row's common fields are encoded once, and each event adds its id, other
user, mutual change and position token to them: the same bytes SerializeToString gives
(fields in number order, proto3 defaults left out), as the tests check against the
runtime's own encoding.

The wire format (protobuf encoding guide): a field is its key (field number << 3 | wire
type) as a varint, then a varint (type 0), or a varint length and that many bytes (type 2:
strings, embedded messages).
"""

from __future__ import annotations

from collections.abc import Iterable

_ONE_BYTE = [bytes((n,)) for n in range(0x80)]
_UINT64 = (1 << 64) - 1

# Keys: WatchResponse fields 1 (events), 2 (position), 3 (sent_time); Event fields 1 (id),
# 2 (kind), 3 (user_id), 4 (other_user_id), 5 (event_time), 6 (mutual_change),
# 7 (position); Timestamp fields 1 (seconds), 2 (nanos).
_RESPONSE_EVENT = b"\x0a"
_RESPONSE_POSITION = b"\x12"
_RESPONSE_SENT_TIME = b"\x1a"
_EVENT_ID = b"\x0a"
_EVENT_KIND = b"\x10"
_EVENT_USER = b"\x1a"
_EVENT_OTHER = b"\x22"
_EVENT_TIME = b"\x2a"
_EVENT_MUTUAL = (b"", b"\x30\x01", b"\x30\x02")  # MUTUAL_CHANGE_NONE is left out
_EVENT_POSITION = b"\x3a"
_SECONDS = b"\x08"
_NANOS = b"\x10"


def varint(value: int) -> bytes:
    """`value` as a protobuf varint (a negative int64 as its two's complement, 10 bytes)."""
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    value &= _UINT64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(key: bytes, value: bytes) -> bytes:
    """A string or embedded-message field: key, length, bytes."""
    return key + varint(len(value)) + value


def timestamp(seconds: int, nanos: int) -> bytes:
    """A google.protobuf.Timestamp's fields (zeros left out, as proto3 does)."""
    return (_SECONDS + varint(seconds) if seconds else b"") + (
        _NANOS + varint(nanos) if nanos else b""
    )


class RowEvents:
    """The encoder of one outbox row's events: its common fields encoded once."""

    __slots__ = ("_id_prefix", "_kind_user", "_time")

    def __init__(self, event_id_prefix: str, kind: int, user_id: str, at_us: int) -> None:
        seconds, micros = divmod(at_us, 1_000_000)
        self._id_prefix = event_id_prefix
        self._kind_user = (_EVENT_KIND + varint(kind) if kind else b"") + (
            length_delimited(_EVENT_USER, user_id.encode()) if user_id else b""
        )
        self._time = length_delimited(_EVENT_TIME, timestamp(seconds, micros * 1000))

    def add(
        self,
        out: list[bytes],
        indexes: Iterable[int],
        edges: Iterable[tuple[str, int]],
        positions: Iterable[bytes],
    ) -> None:
        """Append to `out` one WatchResponse.events field per event: the event numbered
        `index` (its id "<prefix><index>"), its (other user, mutual change) and position
        token (ASCII)."""
        prefix, kind_user, at = self._id_prefix, self._kind_user, self._time
        one_byte, mutuals, slow = _ONE_BYTE, _EVENT_MUTUAL, _event
        for index, (other, mutual), position in zip(indexes, edges, positions, strict=True):
            event_id = (prefix + str(index)).encode()
            other_bytes = other.encode()
            id_n, other_n, position_n = len(event_id), len(other_bytes), len(position)
            if id_n < 0x80 and other_n < 0x80 and position_n < 0x80:  # lengths of one byte
                event = b"".join(
                    (
                        _EVENT_ID,
                        one_byte[id_n],
                        event_id,
                        kind_user,
                        _EVENT_OTHER + one_byte[other_n] + other_bytes if other_n else b"",
                        at,
                        mutuals[mutual],
                        _EVENT_POSITION,
                        one_byte[position_n],
                        position,
                    )
                )
            else:
                event = slow(event_id, kind_user, other_bytes, at, mutual, position)
            n = len(event)
            out.append(_RESPONSE_EVENT + (one_byte[n] if n < 0x80 else varint(n)) + event)


def _event(
    event_id: bytes, kind_user: bytes, other: bytes, at: bytes, mutual: int, position: bytes
) -> bytes:
    """An Event's bytes, whatever the lengths of its fields (RowEvents.add's general case)."""
    return b"".join(
        (
            length_delimited(_EVENT_ID, event_id),
            kind_user,
            length_delimited(_EVENT_OTHER, other) if other else b"",
            at,
            _EVENT_MUTUAL[mutual],
            length_delimited(_EVENT_POSITION, position),
        )
    )


def response_tail(position: bytes, sent_seconds: int, sent_nanos: int) -> bytes:
    """A WatchResponse's fields after its events: its position and sent_time."""
    return length_delimited(_RESPONSE_POSITION, position) + length_delimited(
        _RESPONSE_SENT_TIME, timestamp(sent_seconds, sent_nanos)
    )
