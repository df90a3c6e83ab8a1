"""server.errors: the one table that maps the error vocabulary onto follow.v1 enums,
gRPC status codes and v4 numbers, and the proto's own copy of that table; the
google/rpc protos shipped beside the contract."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import grpc
import grpc_tools  # type: ignore[import-untyped]
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_tools import protoc

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
        (Reason.INVALID_POSITION, grpc.StatusCode.INVALID_ARGUMENT, 30001),
        (Reason.POSITION_EXPIRED, grpc.StatusCode.OUT_OF_RANGE, 30001),
        (Reason.TOO_MANY_WATCHERS, grpc.StatusCode.RESOURCE_EXHAUSTED, 30006),
        (Reason.SHUTTING_DOWN, grpc.StatusCode.UNAVAILABLE, 30006),
    ],
)
def test_reason_mapping(reason: Reason, code: grpc.StatusCode, v4: int) -> None:
    """Each request-level reason answers the gRPC code the proto documents and the v4
    number of spec section 3 (parameter errors 30001, unknown account 30003, server
    trouble 30006, timeout 30007)."""
    assert REASONS[reason].grpc_code is code
    assert REASONS[reason].v4_code == v4


PROTO = Path(__file__).resolve().parent.parent / "proto"
_ROW = re.compile(r"^//\s+([A-Z_]+)\s+([A-Z_]+)\s+(\d+)\s+\S.*$")


def proto_reason_table() -> dict[str, tuple[str, int]]:
    """reason -> (gRPC status name, v4 code), as the header comment of follow.proto lists
    them: the rows between the `reason  gRPC status  v4  when` heading and the next blank
    comment line."""
    lines = (PROTO / "follow" / "v1" / "follow.proto").read_text(encoding="utf-8").splitlines()
    heading = next(
        i for i, line in enumerate(lines) if re.match(r"^//\s+reason\s+gRPC status", line)
    )
    table: dict[str, tuple[str, int]] = {}
    for line in lines[heading + 1 :]:
        if line.strip() == "//":
            break
        row = _ROW.match(line)
        assert row, f"not a row of the reason table: {line!r}"
        assert row.group(1) not in table, f"{row.group(1)} listed twice"
        table[row.group(1)] = (row.group(2), int(row.group(3)))
    return table


def test_proto_reason_table_equals_the_code_both_ways() -> None:
    """Every reason the server can send is documented in the proto with the status and v4
    code it really gets, and the proto documents no reason the code does not have."""
    documented = proto_reason_table()
    ours = {r.value: (m.grpc_code.name, m.v4_code) for r, m in REASONS.items()}
    assert sorted(set(ours) - set(documented)) == [], "reasons the proto does not document"
    assert sorted(set(documented) - set(ours)) == [], "reasons the proto invents"
    assert documented == ours


def _compiled(*files: str) -> descriptor_pb2.FileDescriptorSet:
    """The shipped proto files compiled by protoc, with only the well-known types of any
    protobuf distribution besides: what a client in another language would have."""
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as out:
        target = Path(out) / "set.pb"
        code = protoc.main(
            [
                "protoc",
                f"-I{PROTO}",
                f"-I{well_known}",
                f"--descriptor_set_out={target}",
                *files,
            ]
        )
        assert code == 0, f"protoc failed on {files}"
        return descriptor_pb2.FileDescriptorSet.FromString(target.read_bytes())


def _fields(message: descriptor_pb2.DescriptorProto) -> dict[str, tuple[int, int, str]]:
    return {f.name: (f.number, f.type, f.type_name) for f in message.field}


def test_the_contract_ships_what_decodes_error_details() -> None:
    """proto/ holds follow.proto and the google.rpc Status and ErrorInfo it refers to; they
    compile on their own and define the same messages, field for field, as the ones the
    server encodes with."""
    compiled = _compiled(
        "follow/v1/follow.proto", "google/rpc/status.proto", "google/rpc/error_details.proto"
    )
    shipped = {
        f"{f.package}.{m.name}": m
        for f in compiled.file
        if f.package == "google.rpc"
        for m in f.message_type
    }
    for module, name in ((status_pb2, "Status"), (error_details_pb2, "ErrorInfo")):
        installed = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(installed)
        (ours,) = (m for m in installed.message_type if m.name == name)
        assert _fields(shipped[f"google.rpc.{name}"]) == _fields(ours), name


def test_service_error_carries_its_mapping() -> None:
    """A ServiceError keeps reason, message and field, and finds its mapping in the table."""
    error = ServiceError(Reason.USER_NOT_FOUND, "no such user", "user_id")
    assert str(error) == "user_id: no such user"
    assert error.field == "user_id"
    assert error.mapping is REASONS[Reason.USER_NOT_FOUND]
    assert ServiceError(Reason.INTERNAL, "x").field is None
    assert ERROR_DOMAIN == "follow.v1"


def test_a_field_error_message_starts_with_the_field_once() -> None:
    """A message about a field reads "<field>: ..." whether or not the raiser wrote the
    prefix (the page-token error did not); it is never doubled."""
    without = ServiceError(Reason.INVALID_PAGE_TOKEN, "page token is invalid: x", "page_token")
    assert without.message == "page_token: page token is invalid: x"
    already = ServiceError(Reason.INVALID_USER_ID, "user_id: user id is empty", "user_id")
    assert already.message == "user_id: user id is empty"
    assert ServiceError(Reason.INTERNAL, "internal error").message == "internal error"
