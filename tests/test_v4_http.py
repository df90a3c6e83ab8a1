"""server/v4/http.py: routing, the body limit, never a 500, the OpenAPI document, the
shim's settings and its life inside `follow-server`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from server.app import RunningService
from server.config import parse_settings
from server.v4 import commands
from server.v4.backend import Backend
from server.v4.commands import Body, Command
from tests.v4_helpers import (
    APP,
    KEY,
    SETTINGS,
    ShimFactory,
    V4Client,
    assert_envelope,
    command_path,
    envelope_query,
)

pytest_plugins = ["tests.v4_fixtures"]

SMALL = 1000


async def _raw_exchange(port: int, head: bytes, body: bytes) -> tuple[bytes, bool]:
    """Send raw HTTP; the response, and whether the server closed the connection after it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(65536), 5)
        closed = await asyncio.wait_for(reader.read(1), 5) == b""
        return response, closed
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _query_string() -> str:
    return "&".join(f"{k}={v}" for k, v in envelope_query().items())


async def test_oversized_body_refused_by_content_length(make_shim: ShimFactory) -> None:
    """A Content-Length over --max-body-bytes is refused with 60002 at once, without the
    body being sent or read, and the connection is closed."""
    v4 = await make_shim(max_body_bytes=SMALL)
    port = int(v4.base.rsplit(":", 1)[1])
    head = (
        f"POST {command_path('follow_check')}?{_query_string()} HTTP/1.1\r\n"
        f"Host: x\r\nContent-Type: application/json\r\nContent-Length: {50 * 1024 * 1024}\r\n\r\n"
    ).encode()
    response, closed = await _raw_exchange(port, head, b'{"From_Account"')
    status, _, rest = response.partition(b"\r\n")
    assert status == b"HTTP/1.1 200 OK"
    payload = assert_envelope(orjson.loads(rest.split(b"\r\n\r\n", 1)[1]))
    assert payload["ErrorCode"] == 60002
    assert f"at most {SMALL} bytes" in payload["ErrorInfo"]
    assert closed


async def test_oversized_chunked_body_refused(make_shim: ShimFactory) -> None:
    """A chunked body (no Content-Length) is read only up to the limit, then refused: 60002."""
    v4 = await make_shim(max_body_bytes=SMALL)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"From_Account": "a", "pad": "'
        for _ in range(100):
            yield b"x" * 100
        yield b'"}'

    async with v4.session.post(
        v4.base + command_path("follow_check"), params=envelope_query(), data=chunks()
    ) as response:
        assert response.status == 200
        payload = assert_envelope(await response.json(content_type=None))
    code, info = payload["ErrorCode"], payload["ErrorInfo"]
    assert code == 60002
    assert str(SMALL) in info


async def test_body_at_the_limit_is_accepted(make_shim: ShimFactory) -> None:
    """A body of exactly --max-body-bytes is read and handled."""
    v4 = await make_shim(max_body_bytes=SMALL)
    raw = b'{"CheckItem":[{"UserID":"a"}]}'
    raw = raw + b" " * (SMALL - len(raw))
    payload = await v4.post("account_check", data=raw)
    assert payload["ActionStatus"] == "OK", payload


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v4/follow/follow_nothing"),
        ("POST", "/v4/unknown_svc/follow_add"),
        ("POST", "/v4/follow/follow_add/extra"),
        ("POST", "/other"),
        ("GET", "/v4/follow/follow_add"),
        ("PUT", "/v4/follow/follow_add"),
    ],
)
async def test_unknown_command_is_60009(v4: V4Client, method: str, path: str) -> None:
    """Anything but POST of a known command answers 200 with 60009 naming the path."""
    async with v4.session.request(method, v4.base + path, params=envelope_query()) as response:
        assert response.status == 200
        payload = assert_envelope(await response.json(content_type=None))
    assert payload["ErrorCode"] == 60009
    assert path in payload["ErrorInfo"]
    # ... and lists what would have worked.
    for name in commands.COMMANDS:
        assert f"POST /v4/{name}" in payload["ErrorInfo"]


async def test_openapi_document_is_served(v4: V4Client) -> None:
    """GET /v4/openapi.yaml returns the repository's OpenAPI 3 document, its `servers`
    entry the address the request came to (not a fixed 127.0.0.1:8080)."""
    async with v4.session.get(v4.base + "/v4/openapi.yaml") as response:
        assert response.status == 200
        text = await response.text()
    assert text.startswith("openapi: 3")
    shipped = (Path(commands.__file__).parent / "openapi.yaml").read_text()
    assert "  - url: http://127.0.0.1:8080\n" in shipped
    assert text == shipped.replace("  - url: http://127.0.0.1:8080\n", f"  - url: {v4.base}\n")


async def test_openapi_servers_entry_ignores_a_hostile_host_header(v4: V4Client) -> None:
    """A Host header that is not a plain host[:port] is not echoed into the document."""
    async with v4.session.get(
        v4.base + "/v4/openapi.yaml", headers={"Host": "evil/  - url: x"}
    ) as response:
        text = await response.text()
    assert f"  - url: {v4.base}\n" in text
    assert "evil" not in text


async def test_grpc_client_on_the_v4_port_is_one_warning_line(
    v4: V4Client, caplog: pytest.LogCaptureFixture
) -> None:
    """An HTTP/2 connection preface (what a gRPC client sends) gets aiohttp's 400 and one
    WARNING line naming the likely cause, not an ERROR with a traceback."""
    port = int(v4.base.rsplit(":", 1)[1])
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        response, _ = await _raw_exchange(port, preface, b"")
        await asyncio.sleep(0.1)
    assert response.startswith(b"HTTP/1.0 400") or response.startswith(b"HTTP/1.1 400")
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert [r.levelname for r in records] == ["WARNING"], caplog.text
    assert "gRPC client?" in records[0].getMessage()
    assert records[0].exc_info is None


async def test_unexpected_exception_is_30006_not_500(
    make_shim: ShimFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a command answers HTTP 200 with 30006 and leaves a log line with the cause."""

    async def broken(backend: Backend, body: Body) -> Body:
        raise RuntimeError("boom")

    monkeypatch.setitem(commands.COMMANDS, "follow/follow_check", Command(broken, {}))
    v4 = await make_shim()
    code, info = await v4.fail("follow_check", {"From_Account": "a", "To_Account": ["b"]})
    assert code == 30006
    assert "boom" not in info
    assert any("boom" in (r.exc_text or "") for r in caplog.records)


async def test_secret_key_never_logged(
    make_shim: ShimFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Starting the shim and failing signatures log nothing that contains the key."""
    caplog.set_level(logging.DEBUG)
    v4 = await make_shim()
    await v4.fail("follow_check", {}, query=envelope_query(usersig="garbage"))
    assert "v4 shim listening" in caplog.text
    assert KEY not in caplog.text
    assert KEY not in repr(SETTINGS)


async def test_insecure_mode_warns_loudly(
    make_shim: ShimFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """--insecure-no-auth logs a WARNING that says authentication is off."""
    await make_shim(insecure_no_auth=True, secret_key=None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("WITHOUT AUTHENTICATION" in w for w in warnings)


# -- settings ------------------------------------------------------------------------------


def test_settings_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shim's flags and FOLLOW_* variables land in Settings; --admin repeats."""
    for name in ("FOLLOW_SECRET_KEY", "FOLLOW_ADMIN", "FOLLOW_SDKAPPID", "FOLLOW_HTTP_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    s = parse_settings(
        [
            *("--sdkappid", "7", "--secret-key", "k", "--admin", "a", "--admin", "b"),
            *("--http-listen", "127.0.0.1:9", "--max-body-bytes", "10"),
        ]
    )
    assert (s.sdkappid, s.secret_key, s.admins, s.http_listen, s.max_body_bytes) == (
        7, "k", ("a", "b"), "127.0.0.1:9", 10,
    )  # fmt: skip
    assert parse_settings(["--sdkappid", "7", "--secret-key", "k"]).admins == ("administrator",)
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert parse_settings(["--sdkappid", "7", "--secret-key-file", str(key_file)]).secret_key == (
        "from-file"
    )
    monkeypatch.setenv("FOLLOW_SECRET_KEY", "from-env")
    monkeypatch.setenv("FOLLOW_ADMIN", "x,y")
    monkeypatch.setenv("FOLLOW_SDKAPPID", "9")
    s = parse_settings([])
    assert (s.secret_key, s.admins, s.sdkappid) == ("from-env", ("x", "y"), 9)
    assert parse_settings(["--http-listen", ""]).http_listen == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sdkappid", "1"], "needs --sdkappid and --secret-key"),
        (["--secret-key", "k"], "needs --sdkappid and --secret-key"),
        (["--sdkappid", "1", "--secret-key", "k", "--secret-key-file", "/x"], "not both"),
        (["--sdkappid", "1", "--secret-key-file", "/nonexistent/key"], "cannot read"),
        (["--grpc-target", "h:1", "--http-listen", "", "--insecure-no-auth"], "--http-listen"),
    ],
)
def test_settings_refuse_to_run_open(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a key (and not --insecure-no-auth) the shim refuses to start: exit 2 and a
    clear message."""
    for name in ("FOLLOW_SECRET_KEY", "FOLLOW_SDKAPPID", "FOLLOW_SECRET_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as caught:
        parse_settings(argv)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_insecure_or_disabled_needs_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """--insecure-no-auth, or --http-listen '', start without a key."""
    monkeypatch.delenv("FOLLOW_SECRET_KEY", raising=False)
    assert parse_settings(["--insecure-no-auth"]).insecure_no_auth
    assert parse_settings(["--http-listen", ""]).secret_key is None


# -- inside follow-server ------------------------------------------------------------------


async def _start_server(*args: str) -> tuple[asyncio.subprocess.Process, int]:
    """`follow-server ARGS` as a child process; its v4 port, read from its log."""
    env = {**os.environ, "FOLLOW_SECRET_KEY": KEY}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        *args,
        "--sdkappid",
        str(APP),
        "--http-listen",
        "127.0.0.1:0",
        "--grace-seconds",
        "1",
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        assert line, "".join(lines)
        lines.append(line)
        assert KEY not in line
        found = re.search(r"v4 shim listening on http://127\.0\.0\.1:(\d+)", line)
        if found:
            return proc, int(found.group(1))


async def _stop_server(proc: asyncio.subprocess.Process) -> str:
    proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    rest = (await asyncio.wait_for(proc.stderr.read(), 30)).decode()
    assert await proc.wait() == 0, rest
    assert KEY not in rest
    return rest


async def test_follow_server_runs_the_shim(db_url: str) -> None:
    """`follow-server` starts the shim beside gRPC, serves v4 calls, and stops on SIGTERM."""
    proc, port = await _start_server("--database-url", db_url, "--grpc-listen", "127.0.0.1:0")
    try:
        async with aiohttp.ClientSession() as session:
            v4 = V4Client(session, port)
            await v4.import_users("a", "b")
            await v4.ok("follow_add", {"From_Account": "a", "FollowItem": [{"To_Account": "b"}]})
            check = await v4.ok("follow_check", {"From_Account": "b", "To_Account": ["a"]})
            assert check["ResultItem"][0]["FollowType"] == 1
    finally:
        log = await _stop_server(proc)
    assert "stopped" in log


async def test_follow_server_standalone_shim(service: RunningService) -> None:
    """`follow-server --grpc-target HOST:PORT` runs only the shim, against that gRPC server."""
    proc, port = await _start_server("--grpc-target", f"127.0.0.1:{service.port}")
    try:
        async with aiohttp.ClientSession() as session:
            v4 = V4Client(session, port)
            await v4.import_users("a")
            info = await v4.ok("follow_get_info", {"From_Account": "a", "To_Account": ["a"]})
            assert info["FollowInfo"][0]["FollowerCount"] == 0
    finally:
        log = await _stop_server(proc)
    assert "database" not in log
