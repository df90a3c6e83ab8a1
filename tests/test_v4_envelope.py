"""server/v4/envelope.py: query parameters, UserSig over HTTP, the JSON body, the response
shape. Over real HTTP against the real service unless marked as a unit test."""

from __future__ import annotations

import pytest
from TLSSigAPIv2 import TLSSigAPIv2

from server.v4.envelope import Authenticator, V4Error, parse_body
from tests.v4_helpers import ADMIN, APP, KEY, ShimFactory, V4Client, envelope_query

pytest_plugins = ["tests.v4_fixtures"]

BODY = {"From_Account": "a", "To_Account": ["b"]}


@pytest.mark.parametrize("name", ["sdkappid", "identifier", "usersig", "random", "contenttype"])
async def test_missing_query_parameter_is_60002(v4: V4Client, name: str) -> None:
    """Each of the five envelope parameters is required; without it: 60002 naming it."""
    code, info = await v4.fail("follow_check", BODY, query=envelope_query(**{name: ""}))
    assert code == 60002
    assert name in info


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("sdkappid", "abc"),
        ("sdkappid", "-1"),
        ("sdkappid", "1e9"),
        ("sdkappid", "99999999999999999999999"),
        ("random", "4294967296"),
        ("random", "-5"),
        ("random", "x"),
        ("contenttype", "xml"),
    ],
)
async def test_malformed_query_parameter_is_60002(v4: V4Client, name: str, value: str) -> None:
    """A non-integer or out-of-range sdkappid/random, or a contenttype other than json: 60002."""
    code, info = await v4.fail("follow_check", BODY, query=envelope_query(**{name: value}))
    assert code == 60002
    assert name in info


async def test_random_range_edges_are_accepted(v4: V4Client) -> None:
    """random 0 and 4294967295 are valid u32 values."""
    for value in ("0", "4294967295"):
        payload = await v4.post(
            "account_check", {"CheckItem": [{"UserID": "x"}]}, query=envelope_query(random=value)
        )
        assert payload["ActionStatus"] == "OK", payload


async def test_other_sdkappid_is_60006(v4: V4Client) -> None:
    """A well-formed sdkappid that this deployment does not serve: 60006."""
    code, info = await v4.fail("follow_check", BODY, query=envelope_query(sdkappid=str(APP + 1)))
    assert code == 60006
    assert str(APP + 1) in info


async def test_non_admin_identifier_is_60010(v4: V4Client) -> None:
    """An identifier outside --admin, with a valid UserSig of its own, is refused: 60010."""
    sig = TLSSigAPIv2(APP, KEY).gen_sig("mallory")
    code, info = await v4.fail(
        "follow_check", BODY, query=envelope_query(identifier="mallory", usersig=sig)
    )
    assert code == 60010
    assert "mallory" in info


@pytest.mark.parametrize("identifier", ["administrator", "ops", "mallory"])
async def test_without_a_valid_usersig_admins_and_others_look_alike(
    v4: V4Client, identifier: str
) -> None:
    """The UserSig is checked before the admin list: without a valid one, an admin and a
    stranger get the same answer, so nobody learns which identifiers are admins."""
    forged = TLSSigAPIv2(APP, "not-the-key").gen_sig(identifier)
    code, _ = await v4.fail(
        "follow_check", BODY, query=envelope_query(identifier=identifier, usersig=forged)
    )
    assert code == 70009


async def test_second_admin_is_accepted(v4: V4Client) -> None:
    """Every configured admin may call, with a UserSig of its own."""
    sig = TLSSigAPIv2(APP, KEY).gen_sig("ops")
    payload = await v4.post(
        "account_check",
        {"CheckItem": [{"UserID": "x"}]},
        query=envelope_query(identifier="ops", usersig=sig),
    )
    assert payload["ActionStatus"] == "OK", payload


def _sig(kind: str) -> str:
    good = str(TLSSigAPIv2(APP, KEY).gen_sig(ADMIN))
    sigs: dict[str, str] = {
        "expired": TLSSigAPIv2(APP, KEY).gen_sig(ADMIN, expire=-10),
        "wrong key": TLSSigAPIv2(APP, KEY[::-1]).gen_sig(ADMIN),
        "wrong identifier": TLSSigAPIv2(APP, KEY).gen_sig("ops"),
        "wrong sdkappid": TLSSigAPIv2(APP + 7, KEY).gen_sig(ADMIN),
        "truncated": good[: len(good) // 2],
        "garbage": "definitely-not-a-usersig",
    }
    return sigs[kind]


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("expired", 70001),
        ("wrong key", 70009),
        ("wrong identifier", 70013),
        ("wrong sdkappid", 70014),
        ("truncated", 70003),
        ("garbage", 70003),
    ],
)
async def test_bad_usersig_codes(v4: V4Client, kind: str, code: int) -> None:
    """UserSigs from tls-sig-api-v2 that must not authenticate get the spec's 700xx code."""
    got, info = await v4.fail("follow_check", BODY, query=envelope_query(usersig=_sig(kind)))
    assert got == code, info
    assert "usersig" in info


async def test_valid_usersig_reaches_the_core(v4: V4Client) -> None:
    """A valid UserSig passes; the answer then comes from the core (unknown user: 30003)."""
    code, info = await v4.fail("follow_check", BODY)
    assert code == 30003
    assert "From_Account" in info


async def test_not_json_is_60003(v4: V4Client) -> None:
    """A body that is not JSON at all (or empty) is 60003."""
    for raw in (b"{not json", b"", b'{"a":1e999}', b"[1,"):
        code, info = await v4.fail("follow_check", data=raw)
        assert code == 60003, raw
        assert "JSON" in info


async def test_invalid_utf8_is_60003(v4: V4Client) -> None:
    """Bytes that are not UTF-8 inside an otherwise JSON body are 60003, said as such."""
    code, info = await v4.fail("follow_check", data=b'{"From_Account":"\xff\xfe"}')
    assert code == 60003
    assert "UTF-8" in info


@pytest.mark.parametrize("raw", [b"[]", b"1", b'"x"', b"null", b"true"])
async def test_body_not_an_object_is_30001(v4: V4Client, raw: bytes) -> None:
    """Valid JSON that is not an object is the wrong JSON type: 30001."""
    code, info = await v4.fail("follow_check", data=raw)
    assert code == 30001
    assert "object" in info


async def test_insecure_mode_skips_usersig(make_shim: ShimFactory) -> None:
    """--insecure-no-auth: no usersig needed; sdkappid and admin are still checked."""
    client = await make_shim(insecure_no_auth=True, secret_key=None)
    payload = await client.post(
        "account_check", {"CheckItem": [{"UserID": "x"}]}, query=envelope_query(usersig="")
    )
    assert payload["ActionStatus"] == "OK", payload
    code, _ = await client.fail(
        "account_check", {"CheckItem": []}, query=envelope_query(identifier="mallory")
    )
    assert code == 60010


# -- unit tests ----------------------------------------------------------------------------


def test_parse_body_unit() -> None:
    """Unit: parse_body returns objects and maps the failures to 60003 / 30001."""
    assert parse_body(b'{"a": [1]}') == {"a": [1]}
    for raw, code in ((b"\x80", 60003), (b"{", 60003), (b"[]", 30001)):
        with pytest.raises(V4Error) as caught:
            parse_body(raw)
        assert caught.value.code == code


def test_authenticator_order_unit() -> None:
    """Unit: parameters are checked before sdkappid, sdkappid before the sig, the sig before
    the admin list."""
    auth = Authenticator(APP, frozenset({ADMIN}), None)
    query = envelope_query(sdkappid=str(APP + 1), identifier="x", random="no")
    with pytest.raises(V4Error) as caught:
        auth.check(query)
    assert caught.value.code == 60002
    query = envelope_query(sdkappid=str(APP + 1), identifier="x")
    with pytest.raises(V4Error) as caught:
        auth.check(query)
    assert caught.value.code == 60006
    assert auth.check(envelope_query()) == ADMIN
