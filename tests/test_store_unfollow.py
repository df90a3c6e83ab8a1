"""server.store's Unfollow when the targets' counts are not all in delta rows.

A Follow counts each new follower in a delta row of the target (under the acting user's
delta shard), and an Unfollow counts it down there; but an edge the bulk importer wrote, or
one whose counts a recount folded into the counter rows, has no such delta row: the
Unfollow then writes one (a negative count), and every count must still come out right.
"""

from __future__ import annotations

import asyncpg

from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from tests.helpers import import_users
from tests.invariants import assert_sound

CAP = 5000  # the service's default following limit

# What a recount leaves: each user's delta rows summed into its counter row, then deleted.
_FOLD = """
UPDATE follow_counts c SET followers = c.followers + d.followers, mutual = c.mutual + d.mutual
FROM (SELECT user_id, sum(followers)::bigint AS followers, sum(mutual)::bigint AS mutual
      FROM follow_count_deltas WHERE user_id = ANY($1::text[]) GROUP BY user_id) d
WHERE c.user_id = d.user_id AND c.user_id = ANY($1::text[])
"""
_DROP_DELTAS = "DELETE FROM follow_count_deltas WHERE user_id = ANY($1::text[])"


async def _counts(
    stub: pb_grpc.FollowServiceAsyncStub, asker: str, users: list[str]
) -> dict[str, tuple[int, int, int]]:
    response = await stub.GetInfo(pb.GetInfoRequest(user_id=asker, target_ids=users))
    return {
        i.user_id: (i.follower_count, i.following_count, i.mutual_count) for i in response.infos
    }


async def test_unfollow_counts_down_targets_with_and_without_delta_rows(
    follow_stub: pb_grpc.FollowServiceAsyncStub,
    account_stub: pb_grpc.AccountServiceAsyncStub,
    db_url: str,
) -> None:
    """Unfollowing 12 targets, half of whose follower counts were folded into their counter
    rows (no delta row left; on Citus mixed with the others on the same shards), and 4 of
    which follow back: every target loses the follower, the mutual pairs end on both sides,
    the back-follows stay, and the stored graph satisfies every invariant."""
    targets = [f"target{i:02d}" for i in range(12)]
    back = targets[:4]
    await import_users(account_stub, "actor", *targets)
    await follow_stub.Follow(pb.FollowRequest(user_id="actor", target_ids=targets))
    for target in back:
        await follow_stub.Follow(pb.FollowRequest(user_id=target, target_ids=["actor"]))
    conn = await asyncpg.connect(db_url)
    try:
        folded = targets[::2]
        async with conn.transaction():
            await conn.execute(_FOLD, folded)
            await conn.execute(_DROP_DELTAS, folded)
        before = await _counts(follow_stub, "actor", targets)
        assert all(before[t] == (1, 1, 1) for t in back), before
        assert all(before[t] == (1, 0, 0) for t in targets[4:]), before

        response = await follow_stub.Unfollow(
            pb.UnfollowRequest(user_id="actor", target_ids=targets)
        )
        assert [r.code for r in response.results] == [pb.RESULT_CODE_OK] * len(targets)

        after = await _counts(follow_stub, "actor", ["actor", *targets])
        assert after["actor"] == (4, 0, 0)
        assert all(after[t] == (0, 1, 0) for t in back), after
        assert all(after[t] == (0, 0, 0) for t in targets[4:]), after
        await assert_sound(conn, CAP)
    finally:
        await conn.close()
