"""Pins that the service answers over a real channel: import, follow, check."""

from __future__ import annotations

from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from tests.helpers import import_users


async def test_follow_then_check_sees_relationship(
    follow_stub: pb_grpc.FollowServiceAsyncStub, account_stub: pb_grpc.AccountServiceAsyncStub
) -> None:
    await import_users(account_stub, "a", "b")
    await follow_stub.Follow(pb.FollowRequest(user_id="a", target_ids=["b"]))
    response = await follow_stub.Check(pb.CheckRequest(user_id="b", target_ids=["a"]))
    assert [r.follow_type for r in response.results] == [pb.FOLLOW_TYPE_FAN]
