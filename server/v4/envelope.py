"""The v4 envelope: query parameters and authentication, the JSON body, the response shape.

These are the only checks the shim makes itself; everything about follows and accounts
is the core's to decide (through the gRPC contract).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from server.v4.usersig import UserSigError, UserSigVerifier

PARAM_ERROR = 30001
INTERNAL_ERROR = 30006
HTTP_PARSE_ERROR = 60002
NOT_JSON = 60003
SDKAPPID_INVALID = 60006
UNKNOWN_COMMAND = 60009
NOT_ADMIN = 60010
ACCOUNT_TYPE = 60015

MAX_U32 = 2**32 - 1
MAX_U64 = 2**64 - 1

_OK = {"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": "", "ErrorDisplay": ""}


class V4Error(Exception):
    """A request answered with ActionStatus FAIL: `code` is the v4 number, `info` says in
    plain words what was wrong and with which field."""

    def __init__(self, code: int, info: str) -> None:
        super().__init__(info)
        self.code = code
        self.info = info


def ok(body: dict[str, object]) -> bytes:
    """A successful response: `body` plus the envelope fields."""
    body.update(_OK)
    return orjson.dumps(body)


def fail(code: int, info: str) -> bytes:
    return orjson.dumps(
        {"ActionStatus": "FAIL", "ErrorCode": code, "ErrorInfo": info, "ErrorDisplay": ""}
    )


def parse_body(raw: bytes) -> dict[str, object]:
    """The request body as a JSON object: 60003 when it is not JSON (or not UTF-8), 30001
    when it is JSON but not an object."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise V4Error(NOT_JSON, f"request body is not valid UTF-8 (byte {bad.start})") from None
        raise V4Error(NOT_JSON, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise V4Error(PARAM_ERROR, f"request body must be a JSON object, not {json_type(body)}")
    return body


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _param(query: Mapping[str, str], name: str) -> str:
    value = query.get(name)
    if not value:
        raise V4Error(HTTP_PARSE_ERROR, f"query parameter {name} is missing or empty")
    return value


def _unsigned(query: Mapping[str, str], name: str, maximum: int) -> int:
    text = _param(query, name)
    if not (text.isascii() and text.isdigit()) or len(text) > 20 or int(text) > maximum:
        raise V4Error(
            HTTP_PARSE_ERROR,
            f"query parameter {name} must be an unsigned integer at most {maximum}",
        )
    return int(text)


@dataclass(frozen=True, slots=True)
class Authenticator:
    """Checks the query parameters of every call: their form, the app, the UserSig, then
    the admin.

    `verifier` None means --insecure-no-auth: the UserSig is neither required nor checked;
    `sdkappid` None (possible only then) accepts any app id."""

    sdkappid: int | None
    admins: frozenset[str]
    verifier: UserSigVerifier | None

    def check(self, query: Mapping[str, str]) -> str:
        """The calling admin's identifier, or V4Error."""
        sdkappid = _unsigned(query, "sdkappid", MAX_U64)
        identifier = _param(query, "identifier")
        _unsigned(query, "random", MAX_U32)
        if query.get("contenttype") != "json":
            raise V4Error(HTTP_PARSE_ERROR, "query parameter contenttype must be json")
        usersig = query.get("usersig", "")
        if self.verifier is not None and not usersig:
            raise V4Error(HTTP_PARSE_ERROR, "query parameter usersig is missing or empty")
        if self.sdkappid is not None and sdkappid != self.sdkappid:
            raise V4Error(SDKAPPID_INVALID, f"sdkappid {sdkappid} is not served here")
        # The UserSig first: answering 60010 to anyone would tell a stranger which
        # identifiers are admins. Only a caller who proved who they are learns that they
        # are not one.
        if self.verifier is not None:
            try:
                self.verifier.verify(usersig, identifier)
            except UserSigError as exc:
                raise V4Error(exc.code, exc.message) from None
        if identifier not in self.admins:
            raise V4Error(NOT_ADMIN, f"identifier {identifier!r} is not an app administrator")
        return identifier
