"""Request ids and metrics for the v4 shim, as one aiohttp middleware.

Each HTTP request gets the caller's `X-Request-Id` (when usable, see server.logs) or a new
id, in the same context variable the gRPC side uses: the in-process backend's servicer
calls and their log lines inherit it, and the channel backend forwards it as `x-request-id`
metadata. The id is returned in the `X-Request-Id` response header.

Metrics read the v4 ErrorCode from the envelope the shim wrote: a failure always starts
with `{"ActionStatus":"FAIL","ErrorCode":` (server.v4.envelope.fail), and a success never
does, because JSON escapes every quote inside a string value.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from server import logs
from server.metrics import Metrics

REQUEST_ID_HTTP_HEADER = "X-Request-Id"
_FAIL_PREFIX = b'{"ActionStatus":"FAIL","ErrorCode":'

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_code(body: object) -> int:
    """The v4 ErrorCode of an envelope the shim wrote (0 for success)."""
    if not isinstance(body, bytes) or not body.startswith(_FAIL_PREFIX):
        return 0
    digits = body[len(_FAIL_PREFIX) : len(_FAIL_PREFIX) + 12].split(b",", 1)[0]
    try:
        return int(digits)
    except ValueError:
        return -1


def observe_requests(metrics: Metrics | None) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = logs.accept_request_id(request.headers.get(REQUEST_ID_HTTP_HEADER))
        token = logs.request_id.set(rid)
        started = time.perf_counter()
        try:
            response = await handler(request)
        finally:
            logs.request_id.reset(token)
        response.headers[REQUEST_ID_HTTP_HEADER] = rid
        if metrics is not None and isinstance(response, web.Response):
            metrics.observe_v4(
                request.path, error_code(response.body), time.perf_counter() - started
            )
        return response

    return middleware
