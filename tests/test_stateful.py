"""A hypothesis state machine drives the real service (a real gRPC server on 127.0.0.1 over
the real PostgreSQL) with random imports, follows, unfollows and deletes, and after every
step compares what the service says with an in-memory model of the rules.

Every call is also checked against the change events it must leave (issue 9): after each
step the outbox rows committed since the last step are exactly the step's (one row per call
that changed something, nothing for a call that changed nothing or failed), and at the end of
each example one Watch stream, open since the start, has delivered the example's rows as
per-edge events, in order.

Hypothesis is synchronous, so the server runs on its own asyncio loop in a background thread
and the machine calls it through ordinary blocking stubs. One server and one database serve
every example; each example starts from empty tables (the outbox is read on from where the
last example left it).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from follow.v1 import events_pb2 as ev
from follow.v1 import events_pb2_grpc as ev_grpc
from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from server.config import Settings
from server.database import Database
from server.outbox import ACCOUNT_DELETED, FOLLOWED, START, UNFOLLOWED, OutboxRow, is_distributed
from tests.conftest import CITUS, create_database, drop_database
from tests.invariants import assert_sound
from tests.support.ledger import rows_since
from tests.support.threaded import ServiceInThread

T = TypeVar("T")

CAP = 3  # small, so random follows keep running into the following limit
USERS = tuple(f"u{i}" for i in range(7))
GHOST = "ghost"  # valid, never imported
BAD = "x" * 33  # not a valid user id
TIMEOUT = 10.0  # seconds, per call
# On Citus (make test-citus) each step's invariant scan re-keys the edge tables into two new
# distributed tables and each example truncates distributed tables, seconds each: fewer
# examples keep the run in bounds, each still checked in full after every step.
EXAMPLES = 4 if CITUS else 20
_databases = itertools.count()


class WatchTail:
    """One Watch stream from the oldest event, read by a thread into a queue for the whole
    module: what arrives between two examples' ends is the later example's events."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.events: queue.Queue[ev.Event | BaseException] = queue.Queue()
        self._call: Any = ev_grpc.EventServiceStub(channel).Watch(ev.WatchRequest())
        self._thread = threading.Thread(target=self._read, name="watch-tail", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for message in self._call:
                for event in message.events:  # none: a heartbeat
                    self.events.put(event)
        except BaseException as exc:  # the end (cancelled at teardown) or a failure
            self.events.put(exc)

    def take(self, n: int) -> list[ev.Event]:
        taken: list[ev.Event] = []
        for _ in range(n):
            try:
                item = self.events.get(timeout=WATCH_WAIT)
            except queue.Empty:
                raise AssertionError(f"Watch delivered {len(taken)} of {n} events") from None
            if isinstance(item, BaseException):
                raise AssertionError(f"Watch ended after {len(taken)} of {n} events") from item
            taken.append(item)
        return taken

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(10)


WATCH_WAIT = 15.0  # seconds for each event on the stream (the tailer polls every 0.1 s)


@dataclass
class Served:
    """The service under test and stubs to it; where the outbox has been read up to."""

    service: ServiceInThread
    follow: pb_grpc.FollowServiceStub
    accounts: pb_grpc.AccountServiceStub
    watch: WatchTail
    distributed: bool
    position: Any = START  # server.outbox.Position after the last row checked


@pytest.fixture(scope="module")
def served(pg_cluster: Database) -> Iterator[Served]:
    """One database (from the migrated template) and one server, with blocking stubs and a
    Watch stream open from the start."""
    name = f"stateful_{next(_databases)}"

    url = asyncio.run(create_database(pg_cluster, name))
    service = ServiceInThread(url, Settings(grpc_listen="127.0.0.1:0", max_following=CAP))
    try:
        port = service.start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = WatchTail(channel)
            try:
                yield Served(
                    service,
                    pb_grpc.FollowServiceStub(channel),
                    pb_grpc.AccountServiceStub(channel),
                    watch,
                    service.run(is_distributed(service.conn)),
                )
            finally:
                watch.close()
    finally:
        service.close()
        asyncio.run(drop_database(pg_cluster, name))


# -- the model -----------------------------------------------------------------------------


@dataclass
class Account:
    """The model's view of one account's profile."""

    nick: str
    profile_sequence: int = 0


@dataclass
class Model:
    """The rules of issue 2 over plain sets. Time is a logical clock: one tick per call, so
    everything one call writes shares an instant, and later calls are later."""

    accounts: dict[str, Account] = field(default_factory=dict)
    edges: dict[tuple[str, str], int] = field(default_factory=dict)  # (fan, followed) -> tick
    clock: int = 0

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def following(self, user: str) -> dict[str, int]:
        return {b: t for (a, b), t in self.edges.items() if a == user}

    def fans(self, user: str) -> dict[str, int]:
        return {a: t for (a, b), t in self.edges.items() if b == user}

    def mutual(self, user: str) -> dict[str, int]:
        """Mutual since the later of the two follows."""
        fans = self.fans(user)
        return {b: max(t, fans[b]) for b, t in self.following(user).items() if b in fans}

    def relation(self, user: str, other: str) -> int:
        return (pb.FOLLOW_TYPE_FOLLOWING if (user, other) in self.edges else 0) | (
            pb.FOLLOW_TYPE_FAN if (other, user) in self.edges else 0
        )


def newest_first(entries: dict[str, int]) -> list[tuple[str, int]]:
    """The order the lists promise: time descending, equal times by user id descending."""
    return sorted(entries.items(), key=lambda e: (e[1], e[0].encode()), reverse=True)


def micros(entry: pb.ListEntry | ev.Event) -> int:
    stamp = entry.follow_time if isinstance(entry, pb.ListEntry) else entry.event_time
    return stamp.seconds * 1_000_000 + stamp.nanos // 1000


Change = tuple[str, int, tuple[str, ...], frozenset[str]]  # user, kind, others, mutual


def change(row: OutboxRow) -> Change:
    """A row as the model predicts it. An unfollow's others are compared as a set: the store
    lists them by id, not in request order."""
    others = tuple(sorted(row.others)) if row.kind == UNFOLLOWED else row.others
    return (row.user_id, row.kind, others, row.mutual)


def edge_events(rows: list[OutboxRow]) -> list[tuple[str, int, str, str, int, int]]:
    """The Watch events the rows make: one per other user of a follow or unfollow, in the
    row's order (ids <row id>.<index>), one per deleted account; (id, kind, user, other,
    mutual change, time in µs)."""
    events = []
    for row in rows:
        if row.kind == ACCOUNT_DELETED:
            events.append((f"{row.id}.0", row.kind, row.user_id, "", 0, row.at_us))
            continue
        flag = (
            ev.MUTUAL_CHANGE_BECAME_MUTUAL
            if row.kind == FOLLOWED
            else ev.MUTUAL_CHANGE_STOPPED_BEING_MUTUAL
        )
        for i, other in enumerate(row.others):
            mutual = flag if other in row.mutual else 0
            events.append((f"{row.id}.{i}", row.kind, row.user_id, other, mutual, row.at_us))
    return events


# -- the machine ---------------------------------------------------------------------------

nicks = st.one_of(st.none(), st.sampled_from(("ann", "bob")))
actors = st.sampled_from((*USERS, GHOST))


def imports(
    min_size: int, max_size: int, with_bad: bool = False
) -> st.SearchStrategy[list[tuple[str, str | None]]]:
    """Accounts to import, each with or without a nick; `with_bad` mixes in a malformed id."""
    ids = st.sampled_from((*USERS, BAD) if with_bad else USERS)
    return st.lists(
        st.tuples(ids, nicks), min_size=min_size, max_size=max_size, unique_by=lambda a: a[0]
    )


targets = st.lists(st.sampled_from((*USERS, GHOST, BAD)), min_size=1, max_size=5)


class FollowMachine(RuleBasedStateMachine):
    """Random follows, unfollows, imports and deletes, checked against an in-memory model
    after every step."""

    def __init__(self, served: Served) -> None:
        super().__init__()
        self.served = served
        self.follow_stub = served.follow
        self.account_stub = served.accounts
        self.model = Model()
        self.steps = 0
        self.touched: list[str] = []  # users the last step changed, the most affected first
        self.rows: list[OutboxRow] = []  # this example's outbox rows, checked
        served.service.run(
            served.service.conn.execute(
                "TRUNCATE accounts, follow_counts, follow_count_deltas, following, followers"
            )
        )

    def _few_users(self) -> list[str]:
        """The user the last step touched most (the actor), plus one more in turn: every user
        is still looked at every few steps, and all of them at the end (teardown). Counts and
        the stored invariants are checked for everyone after every step."""
        touched = [u for u in self.touched if u in USERS][:1]
        return list(dict.fromkeys([*touched, USERS[self.steps % len(USERS)]]))

    def _not_found(self, call: Any, request: Any) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    # -- rules -----------------------------------------------------------------------------
    # Generic rules take any ids (never imported, malformed, self, repeated); the targeted
    # ones pick among live accounts and edges, so that examples reach the cap and mutual
    # pairs instead of mostly answering ACCOUNT_NOT_FOUND.

    @initialize(batch=imports(3, len(USERS)))
    def populate(self, batch: list[tuple[str, str | None]]) -> None:
        self._import(batch)

    @rule(batch=imports(1, 3, with_bad=True))
    def import_accounts(self, batch: list[tuple[str, str | None]]) -> None:
        self._import(batch)

    @rule(actor=actors, batch=targets)
    def follow(self, actor: str, batch: list[str]) -> None:
        self._follow(actor, batch)

    @precondition(lambda self: len(self.model.accounts) >= 2)
    @rule(data=st.data())
    def follow_live_accounts(self, data: st.DataObject) -> None:
        live = sorted(self.model.accounts)
        actor = data.draw(st.sampled_from(live), label="actor")
        batch = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=6), label="batch")
        self._follow(actor, batch)

    @precondition(lambda self: bool(self.model.accounts))
    @rule(data=st.data())
    def follow_everyone(self, data: st.DataObject) -> None:
        """One batch naming every id (self and unknown ones too) in random order: past the
        cap, the targets beyond it fail in request order."""
        actor = data.draw(st.sampled_from(sorted(self.model.accounts)), label="actor")
        self._follow(actor, data.draw(st.permutations((*USERS, GHOST)), label="batch"))

    @precondition(lambda self: bool(self.model.edges))
    @rule(data=st.data())
    def follow_back(self, data: st.DataObject) -> None:
        fan, followed = data.draw(st.sampled_from(sorted(self.model.edges)), label="edge")
        self._follow(followed, [fan])

    @rule(actor=actors, batch=targets)
    def unfollow(self, actor: str, batch: list[str]) -> None:
        self._unfollow(actor, batch)

    @precondition(lambda self: bool(self.model.edges))
    @rule(data=st.data())
    def unfollow_edge(self, data: st.DataObject) -> None:
        fan, followed = data.draw(st.sampled_from(sorted(self.model.edges)), label="edge")
        self._unfollow(fan, [followed])

    @precondition(lambda self: len(self.model.accounts) >= 3)  # keep a population to follow
    @rule(batch=st.lists(st.sampled_from((*USERS, GHOST)), min_size=1, max_size=2, unique=True))
    def delete_accounts(self, batch: list[str]) -> None:
        response = self.account_stub.DeleteAccounts(
            pb.DeleteAccountsRequest(user_ids=batch), timeout=TIMEOUT
        )
        assert [r.code for r in response.results] == [pb.RESULT_CODE_OK] * len(batch)
        self.model.tick()
        self._events(
            [
                (u, ACCOUNT_DELETED, (), frozenset())
                for u in sorted(batch)
                if u in self.model.accounts
            ]
        )
        self.touched = [
            *batch,
            *(u for e in sorted(self.model.edges) if set(e) & set(batch) for u in e),
        ]
        for user in batch:
            self.model.accounts.pop(user, None)
            for edge in [e for e in self.model.edges if user in e]:
                del self.model.edges[edge]

    # -- calls and what the model says they answer -------------------------------------------

    def _import(self, batch: list[tuple[str, str | None]]) -> None:
        response = self.account_stub.ImportAccounts(
            pb.ImportAccountsRequest(
                accounts=[pb.Account(user_id=u, nick=n) for u, n in batch]  # nick None = absent
            ),
            timeout=TIMEOUT,
        )
        expected = [
            pb.RESULT_CODE_INVALID_ARGUMENT if u == BAD else pb.RESULT_CODE_OK for u, _ in batch
        ]
        assert [r.code for r in response.results] == expected
        self._events([])
        self.touched = [u for u, _ in batch]
        for user, nick in batch:
            if user == BAD:
                continue
            account = self.model.accounts.get(user)
            if account is None:
                self.model.accounts[user] = Account(nick or "")
            elif nick is not None and nick != account.nick:
                account.nick = nick
                account.profile_sequence += 1

    def _follow(self, actor: str, batch: list[str]) -> None:
        self.touched = [actor, *batch]
        request = pb.FollowRequest(user_id=actor, target_ids=batch)
        if actor not in self.model.accounts:
            self._not_found(self.follow_stub.Follow, request)
            self._events([])
            return
        response = self.follow_stub.Follow(request, timeout=TIMEOUT)
        now = self.model.tick()
        expected = []
        new: list[str] = []  # the targets really followed, in request order
        for target in batch:  # in request order: that is how the cap is shared out
            if target in (BAD, actor):
                expected.append(pb.RESULT_CODE_INVALID_ARGUMENT)
            elif target not in self.model.accounts:
                expected.append(pb.RESULT_CODE_ACCOUNT_NOT_FOUND)
            elif (actor, target) in self.model.edges:
                expected.append(pb.RESULT_CODE_OK)  # keeps the first time
            elif len(self.model.following(actor)) < CAP:
                self.model.edges[actor, target] = now
                new.append(target)
                expected.append(pb.RESULT_CODE_OK)
            else:
                expected.append(pb.RESULT_CODE_FOLLOWING_LIMIT_REACHED)
        assert [(r.user_id, r.code) for r in response.results] == list(
            zip(batch, expected, strict=True)
        )
        mutual = frozenset(t for t in new if (t, actor) in self.model.edges)
        self._events([(actor, FOLLOWED, tuple(new), mutual)] if new else [])

    def _unfollow(self, actor: str, batch: list[str]) -> None:
        self.touched = [actor, *batch]
        request = pb.UnfollowRequest(user_id=actor, target_ids=batch)
        if actor not in self.model.accounts:
            self._not_found(self.follow_stub.Unfollow, request)
            self._events([])
            return
        response = self.follow_stub.Unfollow(request, timeout=TIMEOUT)
        self.model.tick()
        expected = []
        gone: set[str] = set()  # the edges really removed
        mutual = frozenset(t for t in batch if {(actor, t), (t, actor)} <= self.model.edges.keys())
        for target in batch:
            if target in (BAD, actor):
                expected.append(pb.RESULT_CODE_INVALID_ARGUMENT)
            else:
                if self.model.edges.pop((actor, target), None) is not None:
                    gone.add(target)
                expected.append(pb.RESULT_CODE_OK)
        assert [r.code for r in response.results] == expected
        self._events([(actor, UNFOLLOWED, tuple(sorted(gone)), mutual)] if gone else [])

    def _events(self, expected: list[Change]) -> None:
        """The outbox rows committed since the last check are exactly `expected`: the row
        of the call just made, if it changed anything, and nothing else."""
        served = self.served
        rows = served.service.run(
            rows_since(served.service.conn, served.position, served.distributed)
        )
        if rows:  # first: a failing example is run again, and must fail the same way
            served.position = rows[-1].position
            self.rows.extend(rows)
        assert [change(r) for r in rows] == expected, "the call's change events"

    # -- what must hold after every step ----------------------------------------------------

    def _whole_list(self, user: str, follow_type: pb.FollowType.ValueType) -> list[pb.ListEntry]:
        page_size = 1 + self.steps % 3  # 1, 2 or 3: lists of up to 6 span several pages
        entries: list[pb.ListEntry] = []
        token = ""
        for _ in range(20):  # at most 6 entries: a page loop that does not end is a bug
            page = self.follow_stub.List(
                pb.ListRequest(
                    user_id=user, follow_type=follow_type, page_size=page_size, page_token=token
                ),
                timeout=TIMEOUT,
            )
            assert len(page.entries) <= page_size
            entries.extend(page.entries)
            token = page.next_page_token
            if not token:
                return entries
        raise AssertionError(f"the {follow_type} list of {user} never ended")

    @invariant()
    def lists_match_model(self) -> None:
        """Every list of the users just touched (and one more), read page by page, is the
        model's, in the model's order; every entry carries the other user's profile; and the
        instants the service reports map one-to-one and in order onto the model's ticks."""
        self.steps += 1
        self._compare_lists(self._few_users())

    def _compare_lists(self, users: list[str]) -> None:
        """Every list of `users`, read page by page, is the model's, in the model's order;
        every entry carries the other user's profile; and the instants the service reports
        map one-to-one and in order onto the model's ticks (a repeated follow keeps its
        first time, both copies of an edge share one time, a pair became mutual at its
        later follow)."""
        instants: dict[int, int] = {}  # model tick -> reported microseconds
        for user in users:
            if user not in self.model.accounts:
                self._not_found(
                    self.follow_stub.List,
                    pb.ListRequest(user_id=user, follow_type=pb.FOLLOW_TYPE_FAN),
                )
                continue
            for follow_type, model_list in (
                (pb.FOLLOW_TYPE_FAN, self.model.fans(user)),
                (pb.FOLLOW_TYPE_FOLLOWING, self.model.following(user)),
                (pb.FOLLOW_TYPE_MUTUAL, self.model.mutual(user)),
            ):
                entries = self._whole_list(user, follow_type)
                expected = newest_first(model_list)
                assert [e.user_id for e in entries] == [u for u, _ in expected], (
                    f"{user} list {follow_type}"
                )
                for entry, (other, tick) in zip(entries, expected, strict=True):
                    account = self.model.accounts[other]
                    assert (entry.nick, entry.profile_sequence) == (
                        account.nick,
                        account.profile_sequence,
                    )
                    at = instants.setdefault(tick, micros(entry))
                    assert at == micros(entry), f"tick {tick} reported as two instants"
        ticks = sorted(instants)
        assert [instants[t] for t in ticks] == sorted(set(instants.values())), (
            "reported follow times are not in the order the calls happened"
        )

    @invariant()
    def counts_match_model(self) -> None:
        """GetInfo's three counts of each user equal the model's (and so the list lengths);
        users never imported or deleted answer ACCOUNT_NOT_FOUND with zeros."""
        if not self.model.accounts:
            return
        asker = min(self.model.accounts)
        wanted = [*USERS, GHOST]
        response = self.follow_stub.GetInfo(
            pb.GetInfoRequest(user_id=asker, target_ids=wanted), timeout=TIMEOUT
        )
        got = [
            (i.user_id, i.code, i.follower_count, i.following_count, i.mutual_count)
            for i in response.infos
        ]
        expected = [
            (u, pb.RESULT_CODE_OK, len(self.model.fans(u)), len(self.model.following(u)),
             len(self.model.mutual(u)))
            if u in self.model.accounts
            else (u, pb.RESULT_CODE_ACCOUNT_NOT_FOUND, 0, 0, 0)
            for u in wanted
        ]  # fmt: skip
        assert got == expected

    @invariant()
    def check_matches_model(self) -> None:
        """Check from the side of the user the last step touched most (the actor; else the
        user whose turn it is) agrees with the model; every user's at the end (teardown)."""
        self._compare_checks(self._few_users()[:1])

    def _compare_checks(self, users: list[str]) -> None:
        """Check from each user's side gives the model's relationship with every other id,
        NONE for unknown ids, INVALID_ARGUMENT for a malformed one; an unknown asker is
        NOT_FOUND."""
        wanted = [*USERS, GHOST, BAD]
        for user in users:
            request = pb.CheckRequest(user_id=user, target_ids=wanted)
            if user not in self.model.accounts:
                self._not_found(self.follow_stub.Check, request)
                continue
            response = self.follow_stub.Check(request, timeout=TIMEOUT)
            got = [(r.user_id, r.code, r.follow_type) for r in response.results]
            expected = [
                (t, pb.RESULT_CODE_INVALID_ARGUMENT, pb.FOLLOW_TYPE_NONE)
                if t == BAD
                else (t, pb.RESULT_CODE_OK, self.model.relation(user, t))
                for t in wanted
            ]
            assert got == expected, user

    @invariant()
    def stored_graph_sound(self) -> None:
        """The SQL invariants (both copies of each edge, symmetric mutual state, stored counts
        equal rows, the cap) hold in the database itself."""
        self.served.service.run(assert_sound(self.served.service.conn, CAP))

    def teardown(self) -> None:
        """At the end of each example, every user's lists and Check, not just a few; and the
        Watch stream has delivered this example's rows as per-edge events, in order, each
        with its row's id, kind, users, mutual change and time."""
        self._compare_lists(list(USERS))
        self._compare_checks(list(USERS))
        expected = edge_events(self.rows)
        got = [
            (e.id, e.kind, e.user_id, e.other_user_id, e.mutual_change, micros(e))
            for e in self.served.watch.take(len(expected))
        ]
        assert got == expected, "the Watch stream's events"


def test_service_agrees_with_model(served: Served) -> None:
    """Pins the whole rule set of issue 2 over a real channel and database: per-item codes
    (self, malformed, unknown, over the cap in request order, idempotent repeats), NOT_FOUND
    for unknown actors, deletes removing both directions; after every step counts and the
    stored invariants for everyone, and lists (all pages, in order, with profiles and times)
    and Check for the users the step touched, agree with an in-memory model; at the end of
    each example every user's lists and Check do. Every acknowledged write leaves exactly its
    change event (a Follow: the targets really followed, in request order, and those that
    became mutual; an Unfollow: the edges removed and those no longer mutual; a deletion: one
    per account that existed) and nothing else does (no row for a call that changed nothing
    or failed); a Watch stream delivers the same, edge by edge."""

    class OnThisServer(FollowMachine):
        def __init__(self) -> None:
            super().__init__(served)

    run_state_machine_as_test(
        OnThisServer,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=25,
            deadline=None,
            database=None,  # no .hypothesis/ in the tree; failures print a reproduction blob
            print_blob=True,
            # Every step is real calls, so shrinking a failure can take Hypothesis' full five
            # minutes; report the failing run as found instead (still a full, replayable
            # step list). Add Phase.shrink here when debugging one locally.
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
        ),
    )
