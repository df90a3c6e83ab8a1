"""server.watch_wire through EventServicer.response: the WatchResponse bytes written by hand
are the bytes the protobuf runtime makes of the same message (built here field by field, as
the servicer did before), for every kind of event, mutual change, slice of a row and
timestamp."""

from __future__ import annotations

import time
from typing import cast

from hypothesis import given, settings
from hypothesis import strategies as st

from follow.v1 import events_pb2 as ev
from server.outbox import ACCOUNT_DELETED, FOLLOWED, UNFOLLOWED, OutboxRow, Position
from server.watch_hub import Batch, Slice, WatchHub, edges, event_count
from server.watch_servicer import EventServicer
from server.watch_token import COMPLETE, Cursor, WatchTokens
from server.watch_wire import timestamp, varint

TOKENS = WatchTokens(b"k" * 32)


def reference(batch: Batch, sent_time_ns: int) -> ev.WatchResponse:
    """The message as the protobuf runtime builds it."""
    message = ev.WatchResponse(position=TOKENS.encode(batch.cursor))
    seconds, rest = divmod(sent_time_ns // 1000, 1_000_000)
    message.sent_time.seconds = seconds
    message.sent_time.nanos = rest * 1000
    for part in batch.slices:
        row = part.row
        last = event_count(row)
        for index in range(part.start, part.end):
            other, mutual = edges(row)[index]
            event = message.events.add()
            event.id = f"{row.id}.{index}"
            event.kind = row.kind  # type: ignore[assignment]
            event.user_id = row.user_id
            if other:
                event.other_user_id = other
            if mutual:
                event.mutual_change = mutual  # type: ignore[assignment]
            seconds, micros = divmod(row.at_us, 1_000_000)
            event.event_time.seconds = seconds
            event.event_time.nanos = micros * 1000
            done = COMPLETE if index + 1 == last else index + 1
            event.position = TOKENS.encode(Cursor(row.position, done))
    return message


def sent_at(raw: bytes) -> int:
    """The sent_time the encoder wrote, in ns (the clock moves between two encodings)."""
    t = ev.WatchResponse.FromString(raw).sent_time
    return t.seconds * 1_000_000_000 + t.nanos


def encoded(batch: Batch) -> bytes:
    return EventServicer(cast(WatchHub, None), TOKENS).response(batch)


# up to 140 characters (up to 560 bytes): lengths of one varint byte and of several
user_ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=140)
rows = st.builds(
    lambda user, row_id, txid, kind, others, mutual_mask, at_us: OutboxRow(
        user_id=user,
        id=row_id,
        txid=txid,
        kind=kind,
        others=() if kind == ACCOUNT_DELETED else tuple(others),
        mutual=frozenset(o for o, m in zip(others, mutual_mask, strict=False) if m),
        at_us=at_us,
        client_ip="",
        platform="",
    ),
    user_ids,
    st.integers(1, 2**63 - 1),
    st.integers(3, 2**62),
    st.sampled_from([FOLLOWED, UNFOLLOWED, ACCOUNT_DELETED]),
    st.lists(user_ids, min_size=1, max_size=30, unique=True),
    st.lists(st.booleans(), max_size=30),
    st.integers(-(2**40), 2**53),
)


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    slices = []
    for row in draw(st.lists(rows, max_size=5)):
        n = event_count(row)
        start = draw(st.integers(0, n - 1))
        end = draw(st.integers(start + 1, n))
        slices.append(Slice(row, start, end))
    done = draw(st.sampled_from([COMPLETE, 0, 7]))
    cursor = Cursor(Position(draw(st.integers(0, 2**62)), draw(st.integers(0, 2**63 - 1))), done)
    return Batch(tuple(slices), cursor)


@settings(max_examples=300, deadline=None)
@given(batches())
def test_the_hand_written_bytes_are_the_runtimes_serialisation(batch: Batch) -> None:
    """Every batch (heartbeats, account deletions, mutual changes, partial rows, timestamps
    before 1970, long and non-ASCII user ids) encodes to exactly the bytes the protobuf
    runtime serialises for the same message."""
    raw = encoded(batch)
    assert raw == reference(batch, sent_at(raw)).SerializeToString()


def test_a_heartbeat_is_a_position_and_a_sent_time() -> None:
    """A batch without events is a message with no event, the cursor's token as its
    position and the current time as sent_time."""
    cursor = Cursor(Position(10, 20))
    before = time.time_ns()
    message = ev.WatchResponse.FromString(encoded(Batch((), cursor)))
    assert not message.events
    assert TOKENS.decode(message.position) == cursor
    assert before // 1000 <= message.sent_time.ToMicroseconds() <= time.time_ns() // 1000


def test_varints_and_timestamps_follow_the_wire_format() -> None:
    """Varints of one and several bytes, negative int64s as ten bytes; a zero timestamp
    field is left out."""
    assert varint(0) == b"\x00"
    assert varint(127) == b"\x7f"
    assert varint(300) == b"\xac\x02"
    assert varint(-1) == b"\xff" * 9 + b"\x01"
    assert timestamp(0, 0) == b""
    assert timestamp(1, 0) == b"\x08\x01"
    assert timestamp(0, 5) == b"\x10\x05"
