"""Small helpers the tests share: importing users, reading whole lists, decoding errors."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc


async def import_users(stub: pb_grpc.AccountServiceAsyncStub, *user_ids: str) -> None:
    for start in range(0, len(user_ids), 100):
        chunk = user_ids[start : start + 100]
        response = await stub.ImportAccounts(
            pb.ImportAccountsRequest(accounts=[pb.Account(user_id=u) for u in chunk])
        )
        assert [r.code for r in response.results] == [pb.RESULT_CODE_OK] * len(chunk)


async def whole_list(
    stub: pb_grpc.FollowServiceAsyncStub,
    user_id: str,
    follow_type: pb.FollowType.ValueType,
    page_size: int = 0,
) -> list[pb.ListEntry]:
    """Every entry of a list, following next_page_token to the end."""
    entries: list[pb.ListEntry] = []
    token = ""
    while True:
        page = await stub.List(
            pb.ListRequest(
                user_id=user_id, follow_type=follow_type, page_size=page_size, page_token=token
            )
        )
        entries.extend(page.entries)
        token = page.next_page_token
        if not token:
            return entries


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The one google.rpc.ErrorInfo of a failed call (AIP-193)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status"
    assert status.code == error.code().value[0]
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert len(infos) == 1, f"expected exactly one ErrorInfo, got {len(infos)}"
    return infos[0]
