"""Transport security for the gRPC port and the v4 shim: TLS, mutual TLS, and the
loopback-only plaintext rule.

Plaintext is the default because a newcomer runs the service on 127.0.0.1, where nobody
else can listen in. Anywhere else a plaintext port carries user ids and relationships (and,
on the v4 shim, the UserSig bearer credential in the query string) in the clear to anyone on
the path, so the server says so loudly at start.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from server.errors import ConfigError

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class TlsConfigError(ConfigError, ValueError):
    """The TLS flags do not make a usable configuration (missing half, unreadable file)."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The PEM files of the gRPC port's TLS, as configured."""

    cert: Path
    key: Path
    client_ca: Path | None = None


def listen_host(listen: str) -> str:
    """The host part of HOST:PORT, without IPv6 brackets ('' when only ':PORT' is given)."""
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def is_loopback(listen: str) -> bool:
    """Whether HOST:PORT only accepts connections from this machine.

    An empty host, 0.0.0.0, [::] and any name other than localhost listen (or may resolve
    to addresses) beyond this machine, so they are not loopback.
    """
    host = listen_host(listen).lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_files(cert: Path | None, key: Path | None, client_ca: Path | None) -> TlsFiles | None:
    """The TLS configuration the flags ask for, None for plaintext; half a pair is an error."""
    if cert is None and key is None:
        if client_ca is not None:
            raise TlsConfigError("--tls-client-ca needs --tls-cert and --tls-key as well")
        return None
    if cert is None or key is None:
        raise TlsConfigError("--tls-cert and --tls-key must be given together")
    return TlsFiles(cert, key, client_ca)


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"{what} {path} is not a PEM file")
    return data


@dataclass(frozen=True, slots=True)
class ServerTls:
    """Loaded server credentials, and whether client certificates are required."""

    credentials: grpc.ServerCredentials
    mutual: bool


def load(files: TlsFiles | None) -> ServerTls | None:
    """Read the PEM files once, at start, so a bad path fails before anything listens.

    With a client CA, clients must present a certificate it signed (mutual TLS).
    """
    if files is None:
        return None
    cert = _read(files.cert, "certificate")
    key = _read(files.key, "private key")
    client_ca = _read(files.client_ca, "client CA") if files.client_ca is not None else None
    credentials = grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
    return ServerTls(credentials, mutual=client_ca is not None)


def add_port(server: grpc.aio.Server, listen: str, server_tls: ServerTls | None) -> int:
    """Bind the gRPC port (TLS when configured) and return it; 0 when binding failed."""
    try:
        if server_tls is None:
            if not is_loopback(listen):
                log.warning(
                    "PLAINTEXT gRPC on non-loopback address %s: anyone on the network path can "
                    "read and forge calls; give --tls-cert/--tls-key (and --tls-client-ca for "
                    "mutual TLS), or listen on 127.0.0.1",
                    listen,
                )
            return server.add_insecure_port(listen)
        port = server.add_secure_port(listen, server_tls.credentials)
    except RuntimeError:  # grpcio's "Failed to bind to address ..."
        return 0
    log.info(
        "gRPC over TLS on %s%s",
        listen,
        ", client certificates required (mutual TLS)" if server_tls.mutual else "",
    )
    return port


def client_files(
    ca: Path | None, cert: Path | None, key: Path | None
) -> tuple[Path | None, Path | None, Path | None] | None:
    """The TLS the shim's channel to --grpc-target asks for; None for plaintext."""
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise TlsConfigError("--grpc-target-cert and --grpc-target-key must be given together")
    return ca, cert, key


def target_channel(
    target: str, ca: Path | None, cert: Path | None, key: Path | None
) -> grpc.aio.Channel:
    """A channel to a remote gRPC server: TLS (verified against `ca`, or the system roots)
    when any of the three is given, with a client certificate for mutual TLS; else plaintext,
    with the same warning as the server for a non-loopback target."""
    files = client_files(ca, cert, key)
    if files is None:
        if not is_loopback(target):
            log.warning(
                "PLAINTEXT gRPC to non-loopback target %s; give --grpc-target-ca (and "
                "--grpc-target-cert/--grpc-target-key for mutual TLS)",
                target,
            )
        return grpc.aio.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "gRPC target CA") if ca is not None else None,
        private_key=_read(key, "client key") if key is not None else None,
        certificate_chain=_read(cert, "client certificate") if cert is not None else None,
    )
    return grpc.aio.secure_channel(target, credentials)


def http_ssl_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The v4 shim's HTTPS context from --http-tls-cert/--http-tls-key, None for plaintext;
    read at start, so a bad file stops the start with a line naming it."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise TlsConfigError("--http-tls-cert and --http-tls-key must be given together")
    _read(cert, "certificate")
    _read(key, "private key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"--http-tls-cert {cert} and --http-tls-key {key} do not load as a certificate and"
            f" its key: {exc.reason or exc}"
        ) from None
    return context


def warn_plaintext_http(listen: str) -> None:
    """The shim's counterpart of add_port's warning: a UserSig is a bearer credential."""
    if not is_loopback(listen):
        log.warning(
            "PLAINTEXT HTTP for the v4 shim on non-loopback address %s: every request carries"
            " its UserSig (a bearer credential) in the query string for anyone on the path to"
            " read and replay; give --http-tls-cert/--http-tls-key, or listen on 127.0.0.1",
            listen,
        )
