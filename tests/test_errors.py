"""server.errors: the one table that maps the error vocabulary onto follow.v1 enums,
gRPC status codes and v4 numbers."""

from __future__ import annotations

import grpc
import pytest

from follow.v1 import follow_pb2 as pb
from server.errors import (
    ERROR_DOMAIN,
    ITEM_V4_CODES,
    REASONS,
    FollowType,
    ItemCode,
    Reason,
    ServiceError,
)


def test_item_codes_equal_the_proto_result_codes() -> None:
    """Every ItemCode has the number and name of follow.v1.ResultCode, and vice versa, so
    the servicer can pass `.value` straight into the message."""
    proto = {v.name: v.number for v in pb.ResultCode.DESCRIPTOR.values}
    ours = {f"RESULT_CODE_{c.name}": c.value for c in ItemCode}
    assert ours == proto


def test_follow_types_equal_the_proto_and_v4_numbers() -> None:
    """FollowType matches follow.v1.FollowType, and both use the v4 numbers: 0 none, 1 fan,
    2 following, 3 mutual (spec 2.3 and 2.4)."""
    proto = {v.name: v.number for v in pb.FollowType.DESCRIPTOR.values}
    ours = {f"FOLLOW_TYPE_{t.name}": t.value for t in FollowType}
    assert ours == proto
    assert (FollowType.NONE, FollowType.FAN, FollowType.FOLLOWING, FollowType.MUTUAL) == (
        0,
        1,
        2,
        3,
    )


def test_mutual_is_fan_and_following_bits() -> None:
    """MUTUAL is FAN | FOLLOWING: the store composes a Check answer from two bits."""
    assert FollowType.FAN | FollowType.FOLLOWING == FollowType.MUTUAL


def test_item_codes_map_to_the_v4_numbers() -> None:
    """Per-item codes map one-to-one onto the spec's numbers: 0, 30001, 30003, 32100."""
    assert ITEM_V4_CODES == {
        ItemCode.OK: 0,
        ItemCode.INVALID_ARGUMENT: 30001,
        ItemCode.ACCOUNT_NOT_FOUND: 30003,
        ItemCode.FOLLOWING_LIMIT_REACHED: 32100,
    }
    assert len(set(ITEM_V4_CODES.values())) == len(ItemCode)


def test_every_reason_has_a_mapping() -> None:
    """No Reason can be raised without a gRPC code and a v4 number to report it with."""
    assert set(REASONS) == set(Reason)
    for reason in Reason:
        assert reason.value == reason.name
        assert isinstance(REASONS[reason].grpc_code, grpc.StatusCode)
        assert REASONS[reason].grpc_code is not grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("reason", "code", "v4"),
    [
        (Reason.INVALID_USER_ID, grpc.StatusCode.INVALID_ARGUMENT, 30001),
        (Reason.MISSING_ITEMS, grpc.StatusCode.INVALID_ARGUMENT, 30001),
        (Reason.TOO_MANY_ITEMS, grpc.StatusCode.INVALID_ARGUMENT, 30001),
        (Reason.INVALID_FOLLOW_TYPE, grpc.StatusCode.INVALID_ARGUMENT, 30001),
        (Reason.INVALID_PAGE_SIZE, grpc.StatusCode.INVALID_ARGUMENT, 30001),
        (Reason.INVALID_PAGE_TOKEN, grpc.StatusCode.INVALID_ARGUMENT, 30001),
        (Reason.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT, 30001),
        (Reason.USER_NOT_FOUND, grpc.StatusCode.NOT_FOUND, 30003),
        (Reason.CONTENTION, grpc.StatusCode.ABORTED, 30006),
        (Reason.DATABASE_UNAVAILABLE, grpc.StatusCode.UNAVAILABLE, 30006),
        (Reason.DEADLINE_EXCEEDED, grpc.StatusCode.DEADLINE_EXCEEDED, 30007),
        (Reason.OVERLOADED, grpc.StatusCode.RESOURCE_EXHAUSTED, 30006),
        (Reason.INTERNAL, grpc.StatusCode.INTERNAL, 30006),
    ],
)
def test_reason_mapping(reason: Reason, code: grpc.StatusCode, v4: int) -> None:
    """Each request-level reason answers the gRPC code the proto documents and the v4
    number of spec section 3 (parameter errors 30001, unknown account 30003, server
    trouble 30006, timeout 30007)."""
    assert REASONS[reason].grpc_code is code
    assert REASONS[reason].v4_code == v4


def test_proto_documents_every_reason() -> None:
    """The reasons the proto's header comment promises exist in the vocabulary."""
    for name in (
        "INVALID_USER_ID",
        "TOO_MANY_ITEMS",
        "INVALID_FOLLOW_TYPE",
        "INVALID_PAGE_SIZE",
        "INVALID_PAGE_TOKEN",
        "USER_NOT_FOUND",
        "DATABASE_UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "OVERLOADED",
        "INTERNAL",
    ):
        assert Reason(name).name == name


def test_service_error_carries_its_mapping() -> None:
    """A ServiceError keeps reason, message and field, and finds its mapping in the table."""
    error = ServiceError(Reason.USER_NOT_FOUND, "no such user", "user_id")
    assert str(error) == "no such user"
    assert error.field == "user_id"
    assert error.mapping is REASONS[Reason.USER_NOT_FOUND]
    assert ServiceError(Reason.INTERNAL, "x").field is None
    assert ERROR_DOMAIN == "follow.v1"
