"""The webhook senders' HTTP/1.1 client (server.webhook_http) against real servers on
127.0.0.1: the aiohttp receiver of the webhook tests, an aiohttp app answering in the ways
HTTP allows (chunked, Connection: close, no length, redirects, slow), a raw asyncio server
for what aiohttp will not send (1xx, garbage, closing idle connections), and https."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web

from server.webhook_http import (
    MAX_BODY,
    HttpClient,
    HttpError,
    Target,
    _BadAnswerError,
    _headers,
    encode_query,
)
from tests.test_tls import Authority
from tests.webhook_receiver import Receiver

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    c = HttpClient(4)
    yield c
    await c.close()


async def _app(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> tuple[Any, str]:
    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    server: Any = site._server
    port = server.sockets[0].getsockname()[1]
    scheme = "https" if ssl_context else "http"
    return runner, f"{scheme}://127.0.0.1:{port}/hook"


async def _raw(answer: Callable[[bytes], bytes | None]) -> tuple[asyncio.Server, str, list[int]]:
    """A server that answers each request (its head and body as read) with `answer`'s bytes
    (None: close the connection without a word; after an answer saying Connection: close, it
    closes); the count of connections it accepted."""
    accepted = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                reply = answer(head + body)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
                if b"Connection: close" in reply:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/hook", accepted


def _always(answer: bytes) -> Callable[[bytes], bytes]:
    return lambda request: answer


async def test_a_post_reaches_the_receiver_with_its_query_body_and_content_type(
    receiver: Receiver, client: HttpClient
) -> None:
    """The receiver gets the path, the query (appended to the URL's own) and the JSON body;
    the client returns the answer's status."""
    url = receiver.url + "?own=1"
    query = [("SdkAppid", "1400000000"), ("ClientIP", "::1"), ("Sign", "a b&c")]
    status = await client.post(url, query, b'{"From_Account":"A"}', 2.0)
    assert status == 200
    (got,) = receiver.received
    assert got.path == "/hook"
    assert got.query == {"own": "1", "SdkAppid": "1400000000", "ClientIP": "::1", "Sign": "a b&c"}
    assert got.body == {"From_Account": "A"}


async def test_connections_are_kept_alive_and_reused(
    receiver: Receiver, client: HttpClient
) -> None:
    """Requests one after another share one connection; statuses other than 2xx too."""
    codes = iter([200, 500, 204, 200, 404])
    receiver.answer = lambda body: next(codes)
    statuses = [await client.post(receiver.url, [], b"{}", 2.0) for _ in range(5)]
    assert statuses == [200, 500, 204, 200, 404]
    assert client.connections_opened == 1


async def test_concurrent_requests_are_bounded_by_the_limit(receiver: Receiver) -> None:
    """At most `limit` requests at once, so at most `limit` connections; every one answered."""
    receiver.delay = 0.05
    client = HttpClient(3)
    try:
        statuses = await asyncio.gather(
            *(client.post(receiver.url, [], b"{}", 5.0) for _ in range(12))
        )
    finally:
        await client.close()
    assert statuses == [200] * 12
    assert client.connections_opened == 3


async def test_chunked_and_unsized_answers_are_read_through_their_end(
    client: HttpClient,
) -> None:
    """A chunked answer leaves the connection reusable; an answer without a length ends with
    its connection, and the next request opens another."""

    async def chunked(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=201)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b'{"ActionStatus":', b'"OK"', b"}" * 5000):
            await response.write(part)
        await response.write_eof()
        return response

    runner, url = await _app(chunked)
    try:
        assert [await client.post(url, [], b"{}", 2.0) for _ in range(3)] == [201] * 3
        assert client.connections_opened == 1
    finally:
        await runner.cleanup()

    server, url, accepted = await _raw(
        lambda request: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nno length here"
    )
    try:
        assert [await client.post(url, [], b"{}", 2.0) for _ in range(2)] == [200, 200]
        assert accepted[0] == 2
    finally:
        server.close()


async def test_connection_close_and_http_1_0_answers_are_not_reused(client: HttpClient) -> None:
    """`Connection: close`, or HTTP/1.0 without keep-alive: a new connection per request."""
    answers = iter(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.0 202 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ]
    )
    server, url, accepted = await _raw(lambda request: next(answers))
    try:
        statuses = [await client.post(url, [], b"{}", 2.0) for _ in range(4)]
    finally:
        server.close()
    assert statuses == [200, 200, 202, 200]
    assert accepted[0] == 3  # the third answer kept its connection for the fourth


async def test_interim_answers_are_skipped(client: HttpClient) -> None:
    """A 100 Continue before the answer is not the answer."""
    server, url, _ = await _raw(
        lambda request: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    )
    try:
        assert await client.post(url, [], b"{}", 2.0) == 200
    finally:
        server.close()


async def test_redirects_are_answers_not_followed(client: HttpClient) -> None:
    """A 3xx is returned as it is: the client never sends the webhook elsewhere."""
    hits: list[str] = []

    async def redirect(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        raise web.HTTPFound("/elsewhere")

    runner, url = await _app(redirect)
    try:
        assert await client.post(url, [], b"{}", 2.0) == 302
    finally:
        await runner.cleanup()
    assert hits == ["/hook"]


async def test_an_answer_that_does_not_come_in_time_raises_timeout(
    receiver: Receiver, client: HttpClient
) -> None:
    """The time limit covers the whole request; the connection is not reused after it."""
    receiver.delay = 1.0
    with pytest.raises(TimeoutError):
        await client.post(receiver.url, [], b"{}", 0.2)
    receiver.delay = 0.0
    assert await client.post(receiver.url, [], b"{}", 2.0) == 200
    assert client.connections_opened == 2


async def test_requests_on_the_wire_together_each_run_out_at_their_own_limit(
    receiver: Receiver, client: HttpClient
) -> None:
    """Concurrent requests with different time limits: a later request with a shorter limit
    times out first, the one before it at its own limit, and one with room gets its answer."""
    receiver.delay = 1.2

    ended: list[str] = []

    async def post(name: str, limit: float) -> None:
        try:
            ended.append(f"{name} {await client.post(receiver.url, [], b'{}', limit)}")
        except TimeoutError:
            ended.append(f"{name} timeout")

    first = asyncio.create_task(post("first", 0.6))
    await asyncio.sleep(0)
    await asyncio.gather(first, post("second", 0.15), post("roomy", 3.0))
    assert ended == ["second timeout", "first timeout", "roomy 200"]


async def test_no_connection_and_broken_answers_raise_http_error(client: HttpClient) -> None:
    """Refused connections, garbage, an oversized body and a connection closed mid-answer
    are errors the sender retries later, not statuses."""
    server, url, _ = await _raw(lambda request: None)
    server.close()
    await server.wait_closed()
    with pytest.raises(HttpError):
        await client.post(url, [], b"{}", 2.0)

    for answer in (
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1),
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    ):
        server, url, _ = await _raw(_always(answer))
        try:
            with pytest.raises(HttpError):
                await client.post(url, [], b"{}", 2.0)
        finally:
            server.close()


async def test_a_reused_connection_closed_by_the_receiver_is_replaced(
    client: HttpClient,
) -> None:
    """A connection the receiver closed while it was idle is not used again; one it closes
    under the next request before an answer byte (its idle timeout crossing the request) is
    replaced and the request sent again once, on a new connection."""
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = len(connections)
        connections.append(0)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(2)
                connections[number] += 1
                if number == 1 and connections[number] == 2:
                    break  # close under the second request, not a byte answered
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                if number == 0:
                    break  # close after the answer, unannounced: found closed while idle
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    try:
        assert await client.post(url, [], b"{}", 2.0) == 200
        await asyncio.sleep(0.1)  # the receiver's close arrives while the connection is idle
        assert await client.post(url, [], b"{}", 2.0) == 200  # connection 1
        assert await client.post(url, [], b"{}", 2.0) == 200  # closed under it: connection 2
    finally:
        server.close()
    assert connections == [1, 2, 1]
    assert client.connections_opened == 3


async def test_https_checks_the_certificate(tmp_path: Path) -> None:
    """https through ssl: a receiver whose certificate the given CA signed is answered; the
    default context (system CAs) refuses the same throwaway certificate."""
    ca = Authority("webhook test CA")
    issued = ca.issue("localhost", server=True)
    (tmp_path / "cert.pem").write_bytes(issued.cert)
    (tmp_path / "key.pem").write_bytes(issued.key)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")

    async def ok(request: web.Request) -> web.StreamResponse:
        return web.json_response({"ActionStatus": "OK"}, status=200)

    runner, url = await _app(ok, server_context)
    trusting = HttpClient(2, ssl_context=ssl.create_default_context(cadata=ca.pem.decode()))
    default = HttpClient(2)
    try:
        assert [await trusting.post(url, [], b"{}", 5.0) for _ in range(2)] == [200, 200]
        assert trusting.connections_opened == 1
        with pytest.raises(HttpError):
            await default.post(url, [], b"{}", 5.0)
    finally:
        await trusting.close()
        await default.close()
        await runner.cleanup()


def test_targets_split_urls_once() -> None:
    """Host header with the port only when it is not the scheme's default; IPv6 in brackets;
    the URL's own query kept; anything but http(s) refused."""
    t = Target.parse("https://example.com/cb?x=1")
    assert (t.host, t.port, t.host_header, t.path, t.has_query) == (
        "example.com",
        443,
        "example.com",
        "/cb?x=1",
        True,
    )
    assert Target.parse("http://[::1]:8080").host_header == "[::1]:8080"
    assert Target.parse("http://[::1]:8080").path == "/"
    with pytest.raises(ValueError, match="http"):
        Target.parse("ftp://example.com/")


def test_query_encoding_matches_urlencode() -> None:
    """The query is form-encoded as urllib.parse.urlencode does it, plain values as they are."""
    query = [("SdkAppid", "1400000000"), ("ClientIP", "::1"), ("Sign", "a b&c/é"), ("e", "")]
    assert encode_query(query) == urlencode(query)


def test_the_client_runs_on_uvloop() -> None:
    """The server runs on uvloop where it is installed (server.runner), whose transports are
    not asyncio's classes: requests are answered and connections reused there too."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> tuple[list[int], int]:
        receiver = Receiver()
        await receiver.start()
        client = HttpClient(2)
        try:
            statuses = [await client.post(receiver.url, [], b"{}", 5.0) for _ in range(3)]
            return statuses, client.connections_opened
        finally:
            await client.close()
            await receiver.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()) == ([200, 200, 200], 1)


def test_answer_headers_are_found_by_name_whatever_their_case() -> None:
    """Content-Length, Transfer-Encoding and Connection are found in any case, the last of
    each wins, and a header whose name only ends like one of them is not taken for it."""
    fields = (
        b"\r\nX-Content-Length: 99\r\ncontent-LENGTH: 5\r\nCONTENT-LENGTH:  12 "
        b"\r\nTransfer-Encoding: gzip, Chunked\r\nConnection: Keep-Alive"
    )
    assert _headers(fields) == (12, True, b"keep-alive")
    assert _headers(b"") == (None, False, b"")
    with pytest.raises(_BadAnswerError):
        _headers(b"\r\nContent-Length: 1x")
