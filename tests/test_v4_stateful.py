"""A hypothesis state machine drives the shim over real HTTP (real service, real
PostgreSQL) with imports, follows, unfollows and deletes, and after every step compares
follow_check, follow_get_info and follow_get with an in-memory model of the spec's rules,
and the outbox rows each call committed with the change event the model says it makes."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from server.outbox import ACCOUNT_DELETED, FOLLOWED, START, UNFOLLOWED, is_distributed
from tests.support.ledger import rows_since
from tests.support.threaded import ServiceInThread
from tests.v4_helpers import SyncClient

pytest_plugins = ["tests.v4_fixtures"]

NAMES = ("a", "b", "c", "d")
_machines = itertools.count()
USER = st.integers(0, len(NAMES) - 1)
TARGETS = st.lists(st.integers(0, len(NAMES) - 1), min_size=1, max_size=4)


@dataclass
class Model:
    """Accounts and edges; a logical clock ticks once per follow_add call, so targets of
    one call share a time and ties are ordered by user id, descending."""

    accounts: set[str] = field(default_factory=set)
    edges: dict[tuple[str, str], int] = field(default_factory=dict)
    clock: int = 0

    def relation(self, user: str, other: str) -> int:
        return (2 if (user, other) in self.edges else 0) | (1 if (other, user) in self.edges else 0)

    def listing(self, user: str, follow_type: int) -> list[str]:
        following = {b: t for (a, b), t in self.edges.items() if a == user}
        fans = {a: t for (a, b), t in self.edges.items() if b == user}
        entries = {
            1: fans,
            2: following,
            3: {b: max(t, fans[b]) for b, t in following.items() if b in fans},
        }[follow_type]
        ordered = sorted(entries.items(), key=lambda e: (e[1], e[0].encode()), reverse=True)
        return [user_id for user_id, _ in ordered]


class ShimMachine(RuleBasedStateMachine):
    """The model test driven through the v4 shim over HTTP."""

    service: ServiceInThread  # set by the test: the service and shim
    distributed = False
    position = START  # the outbox read so far, across examples (they run one by one)

    def __init__(self) -> None:
        super().__init__()
        prefix = f"s{next(_machines)}_"
        self.users = [prefix + n for n in NAMES]
        self.client = SyncClient(self.service.http_port)
        self.model = Model()

    def _events(self, expected: list[tuple[str, int, tuple[str, ...], frozenset[str]]]) -> None:
        """The outbox rows committed since the last check are exactly `expected` (user,
        kind, others, mutual; an unfollow's others by id), all from the v4 door: the row of
        the call just made, if it changed anything, and nothing else."""
        cls = type(self)
        rows = self.service.run(rows_since(self.service.conn, cls.position, cls.distributed))
        got = [
            (r.user_id, r.kind, tuple(sorted(r.others)) if r.kind == UNFOLLOWED else r.others,
             r.mutual)
            for r in rows
        ]  # fmt: skip
        if rows:  # first: a failing example is run again, and must fail the same way
            cls.position = rows[-1].position
        assert got == expected, "the call's change events"
        assert {r.platform for r in rows} <= {"RESTAPI"}

    def teardown(self) -> None:
        self.client.close()

    @rule(i=USER)
    def import_account(self, i: int) -> None:
        result = self.client.post("account_import", {"UserID": self.users[i]})
        assert result["ActionStatus"] == "OK", result
        self.model.accounts.add(self.users[i])
        self._events([])

    @rule(
        i=USER,
        to=TARGETS,
    )
    def follow(self, i: int, to: list[int]) -> None:
        user, m = self.users[i], self.model
        ids = [self.users[t] for t in to]
        result = self.client.post(
            "follow_add", {"From_Account": user, "FollowItem": [{"To_Account": t} for t in ids]}
        )
        if user not in m.accounts:
            assert result["ErrorCode"] == 30003, result
            self._events([])
            return
        m.clock += 1
        expected = []
        new: list[str] = []  # the targets really followed, in request order
        for t in ids:
            if t == user:
                expected.append(30001)
            elif t not in m.accounts:
                expected.append(30003)
            else:
                expected.append(0)
                if (user, t) not in m.edges:
                    new.append(t)
                m.edges.setdefault((user, t), m.clock)
        assert [r["ResultCode"] for r in result["ResultItem"]] == expected, result
        mutual = frozenset(t for t in new if (t, user) in m.edges)
        self._events([(user, FOLLOWED, tuple(new), mutual)] if new else [])

    @rule(
        i=USER,
        to=TARGETS,
    )
    def unfollow(self, i: int, to: list[int]) -> None:
        user, m = self.users[i], self.model
        ids = [self.users[t] for t in to]
        result = self.client.post("follow_delete", {"From_Account": user, "To_Account": ids})
        if user not in m.accounts:
            assert result["ErrorCode"] == 30003, result
            self._events([])
            return
        expected = [30001 if t == user else 0 for t in ids]
        assert [r["ResultCode"] for r in result["ResultItem"]] == expected, result
        gone = sorted({t for t in ids if (user, t) in m.edges})
        mutual = frozenset(t for t in gone if (t, user) in m.edges)
        for t in ids:
            m.edges.pop((user, t), None)
        self._events([(user, UNFOLLOWED, tuple(gone), mutual)] if gone else [])

    @rule(i=USER)
    def delete_account(self, i: int) -> None:
        user = self.users[i]
        result = self.client.post("account_delete", {"DeleteItem": [{"UserID": user}]})
        assert result["ResultItem"][0]["ResultCode"] == 0, result
        existed = user in self.model.accounts
        self._events([(user, ACCOUNT_DELETED, (), frozenset())] if existed else [])
        self.model.accounts.discard(user)
        self.model.edges = {e: t for e, t in self.model.edges.items() if user not in e}

    @invariant()
    def agrees_with_model(self) -> None:
        m = self.model
        status = self.client.post(
            "account_check", {"CheckItem": [{"UserID": u} for u in self.users]}
        )
        assert [r["AccountStatus"] == "Imported" for r in status["ResultItem"]] == [
            u in m.accounts for u in self.users
        ]
        for user in sorted(m.accounts):
            check = self.client.post(
                "follow_check", {"From_Account": user, "To_Account": self.users}
            )
            assert [r["FollowType"] for r in check["ResultItem"]] == [
                m.relation(user, u) for u in self.users
            ], check
            info = self.client.post("follow_get_info", {"From_Account": user, "To_Account": [user]})
            (counts,) = info["FollowInfo"]
            lists = {t: m.listing(user, t) for t in (1, 2, 3)}
            assert counts["FollowerCount"] == len(lists[1])
            assert counts["FollowingCount"] == len(lists[2])
            assert counts["MutualFollowingCount"] == len(lists[3])
            for follow_type, expected in lists.items():
                page = self.client.post(
                    "follow_get", {"From_Account": user, "FollowType": follow_type, "WantNum": 10}
                )
                assert [e["To_Account"] for e in page["FollowItem"]] == expected, (
                    follow_type,
                    page,
                )
                assert page["NextCursor"] == ""


def test_shim_agrees_with_model(threaded_shim: ServiceInThread) -> None:
    """Random sequences of v4 calls keep check, counts and lists equal to the model, and
    each call leaves exactly its change event (follow_add: the targets really followed in
    request order and those that became mutual; follow_delete: the edges removed and those
    no longer mutual; account_delete: one for an account that existed), platform RESTAPI,
    and a call that changed nothing or failed leaves none."""

    class Bound(ShimMachine):
        service = threaded_shim
        distributed = threaded_shim.run(is_distributed(threaded_shim.conn))

    run_state_machine_as_test(
        Bound,
        settings=settings(
            max_examples=20,
            stateful_step_count=10,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
