"""What clients were told: every acknowledged write, and the graph state it implies.

The fault tests and the soak compare the database against this after crashes, restarts and
outages. A write counts only once it is acknowledged (the call returned OK); a write that
failed or whose outcome is unknown (the server died, the database went away, the deadline
passed) may or may not have happened, so an edge whose most recent write is unknown is
left out of the comparison. Callers keep every edge's writes in one sequence (one client
task per group of users), so "most recent" is well defined.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import asyncpg

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
