"""Clients and helpers for the v4 shim tests: HTTP clients that insist on the envelope,
UserSigs from tls-sig-api-v2, and the service + shim on a background thread for synchronous
callers. The fixtures are in tests/v4_fixtures.py (load it with pytest_plugins).
"""

from __future__ import annotations

import http.client
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from TLSSigAPIv2 import TLSSigAPIv2

from server.config import Settings

APP = 1400000000
KEY = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e"
ADMIN = "administrator"
SETTINGS = Settings(
    grpc_listen="127.0.0.1:0",
    http_listen="127.0.0.1:0",
    sdkappid=APP,
    secret_key=KEY,
    admins=(ADMIN, "ops"),
    grace_seconds=1.0,
)
ACCOUNT_COMMANDS = frozenset(
    {"account_import", "multiaccount_import", "account_check", "account_delete"}
)
ENVELOPE_KEYS = ("ActionStatus", "ErrorCode", "ErrorInfo", "ErrorDisplay")
_SIG = TLSSigAPIv2(APP, KEY).gen_sig(ADMIN)

Json = dict[str, Any]


def command_path(command: str) -> str:
    """/v4/<service>/<command> for a command name."""
    service = "im_open_login_svc" if command in ACCOUNT_COMMANDS else "follow"
    return f"/v4/{service}/{command}"


def envelope_query(**overrides: str) -> dict[str, str]:
    """Valid query parameters for ADMIN, with some replaced (or removed when given "")."""
    query = {
        "sdkappid": str(APP),
        "identifier": ADMIN,
        "usersig": _SIG,
        "random": "12345",
        "contenttype": "json",
    }
    query.update(overrides)
    return {k: v for k, v in query.items() if v != "" or k not in overrides}


def assert_envelope(payload: object) -> Json:
    """The body is a JSON object with the four envelope fields, consistent with each other."""
    assert isinstance(payload, dict), payload
    for key in ENVELOPE_KEYS:
        assert key in payload, (key, payload)
    assert payload["ActionStatus"] in ("OK", "FAIL"), payload
    assert isinstance(payload["ErrorCode"], int), payload
    assert isinstance(payload["ErrorInfo"], str), payload
    assert payload["ErrorDisplay"] == "", payload
    if payload["ActionStatus"] == "OK":
        assert payload["ErrorCode"] == 0, payload
        assert payload["ErrorInfo"] == "", payload
    else:
        assert payload["ErrorCode"] != 0, payload
        assert payload["ErrorInfo"], payload
    return payload


class V4Client:
    """Calls the shim over HTTP; every answer must be HTTP 200 with the envelope."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"

    async def post(
        self,
        command: str,
        body: object = None,
        *,
        data: bytes | None = None,
        query: dict[str, str] | None = None,
        path: str | None = None,
    ) -> Json:
        raw = data if data is not None else orjson.dumps(body)
        async with self.session.post(
            self.base + (path or command_path(command)),
            params=envelope_query() if query is None else query,
            data=raw,
            headers={"Content-Type": "application/json"},
        ) as response:
            assert response.status == 200, await response.text()
            assert response.content_type == "application/json"
            return assert_envelope(orjson.loads(await response.read()))

    async def ok(self, command: str, body: object) -> Json:
        payload = await self.post(command, body)
        assert payload["ActionStatus"] == "OK", payload
        return payload

    async def fail(self, command: str, body: object = None, **kwargs: Any) -> tuple[int, str]:
        """(ErrorCode, ErrorInfo) of a request that must fail as a whole."""
        payload = await self.post(command, body, **kwargs)
        assert payload["ActionStatus"] == "FAIL", payload
        return payload["ErrorCode"], payload["ErrorInfo"]

    async def import_users(self, *users: str) -> None:
        for start in range(0, len(users), 100):
            chunk = list(users[start : start + 100])
            payload = await self.ok("multiaccount_import", {"Accounts": chunk})
            assert payload["FailAccounts"] == []


ShimFactory = Callable[..., Awaitable[V4Client]]


class SyncClient:
    """A blocking keep-alive HTTP client of the shim."""

    def __init__(self, port: int) -> None:
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self._query = "&".join(f"{k}={v}" for k, v in envelope_query().items())

    def post(self, command: str, body: object) -> Json:
        self._conn.request(
            "POST",
            f"{command_path(command)}?{self._query}",
            body=orjson.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        response = self._conn.getresponse()
        raw = response.read()
        assert response.status == 200, raw
        return assert_envelope(orjson.loads(raw))

    def close(self) -> None:
        self._conn.close()
