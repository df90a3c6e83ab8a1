"""follow.v1.EventService: the Watch stream's door (request checks, positions, protobuf).

Registered on the grpc.aio server directly, not through the unary call wrapper
(server.interceptor): a stream lives for hours, so it takes no slot of the in-flight bound
(--max-in-flight) and has its own (--max-watchers, in server.watch_hub). It still answers
request bytes that do not parse with INVALID_ARGUMENT and an ErrorInfo, like every call.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc

from follow.v1 import events_pb2 as pb
from server.errors import Reason, ServiceError
from server.interceptor import Malformed, lenient
from server.rules import user_id_problem
from server.servicer import classify
from server.status import to_status
from server.watch_hub import MAX_WATCH_USERS, Batch, WatchHub, edges, event_count
from server.watch_token import COMPLETE, Cursor, WatchTokens
from server.watch_wire import RowEvents, response_tail

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EventService"].full_name


def check_request(request: pb.WatchRequest, tokens: WatchTokens) -> Cursor | None:
    """The cursor to start after (None: from the oldest, or from now with only_new);
    ServiceError for a request that cannot be served."""
    if len(request.user_ids) > MAX_WATCH_USERS:
        raise ServiceError(
            Reason.TOO_MANY_ITEMS,
            f"at most {MAX_WATCH_USERS} user ids (empty: every user)",
            "user_ids",
        )
    for user_id in request.user_ids:
        problem = user_id_problem(user_id)
        if problem is not None:
            raise ServiceError(Reason.INVALID_USER_ID, f"{problem}: {user_id!r}", "user_ids")
    if not request.start_after:
        return None
    if request.only_new:
        raise ServiceError(
            Reason.INVALID_POSITION, "give start_after or only_new, not both", "start_after"
        )
    return tokens.decode(request.start_after)


class EventServicer:
    """Watch over a WatchHub: each hub Batch becomes one WatchResponse (written serialised),
    its events each with their position token."""

    def __init__(self, hub: WatchHub, tokens: WatchTokens) -> None:
        self._hub = hub
        self._tokens = tokens

    def response(self, batch: Batch) -> bytes:
        """The serialised WatchResponse of a Batch (a heartbeat when it has no events): the
        hot path of a busy stream, so written straight to the wire format
        (server.watch_wire: each row's common fields encoded once, its tokens made
        together), not built field by field through the protobuf runtime."""
        out: list[bytes] = []
        for part in batch.slices:
            row = part.row
            last = event_count(row)
            dones = [COMPLETE if i == last else i for i in range(part.start + 1, part.end + 1)]
            RowEvents(f"{row.id}.", row.kind, row.user_id, row.at_us).add(
                out,
                range(part.start, part.end),
                edges(row)[part.start : part.end],
                self._tokens.row_token_bytes(row.position, dones),
            )
        seconds, rest = divmod(time.time_ns() // 1000, 1_000_000)
        out.append(response_tail(self._tokens.encode(batch.cursor).encode(), seconds, rest * 1000))
        return b"".join(out)

    async def Watch(  # noqa: N802 - the RPC's name
        self, request: pb.WatchRequest | Malformed, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        try:
            if isinstance(request, Malformed):
                raise ServiceError(
                    Reason.INVALID_ARGUMENT,
                    "the request is not a valid protobuf message of this method's request type"
                    " (a string field must hold valid UTF-8)",
                )
            start = check_request(request, self._tokens)
            stream = self._hub.watch(start, request.only_new, request.user_ids)
            metrics = self._hub.metrics
            try:
                async for batch in stream:
                    await context.write(self.response(batch))
                    now = time.time()
                    for part in batch.slices:
                        row = part.row
                        metrics.events_sent(row.kind, part.end - part.start, now - row.at_us / 1e6)
            finally:
                await stream.aclose()
        except Exception as exc:
            error = classify(exc)
            if error.reason is Reason.INTERNAL:
                log.exception("internal error in Watch")
            elif error is not exc:
                log.warning("Watch failed: %s (%s)", error.reason, type(exc).__name__)
            status = to_status(error)
            await context.abort(status.code, status.details, status.trailing_metadata)


def _already_serialised(message: bytes) -> bytes:
    """Watch's responses are written serialised (EventServicer.response)."""
    return message


def add_to_server(servicer: EventServicer, server: grpc.aio.Server) -> None:
    """Register Watch on the server itself (see the module's note), with the lenient request
    parser of the unary calls."""
    handler = grpc.unary_stream_rpc_method_handler(
        servicer.Watch,
        request_deserializer=lenient(pb.WatchRequest.FromString),
        response_serializer=_already_serialised,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Watch": handler}),)
    )
