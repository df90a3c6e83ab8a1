"""The service's rules over plain Python values: validation, batch limits, per-item results.

Both doors call this: the gRPC servicer directly, and the v4 shim through the gRPC contract.
A request-level problem raises ServiceError before anything is written.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from server import rules
from server.cursor import CursorCodec, Position
from server.deadline import call_deadline
from server.errors import FollowType, ItemCode, Reason, ServiceError
from server.store import AccountInput as AccountInput  # the doors build it; re-exported
from server.store import Counts, PendingDeletionError, Store

# How long an import waits for the cleanup of a deleted account of the same id.
REIMPORT_WAIT_SECONDS = 5.0
# How long DeleteAccounts removes edges itself before answering (the rest goes on behind).
DELETE_WAIT_SECONDS = 3.0


@dataclass(frozen=True, slots=True)
class ItemResult:
    """The outcome for one user id of a multi-item call (v4 ResultItem)."""

    user_id: str
    code: ItemCode
    message: str = ""


# The hot reads answer with plain tuples, not one object per item: a Check of 100 targets
# builds 100 of them, and the servicer copies each into protobuf at once, so a class per
# item only adds a construction and attribute lookups to every call.

CheckResult = tuple[str, ItemCode, str, int]  # the last is the FollowType number
"""(user_id, code, message, follow_type) of one Check target."""

InfoResult = tuple[str, ItemCode, str, Counts]
"""(user_id, code, message, counts) of one GetInfo target."""

Entry = tuple[str, int, str, str, int]
"""(user_id, at in Unix µs, nick, face_url, profile_sequence) of one List entry."""


@dataclass(frozen=True, slots=True)
class Page:
    """One List page: entries (id, time in µs, nick, face url, sequence) and the token after it."""

    entries: list[Entry]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class AccountStatus:
    """Whether one asked-about account has been imported."""

    user_id: str
    code: ItemCode
    message: str
    imported: bool


MESSAGES: dict[ItemCode, str] = {
    ItemCode.OK: "",
    ItemCode.ACCOUNT_NOT_FOUND: "account does not exist",
    ItemCode.FOLLOWING_LIMIT_REACHED: "following limit reached",
}
_ZERO = Counts(0, 0, 0)


def _require_user(user_id: str, field: str = "user_id") -> None:
    problem = rules.user_id_problem(user_id)
    if problem is not None:
        raise ServiceError(Reason.INVALID_USER_ID, f"{field}: {problem}", field)


def _require_batch(items: Sequence[object], maximum: int, field: str) -> None:
    if not items:
        raise ServiceError(Reason.MISSING_ITEMS, f"{field}: at least one item is required", field)
    if len(items) > maximum:
        raise ServiceError(
            Reason.TOO_MANY_ITEMS,
            f"{field}: {len(items)} items given, at most {maximum} are allowed",
            field,
        )


def _invalid(user_id: str, why: str) -> ItemResult:
    return ItemResult(user_id, ItemCode.INVALID_ARGUMENT, why)


class FollowCore:
    """The rules between the doors and the store: validation, per-item results, the cap, page
    tokens."""

    def __init__(self, store: Store, cursors: CursorCodec, limits: rules.Limits) -> None:
        self._store = store
        self._cursors = cursors
        self._limits = limits

    def _targets(
        self, user_id: str, targets: Sequence[str], maximum: int, no_self: bool
    ) -> tuple[dict[str, ItemResult], list[str]]:
        """Validate the request; per-item failures, and the distinct valid targets in order."""
        _require_user(user_id)
        _require_batch(targets, maximum, "target_ids")
        failed: dict[str, ItemResult] = {}
        if rules.all_valid_user_ids(targets):
            valid_ids = list(dict.fromkeys(targets))
            if no_self and user_id in valid_ids:
                valid_ids.remove(user_id)
                failed[user_id] = _invalid(user_id, "a user cannot follow themselves")
            return failed, valid_ids
        valid: dict[str, None] = {}
        for target in targets:
            problem = rules.user_id_problem(target)
            if problem is not None:
                failed[target] = _invalid(target, problem)
            elif no_self and target == user_id:
                failed[target] = _invalid(target, "a user cannot follow themselves")
            else:
                valid[target] = None
        return failed, list(valid)

    async def follow(self, user_id: str, targets: Sequence[str]) -> list[ItemResult]:
        failed, valid = self._targets(user_id, targets, rules.MAX_FOLLOW_TARGETS, no_self=True)
        codes = await self._store.follow(user_id, valid, self._limits.max_following)
        done = {t: ItemResult(t, code, MESSAGES[code]) for t, code in codes.items()}
        return [failed.get(t) or done[t] for t in targets]

    async def unfollow(self, user_id: str, targets: Sequence[str]) -> list[ItemResult]:
        failed, valid = self._targets(user_id, targets, rules.MAX_FOLLOW_TARGETS, no_self=True)
        await self._store.unfollow(user_id, valid)
        return [failed.get(t) or ItemResult(t, ItemCode.OK) for t in targets]

    async def check(self, user_id: str, targets: Sequence[str]) -> list[CheckResult]:
        failed, valid = self._targets(user_id, targets, rules.MAX_CHECK_TARGETS, no_self=False)
        types = await self._store.check(user_id, valid or [user_id])
        ok = ItemCode.OK
        if not failed:
            return [(t, ok, "", types[t]) for t in targets]
        results: list[CheckResult] = []
        for t in targets:
            bad = failed.get(t)
            if bad is not None:
                results.append((t, bad.code, bad.message, FollowType.NONE))
            else:
                results.append((t, ok, "", types[t]))
        return results

    async def get_info(self, user_id: str, targets: Sequence[str]) -> list[InfoResult]:
        failed, valid = self._targets(user_id, targets, rules.MAX_INFO_TARGETS, no_self=False)
        counts = await self._store.counts([user_id, *valid])
        if user_id not in counts:
            raise ServiceError(
                Reason.USER_NOT_FOUND, "the acting user has not been imported", "user_id"
            )
        ok, missing = ItemCode.OK, ItemCode.ACCOUNT_NOT_FOUND
        results: list[InfoResult] = []
        for t in targets:
            bad = failed.get(t) if failed else None
            if bad is not None:
                results.append((t, bad.code, bad.message, _ZERO))
                continue
            found = counts.get(t)
            if found is not None:
                results.append((t, ok, "", found))
            else:
                results.append((t, missing, MESSAGES[missing], _ZERO))
        return results

    async def list_page(
        self, user_id: str, list_type: int, page_size: int, page_token: str
    ) -> Page:
        _require_user(user_id)
        if list_type not in (FollowType.FAN, FollowType.FOLLOWING, FollowType.MUTUAL):
            raise ServiceError(
                Reason.INVALID_FOLLOW_TYPE,
                f"follow_type: {list_type} is not a list;"
                " use 1 (fans), 2 (following) or 3 (mutual)",
                "follow_type",
            )
        size = rules.page_size(page_size)
        if size is None:
            raise ServiceError(
                Reason.INVALID_PAGE_SIZE, "page_size: must not be negative", "page_size"
            )
        after = None
        if page_token:
            pos = self._cursors.decode(page_token, user_id, list_type)
            after = (pos.at_us, pos.user_id)
        rows, profiles = await self._store.page(user_id, FollowType(list_type), size + 1, after)
        if user_id not in profiles:
            raise ServiceError(Reason.USER_NOT_FOUND, "the user has not been imported", "user_id")
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            last = rows[-1]
            token = self._cursors.encode(user_id, list_type, Position(last.at_us, last.user_id))
        entries: list[Entry] = []
        append = entries.append
        get = profiles.get
        for row in rows:
            p = get(row.user_id)
            if p is None:
                append((row.user_id, row.at_us, "", "", 0))
            else:
                append((row.user_id, row.at_us, p.nick or "", p.face_url or "", p.profile_sequence))
        return Page(entries, token)

    # -- accounts ------------------------------------------------------------------------

    async def import_accounts(self, accounts: Sequence[AccountInput]) -> list[ItemResult]:
        _require_batch(accounts, rules.MAX_ACCOUNTS, "accounts")
        problems: list[str | None] = []
        merged: dict[str, AccountInput] = {}
        for acc in accounts:
            problem = rules.user_id_problem(acc.user_id)
            for name, value in (("nick", acc.nick), ("face_url", acc.face_url)):
                if problem is None and value is not None:
                    problem = rules.profile_field_problem(name, value)
            problems.append(problem)
            if problem is not None:
                continue
            earlier = merged.get(acc.user_id)
            if earlier is not None:  # later fields win, as if imported one after the other
                acc = AccountInput(
                    acc.user_id,
                    acc.nick if acc.nick is not None else earlier.nick,
                    acc.face_url if acc.face_url is not None else earlier.face_url,
                )
            merged[acc.user_id] = acc
        if merged:
            await self._import_when_deleted(list(merged.values()))
        return [
            ItemResult(a.user_id, ItemCode.OK) if p is None else _invalid(a.user_id, p)
            for a, p in zip(accounts, problems, strict=True)
        ]

    async def _import_when_deleted(self, accounts: list[AccountInput]) -> None:
        """Import, waiting (bounded by the call's deadline and REIMPORT_WAIT_SECONDS) for
        the cleanup of any of these ids still being deleted: a re-imported id starts with
        no edges, never the old account's."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + REIMPORT_WAIT_SECONDS
        deadline = call_deadline.get()
        if deadline is not None:
            give_up = min(give_up, deadline - 0.1)
        while True:
            try:
                await self._store.import_accounts(accounts)
                return
            except PendingDeletionError as pending:
                if loop.time() >= give_up:
                    raise ServiceError(
                        Reason.CONTENTION,
                        f"account {pending.user_ids[0]!r} is still being deleted; import it"
                        " again once its cleanup has finished",
                        "accounts",
                    ) from None
                await asyncio.sleep(0.05)

    async def _clean_up_for_a_while(self, user_ids: list[str]) -> None:
        """Remove the deleted accounts' edges here, batch by batch, for at most
        DELETE_WAIT_SECONDS (and never past the call's deadline): a small account is gone
        with all its edges when the call returns; a big one is left to the background
        runner (server.cleanup), which carries on from where this stopped."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + DELETE_WAIT_SECONDS
        deadline = call_deadline.get()
        if deadline is not None:
            give_up = min(give_up, deadline - 0.1)
        # The deletion is committed: nothing here may turn the call into an error. A batch
        # still running at give_up is cancelled (and rolled back) for the runner to redo.
        with contextlib.suppress(TimeoutError, ServiceError):
            async with asyncio.timeout_at(give_up):
                for user_id in user_ids:
                    while not await self._store.clean_up_deletion(user_id):
                        pass

    async def check_accounts(self, user_ids: Sequence[str]) -> list[AccountStatus]:
        _require_batch(user_ids, rules.MAX_ACCOUNTS, "user_ids")
        problems = {u: rules.user_id_problem(u) for u in user_ids}
        valid = [u for u, p in problems.items() if p is None]
        existing = await self._store.existing_accounts(valid) if valid else set()
        results = []
        for u in user_ids:
            problem = problems[u]
            if problem is not None:
                results.append(AccountStatus(u, ItemCode.INVALID_ARGUMENT, problem, False))
            else:
                results.append(AccountStatus(u, ItemCode.OK, "", u in existing))
        return results

    async def delete_accounts(self, user_ids: Sequence[str]) -> list[ItemResult]:
        _require_batch(user_ids, rules.MAX_ACCOUNTS, "user_ids")
        problems = {u: rules.user_id_problem(u) for u in user_ids}
        valid = [u for u, p in problems.items() if p is None]
        if valid:
            await self._store.delete_accounts(valid)
            await self._clean_up_for_a_while(valid)
        results = []
        for u in user_ids:
            problem = problems[u]
            results.append(
                _invalid(u, problem) if problem is not None else ItemResult(u, ItemCode.OK)
            )
        return results
