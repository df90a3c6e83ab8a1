"""What one webhook looks like on the wire, as the hosted service sends it: the command and
JSON body made from an outbox row, and the query string (SdkAppid, CallbackCommand,
contenttype, ClientIP, OptPlatform, and with a token RequestTime and Sign).

One call is one webhook: a Follow call that followed B and C is one
Follow.CallbackAfterFollowAdd listing both. An account deletion sends nothing: the hosted
service has no callback for it (its relationship chain goes with the account, silently), so a
receiver learns of it the way it does there, from the account system.
"""

from __future__ import annotations

import hashlib

import orjson

from server.outbox import FOLLOWED, UNFOLLOWED, OutboxRow

FOLLOW_ADD = "Follow.CallbackAfterFollowAdd"
FOLLOW_DELETE = "Follow.CallbackAfterFollowDelete"


def command_and_body(row: OutboxRow) -> tuple[str, str] | None:
    """The callback command and JSON body for one change event; None for an event that sends
    no webhook (an account deletion)."""
    event_ms = row.at_us // 1000
    if row.kind == FOLLOWED:
        body: dict[str, object] = {
            "CallbackCommand": FOLLOW_ADD,
            "From_Account": row.user_id,
            "FollowList": [{"To_Account": other} for other in row.others],
            "EventTime": event_ms,
        }
        return FOLLOW_ADD, orjson.dumps(body).decode()
    if row.kind == UNFOLLOWED:
        body = {
            "CallbackCommand": FOLLOW_DELETE,
            "From_Account": row.user_id,
            "To_Account": list(row.others),
            "EventTime": event_ms,
        }
        return FOLLOW_DELETE, orjson.dumps(body).decode()
    return None


def sign(token: str, request_time: int) -> str:
    """The hosted service's callback signature: lower-case hex sha256(token + RequestTime)."""
    return hashlib.sha256(f"{token}{request_time}".encode()).hexdigest()


def query(
    sdkappid: int,
    command: str,
    client_ip: str,
    platform: str,
    token: str | None,
    request_time: int,
) -> list[tuple[str, str]]:
    """The callback's query parameters, in the hosted service's order (appended to the
    configured URL's own query, if it has one)."""
    params = [
        ("SdkAppid", str(sdkappid)),
        ("CallbackCommand", command),
        ("contenttype", "json"),
        ("ClientIP", client_ip),
        ("OptPlatform", platform),
    ]
    if token:
        params += [("RequestTime", str(request_time)), ("Sign", sign(token, request_time))]
    return params
