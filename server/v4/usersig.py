"""UserSig verification: TLS signature v2, as the public tls-sig-api-v2 libraries make it.

A UserSig is zlib-compressed JSON, base64-encoded with `+/=` mapped to `*-_`. Its `TLS.sig`
is the base64 HMAC-SHA256, keyed with the app's secret key, of a content string built from
the other fields. Checks run in the spec's order (section 4): decodable (70003), sdkappid
(70014), identifier (70013), expiry (70001), signature (70009), the last in constant time.

Valid signatures are remembered until they expire, keyed on the UserSig string, so an admin
that reuses one UserSig (the usual case) pays for one inflate and HMAC, not one per call.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

EXPIRED = 70001
UNPARSABLE = 70003
BAD_SIGNATURE = 70009
IDENTIFIER_MISMATCH = 70013
SDKAPPID_MISMATCH = 70014

MAX_USERSIG_CHARS = 4096
MAX_INFLATED_BYTES = 4096
DEFAULT_CACHE_SIZE = 4096

_FROM_URL = str.maketrans("*-_", "+/=")


class UserSigError(Exception):
    """A UserSig that does not authenticate the caller; `code` is the v4 error code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class UserSigFields:
    """The decoded JSON of a UserSig."""

    identifier: str
    sdkappid: int
    time: int
    expire: int
    sig: str
    userbuf: str | None = None

    def content(self) -> bytes:
        """The string the HMAC covers, exactly as tls-sig-api-v2 builds it."""
        text = (
            f"TLS.identifier:{self.identifier}\n"
            f"TLS.sdkappid:{self.sdkappid}\n"
            f"TLS.time:{self.time}\n"
            f"TLS.expire:{self.expire}\n"
        )
        if self.userbuf is not None:
            text += f"TLS.userbuf:{self.userbuf}\n"
        return text.encode("utf-8")


def _unparsable(why: str) -> UserSigError:
    return UserSigError(UNPARSABLE, f"usersig could not be parsed: {why}")


def _int_field(data: dict[str, object], name: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _unparsable(f"{name} is missing or not an integer")
    return value


def _str_field(data: dict[str, object], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise _unparsable(f"{name} is missing or not a string")
    return value


def decode(usersig: str) -> UserSigFields:
    """The fields of a UserSig, or UserSigError(70003) when it is not one."""
    if len(usersig) > MAX_USERSIG_CHARS:
        raise _unparsable(f"longer than {MAX_USERSIG_CHARS} characters")
    try:
        compressed = base64.b64decode(usersig.translate(_FROM_URL), validate=True)
    except (binascii.Error, ValueError):
        raise _unparsable("not base64 in the UserSig alphabet") from None
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(compressed, MAX_INFLATED_BYTES)
    except zlib.error:
        raise _unparsable("not zlib-compressed") from None
    if not inflater.eof:
        raise _unparsable("truncated or too large once inflated")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise _unparsable("not JSON inside") from None
    if not isinstance(data, dict):
        raise _unparsable("not a JSON object inside")
    version = data.get("TLS.ver")
    if version != "2.0":
        raise _unparsable(f"version {version!r} is not supported, only '2.0'")
    userbuf = data.get("TLS.userbuf")
    if userbuf is not None and not isinstance(userbuf, str):
        raise _unparsable("TLS.userbuf is not a string")
    return UserSigFields(
        identifier=_str_field(data, "TLS.identifier"),
        sdkappid=_int_field(data, "TLS.sdkappid"),
        time=_int_field(data, "TLS.time"),
        expire=_int_field(data, "TLS.expire"),
        sig=_str_field(data, "TLS.sig"),
        userbuf=userbuf,
    )


class UserSigVerifier:
    """Verifies UserSigs for one app id and secret key. The key is never shown."""

    def __init__(
        self,
        sdkappid: int,
        secret_key: str,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sdkappid = sdkappid
        self._key = secret_key.encode("utf-8")
        self._clock = clock
        self._cache_size = cache_size
        # usersig -> (identifier, expires at): only signatures that verified
        self._valid: dict[str, tuple[str, int]] = {}

    def __repr__(self) -> str:
        return f"UserSigVerifier(sdkappid={self._sdkappid}, secret_key=<redacted>)"

    def verify(self, usersig: str, identifier: str) -> None:
        """Return when `usersig` was made for `identifier` with this app's key and is
        still valid; raise UserSigError with the v4 code otherwise."""
        now = int(self._clock())
        known = self._valid.get(usersig)
        if known is not None:
            signed_for, expires_at = known
            if now <= expires_at:
                if signed_for != identifier:
                    raise _identifier_mismatch(signed_for, identifier)
                return
            del self._valid[usersig]
        fields = decode(usersig)
        if fields.sdkappid != self._sdkappid:
            raise UserSigError(
                SDKAPPID_MISMATCH,
                f"usersig was made for sdkappid {fields.sdkappid},"
                f" the request names {self._sdkappid}",
            )
        if fields.identifier != identifier:
            raise _identifier_mismatch(fields.identifier, identifier)
        expires_at = fields.time + fields.expire
        if now > expires_at:
            raise UserSigError(EXPIRED, f"usersig expired {now - expires_at} seconds ago")
        expected = base64.b64encode(hmac.new(self._key, fields.content(), hashlib.sha256).digest())
        if not hmac.compare_digest(expected, fields.sig.encode("utf-8", "surrogatepass")):
            raise UserSigError(
                BAD_SIGNATURE, "usersig signature does not verify with this app's secret key"
            )
        if len(self._valid) >= self._cache_size:
            del self._valid[next(iter(self._valid))]
        self._valid[usersig] = (identifier, expires_at)


def _identifier_mismatch(signed_for: str, identifier: str) -> UserSigError:
    return UserSigError(
        IDENTIFIER_MISMATCH,
        f"usersig was made for identifier {signed_for!r}, the request names {identifier!r}",
    )
