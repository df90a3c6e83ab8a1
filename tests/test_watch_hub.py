"""server.watch_hub's cutting of rows' events into messages (Batches), in process: the
stream's order, the bound per message, and each message's cursor (where a client that kept
it resumes). The hub's tailer, ring and streams run against a real server in
tests/test_watch.py."""

from __future__ import annotations

from server.outbox import ACCOUNT_DELETED, FOLLOWED, UNFOLLOWED, OutboxRow, Position
from server.watch_hub import (
    BECAME_MUTUAL,
    MUTUAL_NONE,
    STOPPED_BEING_MUTUAL,
    Batch,
    batches,
    edges,
    event_count,
)
from server.watch_token import COMPLETE, Cursor


def row(row_id: int, kind: int, *others: str, mutual: tuple[str, ...] = ()) -> OutboxRow:
    return OutboxRow("a", row_id, 100 + row_id, kind, others, frozenset(mutual), 0, "", "")


def flat(got: list[Batch]) -> list[tuple[int, int]]:
    """(row id, event index) of every event, in order."""
    return [(s.row.id, i) for b in got for s in b.slices for i in range(s.start, s.end)]


def test_a_rows_events_and_their_mutual_changes() -> None:
    """One event per other user of a follow or unfollow (with BECAME / STOPPED_BEING_MUTUAL
    for the pairs the row names), one for an account deletion."""
    follow = row(1, FOLLOWED, "b", "c", mutual=("c",))
    unfollow = row(2, UNFOLLOWED, "b", "c", mutual=("b",))
    deleted = row(3, ACCOUNT_DELETED)
    assert [event_count(r) for r in (follow, unfollow, deleted)] == [2, 2, 1]
    assert edges(follow) == [("b", MUTUAL_NONE), ("c", BECAME_MUTUAL)]
    assert edges(unfollow) == [("b", STOPPED_BEING_MUTUAL), ("c", MUTUAL_NONE)]
    assert edges(deleted) == [("", MUTUAL_NONE)]


def test_rows_are_cut_at_the_bound_in_order_with_each_messages_cursor() -> None:
    """Rows of 3, 4 and 1 events, the first row's first event skipped, at most 3 per message:
    7 events in messages of 3, 3 and 1, in order; each message's cursor is after its last
    event (inside a row when the row goes on in the next message), the last one's the given
    end when that is further on."""
    rows = [row(1, FOLLOWED, "b", "c", "d"), row(2, FOLLOWED, "b", "c", "d", "e")]
    rows.append(row(3, ACCOUNT_DELETED))
    end = Cursor(Position(500, 7))
    got = list(batches([(rows[0], 1), (rows[1], 0), (rows[2], 0)], 3, end))
    assert flat(got) == [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (2, 3), (3, 0)]
    assert [sum(s.end - s.start for s in b.slices) for b in got] == [3, 3, 1]
    assert [b.cursor for b in got] == [
        Cursor(rows[1].position, 1),
        Cursor(rows[1].position, COMPLETE),
        end,
    ]


def test_the_last_message_keeps_its_own_cursor_when_the_end_is_behind_it() -> None:
    """A message ending at a row past `end` (a stream's old place) ends at that row; no rows,
    no message."""
    r = row(4, UNFOLLOWED, "b")
    (only,) = batches([(r, 0)], 500, Cursor(Position(1, 1)))
    assert only.cursor == Cursor(r.position)
    assert list(batches([], 500, Cursor(Position(1, 1)))) == []
