"""What clients were told: every acknowledged write, and the graph state it implies.

The fault tests and the soak compare the database against this after crashes, restarts and
outages. A write counts only once it is acknowledged (the call returned OK); a write that
failed or whose outcome is unknown (the server died, the database went away, the deadline
passed) may or may not have happened, so an edge whose most recent write is unknown is
left out of the comparison. Callers keep every edge's writes in one sequence (one client
task per group of users), so "most recent" is well defined.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import asyncpg

from server.outbox import OutboxRow, Position, horizon, read_after

Edge = tuple[str, str]  # (follower, followee)


@dataclass
class Ledger:
    """Acknowledged writes, to compare with the database after faults: nothing acknowledged
    may be lost."""

    # The state the last write of each edge left it in: True followed, False not,
    # None unknown (the last write's outcome is unknown).
    edges: dict[Edge, bool | None] = field(default_factory=dict)
    _by_user: dict[str, set[Edge]] = field(default_factory=dict)
    acknowledged: int = 0  # acknowledged write calls
    failures: Counter[str] = field(default_factory=Counter)  # failed calls by status code

    def _set(self, edge: Edge, state: bool | None) -> None:
        self.edges[edge] = state
        for user in edge:
            self._by_user.setdefault(user, set()).add(edge)

    def acknowledged_edges(self, states: Iterable[tuple[Edge, bool]]) -> None:
        """One acknowledged call that left each edge in the given state."""
        self.acknowledged += 1
        for edge, state in states:
            self._set(edge, state)

    def unknown_edges(self, edges: Iterable[Edge], code: str) -> None:
        """A failed write call: it may or may not have changed these edges."""
        self.failures[code] += 1
        for edge in edges:
            self._set(edge, None)

    def deleted_users(self, users: Iterable[str]) -> None:
        """An acknowledged account deletion: every edge of these users is gone."""
        self.acknowledged += 1
        for user in users:
            for edge in self._by_user.get(user, ()):
                self.edges[edge] = False

    def unknown_deletion(self, users: Iterable[str], code: str) -> None:
        self.failures[code] += 1
        for user in users:
            for edge in self._by_user.get(user, ()):
                self.edges[edge] = None

    def failed_read(self, code: str) -> None:
        self.failures[code] += 1

    def expected(self) -> dict[Edge, bool]:
        """Edges whose state is known from acknowledged writes."""
        return {e: s for e, s in self.edges.items() if s is not None}

    async def lost(self, conn: asyncpg.Connection) -> list[tuple[Edge, bool]]:
        """Acknowledged states the database does not hold: (edge, expected state). Both
        copies of an edge are compared; a copy missing is a loss."""
        expected = self.expected()
        followers = [e[0] for e in expected]
        followees = [e[1] for e in expected]
        rows = await conn.fetch(
            """SELECT e.a, e.b,
                      EXISTS (SELECT 1 FROM following f
                              WHERE f.user_id = e.a AND f.target_id = e.b) AS following,
                      EXISTS (SELECT 1 FROM followers r
                              WHERE r.user_id = e.b AND r.follower_id = e.a) AS follower
               FROM unnest($1::text[], $2::text[]) AS e(a, b)""",
            followers,
            followees,
        )
        lost = []
        for r in rows:
            edge = (r["a"], r["b"])
            state = expected[edge]
            if r["following"] != state or r["follower"] != state:
                lost.append((edge, state))
        return lost


# -- change events (the outbox, server.outbox) ---------------------------------------------


@dataclass(frozen=True)
class EventRow:
    """One outbox row as a consumer sees it: the acting user's call, its kind, the other
    users in the row's order and those whose mutual state changed."""

    id: int
    user_id: str
    kind: int
    others: tuple[str, ...]
    mutual: frozenset[str]


@dataclass(frozen=True)
class WriteCall:
    """What one write call of a user may have left in the outbox: `required`, an
    acknowledged call that changed something (its row must be there); `possible`, whether a
    row may be there at all (False: acknowledged and changed nothing, or refused). A row
    lists only `targets`, in their order (unfollows: in any order), every one of `include`
    and none of `exclude`; its mutual set holds those of `mutual_yes` it lists and none of
    `mutual_no`."""

    kind: int
    required: bool
    possible: bool
    targets: tuple[str, ...] = ()
    include: frozenset[str] = frozenset()
    exclude: frozenset[str] = frozenset()
    mutual_yes: frozenset[str] = frozenset()
    mutual_no: frozenset[str] = frozenset()
    ordered: bool = True

    def explains(self, row: EventRow) -> bool:
        if not self.possible or row.kind != self.kind:
            return False
        others = row.others
        if self.kind == 3:  # an account deletion lists nobody
            return not others and not row.mutual
        if not others or len(set(others)) != len(others) or not set(others) <= set(self.targets):
            return False
        if self.ordered:
            place = {t: i for i, t in reversed(list(enumerate(self.targets)))}
            if [place[o] for o in others] != sorted(place[o] for o in others):
                return False
        listed = set(others)
        return (
            self.include <= listed
            and not listed & self.exclude
            and row.mutual <= listed
            and (self.mutual_yes & listed) <= row.mutual
            and not row.mutual & self.mutual_no
        )


def explain(calls: list[WriteCall], rows: list[EventRow]) -> int | None:
    """Whether one user's rows, in the order received, are exactly what its calls, in the
    order made, left: each required call has its row, each row is some possible call's, in
    order. None if so; else how many rows could be explained before it went wrong (the
    first unexplained row, or len(rows) when a required call has none)."""
    reach = {0}  # how many rows the calls so far can have written, all ways
    best = 0
    for call in calls:
        after: set[int] = set()
        for j in reach:
            if not call.required:
                after.add(j)
            if j < len(rows) and call.explains(rows[j]):
                after.add(j + 1)
        if not after:
            return best
        reach = after
        best = max(best, max(reach))
    return None if len(rows) in reach else best


async def rows_since(
    conn: asyncpg.Connection, after: Position, distributed: bool, within: float = 10.0
) -> list[OutboxRow]:
    """Every outbox row after `after` written by a transaction that ended before this call:
    waits (up to `within` seconds) for the visibility horizon to pass every transaction
    id handed out so far, then reads below it. With no other writer that is each call
    acknowledged so far; a background transaction (the deletion cleanup) only delays it."""
    xmax = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
    target: int = await conn.fetchval(xmax)
    deadline = time.monotonic() + within
    while (below := await horizon(conn, distributed)) < target:
        if time.monotonic() > deadline:
            raise AssertionError(f"the outbox horizon stayed at {below} below {target}")
        await asyncio.sleep(0.005)
    return await read_after(conn, after, below, 100_000)
