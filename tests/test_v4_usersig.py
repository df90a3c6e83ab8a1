"""Unit tests of server/v4/usersig.py against signatures made by the public tls-sig-api-v2."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import zlib

import pytest
from TLSSigAPIv2 import TLSSigAPIv2

from server.v4 import usersig
from server.v4.usersig import UserSigError, UserSigVerifier

APP = 1400000000
KEY = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e"


def _pack(data: object) -> str:
    """Wrap any JSON the way tls-sig-api-v2 wraps a real one."""
    raw = zlib.compress(json.dumps(data).encode())
    return base64.b64encode(raw).decode().replace("+", "*").replace("/", "-").replace("=", "_")


def _code(verifier: UserSigVerifier, sig: str, identifier: str) -> int:
    with pytest.raises(UserSigError) as caught:
        verifier.verify(sig, identifier)
    return caught.value.code


def test_valid_signature_from_public_library_verifies() -> None:
    """A UserSig from tls-sig-api-v2 for the right app, key and identifier is accepted."""
    sig = TLSSigAPIv2(APP, KEY).gen_sig("administrator")
    UserSigVerifier(APP, KEY).verify(sig, "administrator")


def test_signature_with_userbuf_verifies() -> None:
    """The optional TLS.userbuf line is part of the signed content when present."""
    sig = TLSSigAPIv2(APP, KEY).gen_sig_with_userbuf("administrator", 3600, b"abc")
    UserSigVerifier(APP, KEY).verify(sig, "administrator")


def test_expired_signature_is_70001() -> None:
    """A UserSig past time + expire is 70001, even with a good signature."""
    sig = TLSSigAPIv2(APP, KEY).gen_sig("administrator", expire=-1)
    assert _code(UserSigVerifier(APP, KEY), sig, "administrator") == usersig.EXPIRED


def test_signature_expires_while_cached() -> None:
    """A cached valid UserSig stops being accepted once its lifetime ends."""
    now = [1_000_000_000.0]
    sig = _pack(_fields("administrator", APP, int(now[0]), 10))
    verifier = UserSigVerifier(APP, KEY, clock=lambda: now[0])
    verifier.verify(sig, "administrator")
    now[0] += 10
    verifier.verify(sig, "administrator")
    now[0] += 1
    assert _code(verifier, sig, "administrator") == usersig.EXPIRED


def test_wrong_key_is_70009() -> None:
    """A UserSig made with another secret key fails verification: 70009."""
    sig = TLSSigAPIv2(APP, "another-key").gen_sig("administrator")
    assert _code(UserSigVerifier(APP, KEY), sig, "administrator") == usersig.BAD_SIGNATURE


def test_tampered_field_is_70009() -> None:
    """Changing a signed field (a longer expiry) without re-signing is caught: 70009."""
    fields = _fields("administrator", APP, 1_000, 10)
    fields["TLS.expire"] = 10**12
    assert _code(UserSigVerifier(APP, KEY), _pack(fields), "administrator") == 70009


def test_wrong_identifier_is_70013() -> None:
    """A UserSig made for another identifier than the request's is 70013."""
    sig = TLSSigAPIv2(APP, KEY).gen_sig("someone")
    assert _code(UserSigVerifier(APP, KEY), sig, "administrator") == usersig.IDENTIFIER_MISMATCH


def test_cached_signature_still_checks_identifier() -> None:
    """The cache is keyed on the sig, but a cached sig presented for another identifier
    is still 70013."""
    sig = TLSSigAPIv2(APP, KEY).gen_sig("administrator")
    verifier = UserSigVerifier(APP, KEY)
    verifier.verify(sig, "administrator")
    assert _code(verifier, sig, "other") == usersig.IDENTIFIER_MISMATCH


def test_wrong_sdkappid_is_70014() -> None:
    """A UserSig made for another app id is 70014."""
    sig = TLSSigAPIv2(APP + 1, KEY).gen_sig("administrator")
    assert _code(UserSigVerifier(APP, KEY), sig, "administrator") == usersig.SDKAPPID_MISMATCH


@pytest.mark.parametrize("cut", [1, 5, 20, 60])
def test_truncated_signature_is_70003(cut: int) -> None:
    """A UserSig missing its last characters cannot be parsed: 70003."""
    sig = TLSSigAPIv2(APP, KEY).gen_sig("administrator")
    assert _code(UserSigVerifier(APP, KEY), sig[:-cut], "administrator") == usersig.UNPARSABLE


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "x",
        "not a sig!",
        "@@@@",
        "eJzLSM3JyQcABiwCFQ__",
        "*" * 5000,
        base64.b64encode(b"x").decode(),
    ],
)
def test_garbage_is_70003(garbage: str) -> None:
    """Strings that are not base64/zlib/JSON in the UserSig shape are 70003."""
    assert _code(UserSigVerifier(APP, KEY), garbage, "administrator") == usersig.UNPARSABLE


@pytest.mark.parametrize(
    "data",
    [
        [1, 2],
        {"TLS.ver": "1.0"},
        {"TLS.ver": "2.0", "TLS.identifier": 5},
        {"TLS.ver": "2.0", "TLS.identifier": "a", "TLS.sdkappid": "1"},
        {"TLS.ver": "2.0", "TLS.identifier": "a", "TLS.sdkappid": True},
        {**{"TLS.ver": "2.0"}, "TLS.userbuf": 3},
    ],
)
def test_wrong_json_inside_is_70003(data: object) -> None:
    """Valid wrapping around JSON of the wrong shape or types is 70003."""
    assert _code(UserSigVerifier(APP, KEY), _pack(data), "a") == usersig.UNPARSABLE


def test_inflate_is_bounded() -> None:
    """A small UserSig that inflates to a megabyte is refused without inflating it whole."""
    bomb = base64.b64encode(zlib.compress(b" " * 1_000_000, 9)).decode()
    bomb = bomb.replace("+", "*").replace("/", "-").replace("=", "_")
    assert len(bomb) < usersig.MAX_USERSIG_CHARS
    assert _code(UserSigVerifier(APP, KEY), bomb, "a") == usersig.UNPARSABLE


def test_cache_is_bounded() -> None:
    """The valid-signature cache never holds more than its size."""
    verifier = UserSigVerifier(APP, KEY, cache_size=3)
    api = TLSSigAPIv2(APP, KEY)
    for i in range(10):
        verifier.verify(api.gen_sig(f"admin{i}"), f"admin{i}")
    assert len(verifier._valid) == 3


def test_key_not_in_repr() -> None:
    """The secret key never shows in the verifier's repr (which logs could print)."""
    assert KEY not in repr(UserSigVerifier(APP, KEY))


def _fields(identifier: str, app: int, at: int, expire: int) -> dict[str, object]:
    """The JSON of a UserSig signed with KEY, built by hand with a chosen time."""
    content = usersig.UserSigFields(identifier, app, at, expire, "").content()
    sig = base64.b64encode(hmac.new(KEY.encode(), content, hashlib.sha256).digest()).decode()
    return {
        "TLS.ver": "2.0",
        "TLS.identifier": identifier,
        "TLS.sdkappid": app,
        "TLS.expire": expire,
        "TLS.time": at,
        "TLS.sig": sig,
    }
