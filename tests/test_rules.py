"""server.rules: the id rules and page-size rules of section 5 of the v4 spec."""

from __future__ import annotations

import pytest

from server import rules


@pytest.mark.parametrize(
    "user_id",
    ["a", "x" * 32, "é" * 16, "用户" * 5, "user with spaces", "UserID_001", "😀" * 8],
)
def test_valid_user_ids(user_id: str) -> None:
    """Ids of 1 to 32 bytes of UTF-8 without control characters are accepted, whatever
    script they use; the limit counts bytes, so 16 two-byte characters are allowed."""
    assert rules.user_id_problem(user_id) is None


@pytest.mark.parametrize(
    ("user_id", "why"),
    [
        ("", "empty"),
        ("x" * 33, "longer than 32 bytes"),
        ("é" * 16 + "x", "longer than 32 bytes"),  # 33 bytes, 17 characters
        ("😀" * 8 + "x", "longer than 32 bytes"),
        ("a\x00b", "control character"),
        ("a\nb", "control character"),
        ("a\x1fb", "control character"),
        ("a\x7fb", "control character"),
        ("a\x85b", "control character"),  # C1 control
        ("a\ud800b", "unpaired surrogate"),
    ],
)
def test_invalid_user_ids(user_id: str, why: str) -> None:
    """Empty ids, ids over 32 bytes of UTF-8 (bytes, not characters), C0/C1 controls and
    unpaired surrogates are refused, and the reason says which rule was broken."""
    problem = rules.user_id_problem(user_id)
    assert problem is not None
    assert why in problem


def test_user_id_limit_is_32_bytes() -> None:
    """The contract's limit is 32 bytes, exactly as the v4 docs say."""
    assert rules.MAX_USER_ID_BYTES == 32
    assert rules.user_id_problem("x" * rules.MAX_USER_ID_BYTES) is None
    assert rules.user_id_problem("x" * (rules.MAX_USER_ID_BYTES + 1)) is not None


@pytest.mark.parametrize(
    ("requested", "served"),
    [(0, 100), (1, 1), (100, 100), (999, 999), (1000, 1000), (1001, 1000), (2**31 - 1, 1000)],
)
def test_page_size(requested: int, served: int) -> None:
    """0 means the default of 100; anything above 1000 is clamped to 1000."""
    assert rules.page_size(requested) == served


@pytest.mark.parametrize("requested", [-1, -(2**31)])
def test_negative_page_size_is_invalid(requested: int) -> None:
    """A negative page size is a request error (None), not silently the default."""
    assert rules.page_size(requested) is None


def test_batch_limits_match_the_v4_api() -> None:
    """Batch limits are the v4 API's: 20 follow targets, 100 check targets, 20 info targets,
    100 accounts, and a following cap of 5000 by default."""
    assert rules.MAX_FOLLOW_TARGETS == 20
    assert rules.MAX_CHECK_TARGETS == 100
    assert rules.MAX_INFO_TARGETS == 20
    assert rules.MAX_ACCOUNTS == 100
    assert rules.DEFAULT_PAGE_SIZE == 100
    assert rules.MAX_PAGE_SIZE == 1000
    assert rules.DEFAULT_MAX_FOLLOWING == 5000
    assert rules.Limits().max_following == 5000


@pytest.mark.parametrize("value", ["", "Nick", "n" * 500, "é" * 250, "a\nb", "http://x/y.png"])
def test_profile_field_accepted(value: str) -> None:
    """Nicks and face URLs up to 500 bytes are stored; newlines are allowed in them."""
    assert rules.profile_field_problem("nick", value) is None


@pytest.mark.parametrize("value", ["n" * 501, "é" * 250 + "x", "a\x00b", "a\udc00"])
def test_profile_field_refused(value: str) -> None:
    """Over 500 bytes, a NUL (PostgreSQL text cannot hold it) or an unpaired surrogate is
    refused, and the message names the field."""
    problem = rules.profile_field_problem("face_url", value)
    assert problem is not None
    assert problem.startswith("face_url")
