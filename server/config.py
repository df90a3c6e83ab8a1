"""Command-line flags, each with a FOLLOW_* environment equivalent, into one Settings object.

A flag given on the command line wins over its environment variable, which wins over the
default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server import rules


@dataclass(frozen=True, slots=True)
class Settings:
    grpc_listen: str = "127.0.0.1:50051"
    database_url: str | None = None
    data_dir: Path = Path("var/pgdata")
    max_following: int = rules.DEFAULT_MAX_FOLLOWING
    log_level: str = "INFO"
    db_pool_size: int = 10
    grace_seconds: float = 10.0
    max_in_flight: int = 512
    db_acquire_timeout: float = 2.0
    # Transport security and observability (server.tls, server.metrics, server.logs).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    metrics_listen: str | None = None
    log_format: str = "text"
    grpc_target_ca: Path | None = None
    grpc_target_cert: Path | None = None
    grpc_target_key: Path | None = None
    # v4 REST-JSON shim ("" disables it); with grpc_target it runs alone against that server
    http_listen: str = "127.0.0.1:8080"
    grpc_target: str | None = None
    sdkappid: int | None = None
    secret_key: str | None = field(default=None, repr=False)
    admins: tuple[str, ...] = ("administrator",)
    insecure_no_auth: bool = False
    max_body_bytes: int = 1024 * 1024
    # Server processes sharing the gRPC and v4 ports (SO_REUSEPORT); see server.workers.
    workers: int = 1


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"FOLLOW_{name.upper()}", default)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def add_database_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every subcommand that opens the database shares."""
    d = Settings()
    parser.add_argument(
        "--database-url",
        default=_env("database_url", None),
        help="PostgreSQL URL (FOLLOW_DATABASE_URL); without it an embedded server is started",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(_env("data_dir", str(d.data_dir)) or d.data_dir),
        help="embedded PostgreSQL data folder, kept across restarts (FOLLOW_DATA_DIR)",
    )
    parser.add_argument(
        "--log-level",
        default=(_env("log_level", d.log_level) or d.log_level).upper(),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="log level (FOLLOW_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-format",
        default=(_env("log_format", "text") or "text").lower(),
        choices=["text", "json"],
        type=str.lower,
        help="log lines as text, or as one JSON object each (FOLLOW_LOG_FORMAT, default text)",
    )


def _optional_path(name: str) -> Path | None:
    value = _env(name, None)
    return Path(value) if value else None


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    """TLS for the gRPC port (server.tls) and the Prometheus endpoint (server.metrics)."""
    parser.add_argument(
        "--tls-cert",
        type=Path,
        default=_optional_path("tls_cert"),
        metavar="PEM",
        help="serve gRPC over TLS with this certificate chain (FOLLOW_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key",
        type=Path,
        default=_optional_path("tls_key"),
        metavar="PEM",
        help="private key of --tls-cert (FOLLOW_TLS_KEY)",
    )
    parser.add_argument(
        "--tls-client-ca",
        type=Path,
        default=_optional_path("tls_client_ca"),
        metavar="PEM",
        help="require client certificates signed by this CA: mutual TLS (FOLLOW_TLS_CLIENT_CA)",
    )
    parser.add_argument(
        "--grpc-target-ca",
        type=Path,
        default=_optional_path("grpc_target_ca"),
        metavar="PEM",
        help="with --grpc-target: use TLS, trusting this CA (FOLLOW_GRPC_TARGET_CA)",
    )
    parser.add_argument(
        "--grpc-target-cert",
        type=Path,
        default=_optional_path("grpc_target_cert"),
        metavar="PEM",
        help="with --grpc-target: client certificate for mutual TLS (FOLLOW_GRPC_TARGET_CERT)",
    )
    parser.add_argument(
        "--grpc-target-key",
        type=Path,
        default=_optional_path("grpc_target_key"),
        metavar="PEM",
        help="private key of --grpc-target-cert (FOLLOW_GRPC_TARGET_KEY)",
    )
    parser.add_argument(
        "--metrics-listen",
        default=_env("metrics_listen", None) or None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics"
        " (FOLLOW_METRICS_LISTEN; off by default)",
    )


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    parser = argparse.ArgumentParser(
        prog="follow-server",
        description="Follow/fan relationship service: gRPC follow.v1 over PostgreSQL.",
    )
    parser.add_argument(
        "--grpc-listen",
        default=_env("grpc_listen", d.grpc_listen),
        metavar="HOST:PORT",
        help="gRPC listen address (FOLLOW_GRPC_LISTEN, default %(default)s)",
    )
    add_database_flags(parser)
    parser.add_argument(
        "--max-following",
        type=positive_int,
        default=int(_env("max_following", str(d.max_following)) or d.max_following),
        help="how many users one user may follow (FOLLOW_MAX_FOLLOWING, default %(default)s)",
    )
    parser.add_argument(
        "--db-pool-size",
        type=positive_int,
        default=int(_env("db_pool_size", str(d.db_pool_size)) or d.db_pool_size),
        help="database connections per process (FOLLOW_DB_POOL_SIZE, default %(default)s)",
    )
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=float(_env("grace_seconds", str(d.grace_seconds)) or d.grace_seconds),
        help="how long shutdown waits for in-flight calls (FOLLOW_GRACE_SECONDS)",
    )
    parser.add_argument(
        "--max-in-flight",
        type=positive_int,
        default=int(_env("max_in_flight", str(d.max_in_flight)) or d.max_in_flight),
        help="calls served at once per process; past it calls get RESOURCE_EXHAUSTED"
        " (FOLLOW_MAX_IN_FLIGHT, default %(default)s)",
    )
    parser.add_argument(
        "--db-acquire-timeout",
        type=_positive_float,
        default=float(
            _env("db_acquire_timeout", str(d.db_acquire_timeout)) or d.db_acquire_timeout
        ),
        metavar="SECONDS",
        help="how long a call waits for a free database connection before RESOURCE_EXHAUSTED"
        " (FOLLOW_DB_ACQUIRE_TIMEOUT, default %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=int(_env("workers", str(d.workers)) or d.workers),
        metavar="N",
        help="server processes sharing the gRPC and v4 ports with SO_REUSEPORT; the database"
        " (embedded or not) and migrations are set up once (FOLLOW_WORKERS, default %(default)s)",
    )
    add_security_flags(parser)
    add_v4_flags(parser)
    return parser


def add_v4_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the v4 REST-JSON shim."""
    d = Settings()
    parser.add_argument(
        "--http-listen",
        default=_env("http_listen", d.http_listen),
        metavar="HOST:PORT",
        help="v4 shim listen address, '' to run without it"
        " (FOLLOW_HTTP_LISTEN, default %(default)s)",
    )
    parser.add_argument(
        "--grpc-target",
        default=_env("grpc_target", None),
        metavar="HOST:PORT",
        help="run only the v4 shim, against this remote gRPC server (FOLLOW_GRPC_TARGET)",
    )
    sdkappid = _env("sdkappid", None)
    parser.add_argument(
        "--sdkappid",
        type=positive_int,
        default=positive_int(sdkappid) if sdkappid else None,
        help="the one SDKAppID the v4 shim serves (FOLLOW_SDKAPPID)",
    )
    parser.add_argument(
        "--secret-key",
        default=_env("secret_key", None),
        metavar="KEY",
        help="the app's secret key that signs UserSigs (FOLLOW_SECRET_KEY)",
    )
    parser.add_argument(
        "--secret-key-file",
        type=Path,
        default=_env("secret_key_file", None),
        metavar="PATH",
        help="read the secret key from this file instead (FOLLOW_SECRET_KEY_FILE)",
    )
    admins = _env("admin", None)
    parser.add_argument(
        "--admin",
        action="append",
        dest="admins",
        metavar="ID",
        help="an admin identifier allowed to call the v4 shim; repeatable"
        " (FOLLOW_ADMIN, comma-separated; default administrator)",
    )
    parser.set_defaults(
        admin_default=tuple(a for a in admins.split(",") if a) if admins else d.admins
    )
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=(_env("insecure_no_auth", "") or "").lower() in ("1", "true", "yes"),
        help="accept v4 calls without checking UserSig; for local experiments only"
        " (FOLLOW_INSECURE_NO_AUTH)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=int(_env("max_body_bytes", str(d.max_body_bytes)) or d.max_body_bytes),
        help="largest v4 request body accepted (FOLLOW_MAX_BODY_BYTES, default %(default)s)",
    )


def _secret_key(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The secret key from --secret-key or --secret-key-file; the key is never echoed."""
    if args.secret_key_file is None:
        return str(args.secret_key) if args.secret_key else None
    if args.secret_key:
        parser.error("give --secret-key or --secret-key-file, not both")
    try:
        key = Path(args.secret_key_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        parser.error(f"cannot read --secret-key-file {args.secret_key_file}: {exc.strerror}")
    if not key:
        parser.error(f"--secret-key-file {args.secret_key_file} is empty")
    return key


def _check_v4(parser: argparse.ArgumentParser, settings: Settings) -> None:
    """Refuse to start a shim that would run open by accident."""
    if settings.workers > 1 and settings.grpc_target:
        parser.error("--workers runs several full servers; it does not apply to --grpc-target")
    if settings.grpc_target and not settings.http_listen:
        parser.error("--grpc-target runs only the v4 shim, so it needs --http-listen")
    if not settings.http_listen or settings.insecure_no_auth:
        return
    if settings.secret_key is None or settings.sdkappid is None:
        parser.error(
            "the v4 shim needs --sdkappid and --secret-key (or --secret-key-file,"
            " FOLLOW_SECRET_KEY) to check UserSigs; run without the shim with"
            " --http-listen '', or without authentication with --insecure-no-auth"
        )


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = Settings(
        grpc_listen=args.grpc_listen,
        database_url=args.database_url or None,
        data_dir=args.data_dir,
        max_following=args.max_following,
        log_level=args.log_level,
        db_pool_size=args.db_pool_size,
        grace_seconds=args.grace_seconds,
        max_in_flight=args.max_in_flight,
        db_acquire_timeout=args.db_acquire_timeout,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        metrics_listen=args.metrics_listen,
        log_format=args.log_format,
        grpc_target_ca=args.grpc_target_ca,
        grpc_target_cert=args.grpc_target_cert,
        grpc_target_key=args.grpc_target_key,
        http_listen=args.http_listen,
        grpc_target=args.grpc_target or None,
        sdkappid=args.sdkappid,
        secret_key=_secret_key(parser, args),
        admins=tuple(args.admins) if args.admins else args.admin_default,
        insecure_no_auth=args.insecure_no_auth,
        max_body_bytes=args.max_body_bytes,
        workers=args.workers,
    )
    _check_v4(parser, settings)
    return settings
