"""TLS and mutual TLS on the gRPC port, with certificates these tests make; the loopback rule
for plaintext."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from TLSSigAPIv2 import TLSSigAPIv2

from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from server import tls
from server.app import RunningService, start_service
from server.config import Settings
from server.v4.http import start_shim
from tests.conftest import ServiceFactory

CALL_TIMEOUT = 5.0


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM."""

    cert: bytes
    key: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Authority:
    """A throwaway certificate authority."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, *, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


@dataclass(frozen=True)
class Pki:
    """The CAs and certificate files one TLS test uses."""

    server_ca: Authority
    client_ca: Authority
    other_ca: Authority
    server_files: tls.TlsFiles
    mutual_files: tls.TlsFiles
    client: Issued
    stranger: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A server CA, a client CA and an unrelated CA; a server cert, a client cert from the
    client CA, and a client cert from the unrelated CA."""
    folder = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, other_ca = Authority("server CA"), Authority("client CA"), Authority("x")
    server = server_ca.issue("localhost", server=True)

    def write(name: str, data: bytes) -> Path:
        path = folder / name
        path.write_bytes(data)
        return path

    cert, key = write("server.pem", server.cert), write("server.key", server.key)
    ca = write("client-ca.pem", client_ca.pem)
    return Pki(
        server_ca,
        client_ca,
        other_ca,
        tls.TlsFiles(cert, key),
        tls.TlsFiles(cert, key, ca),
        client_ca.issue("billing-service", server=False),
        other_ca.issue("billing-service", server=False),
    )


async def _check_accounts(
    port: int, root: bytes, client: Issued | None = None
) -> pb.CheckAccountsResponse:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = pb_grpc.AccountServiceStub(channel)
        response: pb.CheckAccountsResponse = await stub.CheckAccounts(
            pb.CheckAccountsRequest(user_ids=["alice"]), timeout=CALL_TIMEOUT
        )
        return response


def _settings(files: tls.TlsFiles) -> dict[str, object]:
    return {"tls_cert": files.cert, "tls_key": files.key, "tls_client_ca": files.client_ca}


async def test_tls_call_succeeds_with_the_server_ca(make_service: ServiceFactory, pki: Pki) -> None:
    """With --tls-cert/--tls-key a client trusting the server's CA gets answers."""
    service = await make_service(**_settings(pki.server_files))
    response = await _check_accounts(service.port, pki.server_ca.pem)
    assert [s.user_id for s in response.statuses] == ["alice"]


async def test_tls_call_fails_with_another_ca(make_service: ServiceFactory, pki: Pki) -> None:
    """A client that trusts a different CA refuses the server's certificate."""
    service = await make_service(**_settings(pki.server_files))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _check_accounts(service.port, pki.other_ca.pem)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_port_refuses_plaintext_clients(make_service: ServiceFactory, pki: Pki) -> None:
    """A TLS port does not also speak plaintext."""
    service = await make_service(**_settings(pki.server_files))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.AccountServiceStub(channel).CheckAccounts(
                pb.CheckAccountsRequest(user_ids=["alice"]), timeout=CALL_TIMEOUT
            )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_accepts_a_client_cert_from_the_client_ca(
    make_service: ServiceFactory, pki: Pki
) -> None:
    """With --tls-client-ca, a client certificate signed by that CA is let in."""
    service = await make_service(**_settings(pki.mutual_files))
    response = await _check_accounts(service.port, pki.server_ca.pem, pki.client)
    assert [s.user_id for s in response.statuses] == ["alice"]


@pytest.mark.parametrize("who", ["no certificate", "certificate from another CA"])
async def test_mtls_rejects_clients_without_a_valid_cert(
    make_service: ServiceFactory, pki: Pki, who: str
) -> None:
    """With --tls-client-ca, a client with no certificate, or one signed by another CA, is
    turned away in the handshake."""
    service = await make_service(**_settings(pki.mutual_files))
    client = None if who == "no certificate" else pki.stranger
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _check_accounts(service.port, pki.server_ca.pem, client)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.9.9.9:1", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("10.1.2.3:50051", False),
        ("example.com:50051", False),
    ],
)
def test_is_loopback_decides_which_addresses_are_private(listen: str, loopback: bool) -> None:
    """Only loopback addresses count as private; wildcards, LAN addresses and other names
    do not."""
    assert tls.is_loopback(listen) is loopback


async def test_plaintext_on_all_interfaces_warns_loudly(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Binding 0.0.0.0 without TLS logs a warning naming the address and the TLS flags; the
    port still answers (talked to only via 127.0.0.1)."""
    caplog.set_level(logging.WARNING, logger="server.tls")
    service = await start_service(Settings(grpc_listen="0.0.0.0:0", http_listen=""), db_url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            await pb_grpc.AccountServiceStub(channel).CheckAccounts(
                pb.CheckAccountsRequest(user_ids=["a"]), timeout=CALL_TIMEOUT
            )
    finally:
        await service.stop(0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("PLAINTEXT" in m and "0.0.0.0:0" in m and "--tls-cert" in m for m in warnings)


async def test_plaintext_on_loopback_is_quiet(
    make_service: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The default (plaintext on 127.0.0.1) does not warn."""
    caplog.set_level(logging.WARNING, logger="server.tls")
    await make_service()
    assert not [r for r in caplog.records if r.name == "server.tls"]


def test_half_a_tls_configuration_is_refused() -> None:
    """A certificate without its key, or a client CA without a server certificate, is a
    configuration error rather than a silent fall back to plaintext."""
    with pytest.raises(tls.TlsConfigError, match="together"):
        tls.tls_files(Path("cert.pem"), None, None)
    with pytest.raises(tls.TlsConfigError, match="--tls-client-ca needs"):
        tls.tls_files(None, None, Path("ca.pem"))
    assert tls.tls_files(None, None, None) is None


async def test_unreadable_tls_files_fail_at_start(
    make_service: ServiceFactory, tmp_path: Path, pki: Pki
) -> None:
    """A missing or non-PEM file stops the start with a message naming the file."""
    with pytest.raises(tls.TlsConfigError, match="cannot read certificate"):
        await make_service(tls_cert=tmp_path / "missing.pem", tls_key=pki.server_files.key)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(tls.TlsConfigError, match="not a PEM file"):
        await make_service(tls_cert=pki.server_files.cert, tls_key=junk)


SHIM_APP = 1400000005
SHIM_KEY = "tls-shim-key-0123456789abcdef012"


async def _v4_account_check(port: int) -> dict[str, object]:
    query = {
        "sdkappid": str(SHIM_APP),
        "identifier": "administrator",
        "usersig": TLSSigAPIv2(SHIM_APP, SHIM_KEY).gen_sig("administrator"),
        "random": "5",
        "contenttype": "json",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/v4/im_open_login_svc/account_check",
            params=query,
            data=b'{"CheckItem": [{"UserID": "alice"}]}',
        ) as response,
    ):
        payload: dict[str, object] = await response.json(content_type=None)
        return payload


@pytest.mark.parametrize("with_client_cert", [True, False])
async def test_standalone_shim_reaches_an_mtls_server(
    make_service: ServiceFactory, pki: Pki, tmp_path: Path, with_client_cert: bool
) -> None:
    """The v4 shim run alone (--grpc-target) speaks mutual TLS to the gRPC server with
    --grpc-target-ca/--grpc-target-cert/--grpc-target-key; without a client certificate
    its calls fail with an error envelope, not a 500."""
    service = await make_service(**_settings(pki.mutual_files))
    ca = tmp_path / "server-ca.pem"
    ca.write_bytes(pki.server_ca.pem)
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_bytes(pki.client.cert)
    key.write_bytes(pki.client.key)
    shim = await start_shim(
        Settings(
            http_listen="127.0.0.1:0",
            grpc_target=f"127.0.0.1:{service.port}",
            grpc_target_ca=ca,
            grpc_target_cert=cert if with_client_cert else None,
            grpc_target_key=key if with_client_cert else None,
            sdkappid=SHIM_APP,
            secret_key=SHIM_KEY,
        )
    )
    try:
        payload = await _v4_account_check(shim.port)
    finally:
        await shim.stop()
    if with_client_cert:
        assert payload["ErrorCode"] == 0, payload
    else:
        assert payload["ErrorCode"] != 0
        assert payload["ActionStatus"] == "FAIL"


def test_half_a_client_tls_configuration_is_refused() -> None:
    """A client certificate without its key for --grpc-target is a configuration error."""
    with pytest.raises(tls.TlsConfigError, match="together"):
        tls.client_files(None, Path("client.pem"), None)
    assert tls.client_files(None, None, None) is None


# -- the v4 shim's own TLS (--http-tls-cert/--http-tls-key) ------------------------------


async def test_shim_serves_https_with_its_own_certificate(
    service: RunningService, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """With --http-tls-cert/--http-tls-key the shim speaks HTTPS only: a client trusting the
    CA gets the envelope (the UserSig travels encrypted), a plaintext client gets nothing,
    and the OpenAPI document names the https address."""
    caplog.set_level(logging.INFO, logger="server.v4.http")
    app, key = 1400000009, "https-key"
    settings = Settings(
        http_listen="127.0.0.1:0",
        sdkappid=app,
        secret_key=key,
        http_tls_cert=pki.server_files.cert,
        http_tls_key=pki.server_files.key,
    )
    shim = await start_shim(settings, service.core)
    try:
        context = ssl.create_default_context(cadata=pki.server_ca.pem.decode())
        query = {
            "sdkappid": str(app),
            "identifier": "administrator",
            "usersig": TLSSigAPIv2(app, key).gen_sig("administrator"),
            "random": "1",
            "contenttype": "json",
        }
        base = f"https://127.0.0.1:{shim.port}"
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{base}/v4/im_open_login_svc/account_check",
                params=query,
                data=b'{"CheckItem": [{"UserID": "a"}]}',
                ssl=context,
            ) as response:
                assert (await response.json(content_type=None))["ErrorCode"] == 0
            async with session.get(f"{base}/v4/openapi.yaml", ssl=context) as response:
                assert f"  - url: {base}\n" in await response.text()
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{shim.port}/v4/openapi.yaml") as r:
                    await r.read()
    finally:
        await shim.stop()
    assert f"v4 shim listening on https://127.0.0.1:{shim.port}" in caplog.text
    assert "PLAINTEXT" not in caplog.text


async def test_shim_in_plaintext_off_loopback_warns_loudly(
    service: RunningService, caplog: pytest.LogCaptureFixture
) -> None:
    """Plaintext HTTP on 0.0.0.0 logs a warning naming the UserSig and the TLS flags (the
    port is talked to only via 127.0.0.1 here); on loopback it stays quiet."""
    caplog.set_level(logging.WARNING, logger="server.tls")
    settings = Settings(http_listen="0.0.0.0:0", sdkappid=1400000009, secret_key="k")
    shim = await start_shim(settings, service.core)
    await shim.stop()
    warnings = [r.getMessage() for r in caplog.records if r.name == "server.tls"]
    assert any(
        "PLAINTEXT HTTP" in m and "UserSig" in m and "--http-tls-cert" in m for m in warnings
    )
    caplog.clear()
    shim = await start_shim(dataclasses.replace(settings, http_listen="127.0.0.1:0"), service.core)
    await shim.stop()
    assert not [r for r in caplog.records if r.name == "server.tls"]


def test_unusable_shim_certificate_is_a_config_error(tmp_path: Path, pki: Pki) -> None:
    """A missing file, or a certificate with another key, is one TlsConfigError naming them."""
    with pytest.raises(tls.TlsConfigError, match="cannot read certificate"):
        tls.http_ssl_context(tmp_path / "missing.pem", pki.server_files.key)
    other = tmp_path / "other.key"
    other.write_bytes(pki.client.key)
    with pytest.raises(tls.TlsConfigError, match="do not load as a certificate and its key"):
        tls.http_ssl_context(pki.server_files.cert, other)
