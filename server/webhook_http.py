"""The webhook senders' HTTP/1.1 client: one POST, its answer's status, on kept-alive
connections.

Why not aiohttp's client: a webhook is a small POST whose answer only matters by its status,
and aiohttp's general client (its URL objects, header multidicts, cookie jar, tracing hooks,
response objects and body streams) was about half of the senders' CPU in the events bench.
This client does what a webhook needs and no more, on asyncio's transports:

- Connections per origin (scheme, host, port) are kept alive and reused, one request at a
  time each (no pipelining); at most `limit` requests are on the wire at once (a request
  waits for a slot), so at most `limit` connections per origin are open. An idle connection
  is closed after `idle_seconds`, or dropped at once when the receiver closed it. A request
  on a reused connection that closes before a byte of the answer comes (the receiver closed
  it idle while the request was on its way) is sent again once on a new connection.
- The answer's body is read (Content-Length, chunked, or up to the end of the connection when
  it says neither) and dropped, so the connection can be reused; its size is bounded
  (MAX_BODY), as are the status line and headers (MAX_HEAD). 1xx answers are skipped.
- One time limit covers the whole request (waiting for a slot, connecting, TLS, sending, the
  answer); a request that runs out closes its connection. The exchange on a connection is
  timed out by one timer per client, set at the earliest deadline on the wire, instead of
  a timeout context per request.
- https through the ssl module (the default context: certificate and host name checked; a
  context of one's own can be given). Redirects are not followed: a 3xx is a failed delivery
  like any other non-2xx, as the hosted service does.
"""

from __future__ import annotations

import asyncio
import collections
import math
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import quote_plus, urlsplit

MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024
USER_AGENT = "follow-server-webhooks"
_TIMER_SLACK = 0.001  # seconds: the timeout timer's deadlines compare with this much room
_PLAIN = re.compile(r"[A-Za-z0-9._~-]*")  # left as they are by application/x-www-form-urlencoded


class HttpError(Exception):
    """The request got no usable answer: no connection, a broken or oversized answer, the
    connection closed under it."""


@dataclass(frozen=True, slots=True)
class Target:
    """A URL split once: where to connect and the request line's target."""

    scheme: str
    host: str
    port: int
    host_header: str
    path: str  # path and the URL's own query, if any
    has_query: bool

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == default else f"{shown}:{port}"
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return cls(parts.scheme, host, port, host_header, path, bool(parts.query))

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port


class _BadAnswerError(Exception):
    """Raised inside the parser: the answer is malformed."""


class _Connection(asyncio.Protocol):
    """One connection: sends a request, parses the answer as its bytes come in."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.used = False  # has answered a request before
        self._buffer = bytearray()
        self._waiter: asyncio.Future[int] | None = None
        self._got_bytes = False
        self._eof = False
        # the answer being parsed
        self._state = "head"
        self._status = 0
        self._length: int | None = None  # None: up to the end of the connection
        self._chunked = False
        self._keep_alive = True
        self._body_read = 0

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not a subclass of asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if self._waiter is None or self._waiter.done():
            self.close()  # bytes nobody asked for: the connection cannot be trusted
            return
        self._buffer += data
        try:
            self._parse()
        except _BadAnswerError as exc:
            self._fail(HttpError(f"bad answer: {exc}"))

    def eof_received(self) -> bool:
        self._eof = True
        self._stream_ended(None)
        self.closed = True
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stream_ended(exc)

    def _stream_ended(self, exc: Exception | None) -> None:
        """The receiver closed: an answer without a length ends here; any other answer in
        progress failed."""
        if self._waiter is None or self._waiter.done():
            return
        if self._state == "body" and self._length is None and not self._chunked:
            self._keep_alive = False
            self._finish()
        else:
            self._fail(self._closed_error(exc))

    # -- requests ----------------------------------------------------------------------

    def _closed_error(self, exc: Exception | None = None) -> HttpError:
        detail = f": {exc}" if exc else ""
        return _UnansweredError(f"connection closed before the answer{detail}", self._got_bytes)

    def request(self, data: bytes) -> asyncio.Future[int]:
        """Send a whole request; the future gets the answer's status once the answer has
        been read through its end."""
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        if self.transport is None or self.closed:
            self._waiter.set_exception(_UnansweredError("connection closed", False))
            return self._waiter
        self._buffer.clear()
        self._got_bytes = False
        self._state = "head"
        self.transport.write(data)
        return self._waiter

    def time_out(self) -> None:
        """The request's time ran out: unless its answer is in, it fails with TimeoutError
        and the connection closes."""
        if self._waiter is not None and not self._waiter.done():
            self._fail(TimeoutError())

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    @property
    def reusable(self) -> bool:
        return self._keep_alive and not self.closed and not self._eof

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()

    def _finish(self) -> None:
        self._state = "done"
        if self._buffer:  # more than the answer: nothing else was asked
            self._keep_alive = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(self._status)

    def _parse(self) -> None:
        """Move through the answer's parts as far as the buffer allows."""
        while (step := _STEPS.get(self._state)) is not None:
            if not step(self):
                return
        if self._state == "end":
            self._finish()

    def _head(self) -> bool:
        """The status line and headers, once all are here (a 1xx answer is skipped)."""
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                raise _BadAnswerError("status line and headers over 64 KiB")
            return False
        head = bytes(self._buffer[:end])
        del self._buffer[: end + 4]
        line_end = head.find(b"\r\n")
        status_line = head if line_end < 0 else head[:line_end]
        version, _, rest = status_line.partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise _BadAnswerError(f"status line {status_line[:80]!r}")
        status = int(code)
        if status < 200:
            return True  # an interim answer: the real one follows
        self._status = status
        length, chunked, connection = _headers(b"" if line_end < 0 else head[line_end:])
        if version == b"HTTP/1.0":
            self._keep_alive = b"keep-alive" in connection
        else:
            self._keep_alive = b"close" not in connection
        self._chunked = chunked
        self._length = None if chunked else length
        if status in (204, 304):
            self._length, self._chunked = 0, False
        if self._length is not None and self._length > MAX_BODY:
            raise _BadAnswerError(f"a body of {self._length} bytes")
        if not self._chunked and self._length is None:
            self._keep_alive = False  # the body runs to the end of the connection
        self._body_read = 0
        self._state = "chunk-size" if self._chunked else "body"
        return True

    def _body(self) -> bool:
        """Drop the body's bytes; the answer ends once all are here (a body without a length
        ends with the connection: eof_received finishes it)."""
        if self._length is None:
            self._body_read += len(self._buffer)
            self._buffer.clear()
            if self._body_read > MAX_BODY:
                raise _BadAnswerError("a body over 1 MiB")
            return False
        take = min(len(self._buffer), self._length - self._body_read)
        del self._buffer[:take]
        self._body_read += take
        if self._body_read < self._length:
            return False
        self._state = "end"
        return True

    def _chunk_size(self) -> bool:
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > 1024:
                raise _BadAnswerError("chunk size line")
            return False
        line = bytes(self._buffer[:end]).split(b";", 1)[0].strip()
        del self._buffer[: end + 2]
        try:
            size = int(line, 16)
        except ValueError:
            raise _BadAnswerError(f"chunk size {line[:20]!r}") from None
        if size < 0:
            raise _BadAnswerError("chunk size")
        self._body_read += size
        if self._body_read > MAX_BODY:
            raise _BadAnswerError("a body over 1 MiB")
        if size == 0:
            self._state = "trailers"
        else:
            self._length = size + 2  # the chunk and its CRLF
            self._state = "chunk-data"
        return True

    def _chunk_data(self) -> bool:
        left = self._length or 0
        take = min(len(self._buffer), left)
        del self._buffer[:take]
        self._length = left - take
        if self._length:
            return False
        self._state = "chunk-size"
        return True

    def _trailers(self) -> bool:
        """The trailer section after the last chunk: lines up to an empty one."""
        while True:
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    raise _BadAnswerError("trailers over 64 KiB")
                return False
            del self._buffer[: end + 2]
            if end == 0:
                self._state = "end"
                return True


# The parser's steps by state (made once: a dict of bound methods per data_received was not
# free); each says whether to go on (False: it waits for more bytes).
_STEPS: dict[str, Callable[[_Connection], bool]] = {
    "head": _Connection._head,
    "body": _Connection._body,
    "chunk-size": _Connection._chunk_size,
    "chunk-data": _Connection._chunk_data,
    "trailers": _Connection._trailers,
}


def encode_query(query: list[tuple[str, str]]) -> str:
    """`name=value&...`, form-encoded like urllib.parse.urlencode, without quoting the names
    and values that need none (every callback parameter but an IPv6 ClientIP): urlencode's
    quoting of each was a sixth of a request's CPU here."""
    return "&".join(f"{_form(k)}={_form(v)}" for k, v in query)


def _form(text: str) -> str:
    return text if _PLAIN.fullmatch(text) else quote_plus(text)


def _headers(fields: bytes) -> tuple[int | None, bool, bytes]:
    """(Content-Length, chunked, the Connection header lower-cased) of an answer's header
    lines, `fields` being them with the CRLF before each (the head after its status line).

    The block is lower-cased once and only the three names looked for (the last of each
    wins): splitting it into lines and each line into a name and a value was most of a
    request's parsing CPU. Other header lines are not looked at, malformed or not."""
    fields = fields.lower()
    length: int | None = None
    text = _field(fields, b"\r\ncontent-length:")
    if text is not None:
        if not text.isdigit():
            raise _BadAnswerError(f"Content-Length {text[:20]!r}")
        length = int(text)
    coding = _field(fields, b"\r\ntransfer-encoding:")
    chunked = coding is not None and coding.endswith(b"chunked")
    connection = _field(fields, b"\r\nconnection:") or b""
    return length, chunked, connection


def _field(fields: bytes, name: bytes) -> bytes | None:
    """The value (stripped) of the last header `name` (CRLF, name, colon) in `fields`."""
    start = fields.rfind(name)
    if start < 0:
        return None
    start += len(name)
    end = fields.find(b"\r\n", start)
    return (fields[start:] if end < 0 else fields[start:end]).strip()


class _UnansweredError(HttpError):
    """The connection closed before the answer; `got_bytes`: part of one had come."""

    def __init__(self, message: str, got_bytes: bool) -> None:
        super().__init__(message)
        self.got_bytes = got_bytes


class HttpClient:
    """POSTs on kept-alive connections, at most `limit` at once."""

    def __init__(
        self,
        limit: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        idle_seconds: float = 15.0,
        user_agent: str = USER_AGENT,
    ) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._ssl = ssl_context
        self._idle_seconds = idle_seconds
        self._user_agent = user_agent
        self._idle: dict[tuple[str, str, int], collections.deque[_Connection]] = {}
        self._targets: dict[str, Target] = {}
        # the exchanges on the wire and when each runs out (loop.time()); one timer, at the
        # earliest of them, times them out (see _watch)
        self._deadlines: dict[_Connection, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.connections_opened = 0  # for tests and metrics

    def _target(self, url: str) -> Target:
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = Target.parse(url)
        return target

    async def post(
        self,
        url: str,
        query: list[tuple[str, str]] | str,
        body: bytes,
        time_limit: float,
        content_type: str = "application/json",
    ) -> int:
        """POST `body` to `url` with `query` appended to its own; the answer's status (any,
        3xx included: redirects are not followed). Raises HttpError when there was no
        usable answer, TimeoutError when none came within `time_limit` seconds."""
        target = self._target(url)
        path = target.path
        if query:
            encoded = query if isinstance(query, str) else encode_query(query)
            path += ("&" if target.has_query else "?") + encoded
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
            f"User-Agent: {self._user_agent}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nAccept: */*\r\n\r\n"
        )
        data = head.encode("latin-1") + body
        deadline = asyncio.get_running_loop().time() + time_limit
        # The common case, a free slot and a kept-alive connection, runs without a timeout
        # context (an asyncio.timeout per request was a tenth of the senders' CPU): the
        # exchange's deadline is watched by the client's one timer; waiting for a slot and
        # connecting, rarer, are under asyncio.timeout_at.
        slots = self._slots
        if slots.locked():
            async with asyncio.timeout_at(deadline):
                await slots.acquire()
        else:
            await slots.acquire()  # returns at once
        try:
            conn = self._take(target)
            if conn is not None:
                try:
                    return await self._exchange(target, conn, data, deadline)
                except _UnansweredError as exc:
                    if exc.got_bytes:
                        raise
                # the receiver had closed this idle connection: once more, on a new one
            async with asyncio.timeout_at(deadline):
                conn = await self._connect(target)
            return await self._exchange(target, conn, data, deadline)
        finally:
            slots.release()

    async def _exchange(
        self, target: Target, conn: _Connection, data: bytes, deadline: float
    ) -> int:
        waiter = conn.request(data)
        self._watch(conn, deadline)
        try:
            status = await waiter
        except BaseException:
            conn.close()
            raise
        finally:
            del self._deadlines[conn]
        if conn.reusable:
            conn.used = True
            conn.idle_since = time.monotonic()
            self._idle.setdefault(target.origin, collections.deque()).append(conn)
        else:
            conn.close()
        return status

    def _watch(self, conn: _Connection, deadline: float) -> None:
        """Time the exchange on `conn` out at `deadline` (loop.time()). The timer is moved
        only to an earlier deadline; with one time limit for all requests a new one's is
        later, so a timer serves every request on the wire until it fires (_expire)."""
        self._deadlines[conn] = deadline
        if deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_at(deadline, self._expire)
            self._timer_at = deadline

    def _expire(self) -> None:
        """Fail the exchanges past their deadline with TimeoutError (closing their
        connections); set the timer for the earliest of the rest."""
        self._timer, self._timer_at = None, math.inf
        loop = asyncio.get_running_loop()
        now = loop.time() + _TIMER_SLACK  # a timer may fire a hair before its time
        later = math.inf
        for conn, deadline in list(self._deadlines.items()):
            if deadline <= now:
                conn.time_out()
            else:
                later = min(later, deadline)
        if later < math.inf:
            self._timer = loop.call_at(later, self._expire)
            self._timer_at = later

    def _take(self, target: Target) -> _Connection | None:
        """The most recently used idle connection to the target's origin still open; older
        idle ones past idle_seconds are closed."""
        idle = self._idle.get(target.origin)
        if not idle:
            return None
        now = time.monotonic()
        while idle and (idle[0].closed or now - idle[0].idle_since > self._idle_seconds):
            idle.popleft().close()
        while idle:
            conn = idle.pop()
            if conn.reusable:
                return conn
            conn.close()
        return None

    async def _connect(self, target: Target) -> _Connection:
        loop = asyncio.get_running_loop()
        context: ssl.SSLContext | None = None
        if target.scheme == "https":
            if self._ssl is None:  # made once: loading the system's CAs is not cheap
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            _, conn = await loop.create_connection(
                _Connection,
                target.host,
                target.port,
                ssl=context,
                server_hostname=target.host if context is not None else None,
            )
        except OSError as exc:  # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
            raise HttpError(f"{type(exc).__name__}: {exc}") from exc
        self.connections_opened += 1
        return conn

    async def close(self) -> None:
        """Close every connection (a request still running fails)."""
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        for conn in list(self._deadlines):
            conn.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        await asyncio.sleep(0)  # let the transports close
