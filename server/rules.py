"""Limits and id rules shared by both doors (gRPC and the v4 shim): section 5 of the v4 spec."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_USER_ID_BYTES = 32
MAX_PROFILE_FIELD_BYTES = 500
MAX_FOLLOW_TARGETS = 20
MAX_CHECK_TARGETS = 100
MAX_INFO_TARGETS = 20
MAX_ACCOUNTS = 100
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_MAX_FOLLOWING = 5000


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits an operator may change; everything else above is part of the contract."""

    max_following: int = DEFAULT_MAX_FOLLOWING


# Unicode category Cc (control characters) and Cs (surrogates, which no valid UTF-8 holds).
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def user_id_problem(user_id: str) -> str | None:
    """Why `user_id` is not a valid user id, or None when it is. On the hot path of every
    call (up to 100 ids a Check), so the common case costs three C-level string scans."""
    if user_id.isascii() and user_id.isprintable() and 0 < len(user_id) <= MAX_USER_ID_BYTES:
        return None
    if not user_id:
        return "user id is empty"
    if len(user_id.encode("utf-8", "surrogatepass")) > MAX_USER_ID_BYTES:
        return f"user id is longer than {MAX_USER_ID_BYTES} bytes of UTF-8"
    if _FORBIDDEN.search(user_id):
        return "user id contains a control character or an unpaired surrogate"
    return None


def all_valid_user_ids(user_ids: Sequence[str]) -> bool:
    """Whether every id in a non-empty batch is valid by user_id_problem's common case:
    one C-level scan of the ids joined and two over their lengths, instead of a Python call
    per id (a Check has 100). False means "look at each id", not that one is invalid."""
    joined = "".join(user_ids)
    return (
        joined.isascii()
        and joined.isprintable()
        and min(map(len, user_ids)) > 0
        and max(map(len, user_ids)) <= MAX_USER_ID_BYTES
    )


def profile_field_problem(name: str, value: str) -> str | None:
    """Why a nick or face URL cannot be stored, or None when it can."""
    if len(value.encode("utf-8", "surrogatepass")) > MAX_PROFILE_FIELD_BYTES:
        return f"{name} is longer than {MAX_PROFILE_FIELD_BYTES} bytes of UTF-8"
    if "\x00" in value or _SURROGATE.search(value):
        return f"{name} contains a NUL character or an unpaired surrogate"
    return None


def page_size(requested: int) -> int | None:
    """The page size to serve for a requested one, or None when the request is invalid."""
    if requested < 0:
        return None
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)
