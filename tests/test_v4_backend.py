"""The v4 shim's in-process backend (server/v4/backend.py): the same bound on in-flight calls
as the gRPC server, and a deadline on every call, against the real core and PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest

from follow.v1 import follow_pb2 as pb
from server.admission import InFlightLimit
from server.app import RunningService
from server.store import AccountInput
from server.v4.backend import CallFailedError, in_process


@pytest.fixture
async def users(service: RunningService) -> RunningService:
    await service.core.import_accounts([AccountInput(u, None, None) for u in "abc"])
    return service


async def _following(db_url: str, user_id: str) -> int:
    conn = await asyncpg.connect(db_url)
    try:
        n: int = await conn.fetchval("SELECT count(*) FROM following WHERE user_id = $1", user_id)
        return n
    finally:
        await conn.close()


async def test_a_call_past_the_in_flight_bound_is_refused_and_changes_nothing(
    users: RunningService, db_url: str
) -> None:
    """With the bound reached, a v4 call gets RESOURCE_EXHAUSTED/OVERLOADED (v4 30006), like
    a gRPC call would, and nothing is written."""
    limit = InFlightLimit(1)
    limit.in_flight = 1  # one call already in flight
    backend = in_process(users.core, limit)
    with pytest.raises(CallFailedError) as refused:
        await backend.Follow(pb.FollowRequest(user_id="a", target_ids=["b"]))
    assert refused.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.reason == "OVERLOADED"
    assert limit.rejected == 1
    assert await _following(db_url, "a") == 0


async def test_calls_are_counted_while_in_flight_and_released_after(
    users: RunningService, db_url: str
) -> None:
    """A call blocked in the database holds its place in the bound; a second call is refused
    meanwhile; when the first finishes the count is back to zero."""
    limit = InFlightLimit(1)
    backend = in_process(users.core, limit)
    blocker = await asyncpg.connect(db_url)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM follow_counts WHERE user_id = 'a' FOR UPDATE")

            async def follow() -> pb.FollowResponse:
                return await backend.Follow(pb.FollowRequest(user_id="a", target_ids=["b"]))

            first = asyncio.create_task(follow())
            for _ in range(100):
                if limit.in_flight == 1:
                    break
                await asyncio.sleep(0.01)
            assert limit.in_flight == 1
            with pytest.raises(CallFailedError) as refused:
                await backend.Check(pb.CheckRequest(user_id="a", target_ids=["b"]))
            assert refused.value.reason == "OVERLOADED"
        response = await first
    finally:
        await blocker.close()
    assert [r.code for r in response.results] == [pb.RESULT_CODE_OK]
    assert limit.in_flight == 0
    assert await _following(db_url, "a") == 1


async def test_a_call_blocked_past_its_deadline_fails_and_writes_nothing(
    users: RunningService, db_url: str
) -> None:
    """Every in-process call carries a deadline: blocked on a lock past it, the call fails
    with DEADLINE_EXCEEDED (v4 30007) instead of hanging, and its transaction rolls back."""
    backend = in_process(users.core, None, timeout=0.3)
    blocker = await asyncpg.connect(db_url)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM follow_counts WHERE user_id = 'a' FOR UPDATE")
            with pytest.raises(CallFailedError) as late:
                await backend.Follow(pb.FollowRequest(user_id="a", target_ids=["b", "c"]))
    finally:
        await blocker.close()
    assert late.value.status == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await _following(db_url, "a") == 0
