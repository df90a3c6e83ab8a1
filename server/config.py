"""Command-line flags, each with a FOLLOW_* environment equivalent, into one Settings object.

One table of options (OPTIONS) drives both: the flag, its variable, its parser and its help
come from one row, so a value given in the environment passes the same checks as the same
value on the command line. A flag wins over its variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from server import rules

ENV_PREFIX = "FOLLOW_"


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of a server process, frozen once parsed (see OPTIONS for flags and
    variables)."""

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


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def one_of(*choices: str, fold: Callable[[str], str] = str.lower) -> Callable[[str], str]:
    """A parser accepting `choices` (compared after `fold`)."""

    def parse(text: str) -> str:
        value = fold(text)
        if value not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return value

    return parse


def flag_bool(text: str) -> bool:
    """An environment switch: 1/true/yes or 0/false/no/'' (any case)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("", "0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not one of 1, true, yes, 0, false, no")


def _path_or_none(text: str) -> Path | None:
    return Path(text) if text else None


def _text_or_none(text: str) -> str | None:
    return text or None


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its flag, its FOLLOW_* variable and how both are read."""

    flag: str
    help: str
    parse: Callable[[str], Any] = str
    metavar: str | None = None
    # A switch (no value on the command line); its variable is read with flag_bool.
    switch: bool = False
    # Repeatable on the command line; comma-separated in the variable.
    repeat: bool = False

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


_LEVEL = one_of("DEBUG", "INFO", "WARNING", "ERROR", fold=str.upper)
_FORMAT = one_of("text", "json")

# Flags every subcommand that opens the database shares (serve, import, check).
DATABASE_OPTIONS = (
    Option(
        "--database-url",
        "PostgreSQL URL; without it an embedded server is started",
        _text_or_none,
        "URL",
    ),
    Option("--data-dir", "embedded PostgreSQL data folder, kept across restarts", Path, "PATH"),
    Option("--log-level", "log level: DEBUG, INFO, WARNING or ERROR", _LEVEL, "LEVEL"),
    Option("--log-format", "log lines as text, or as one JSON object each", _FORMAT, "FORMAT"),
)

SERVE_OPTIONS = (
    Option("--grpc-listen", "gRPC listen address", str, "HOST:PORT"),
    *DATABASE_OPTIONS,
    Option("--max-following", "how many users one user may follow", positive_int, "N"),
    Option("--db-pool-size", "database connections per process", positive_int, "N"),
    Option(
        "--grace-seconds",
        "how long shutdown waits for in-flight calls",
        positive_float,
        "SECONDS",
    ),
    Option(
        "--max-in-flight",
        "calls served at once per process; past it calls get RESOURCE_EXHAUSTED",
        positive_int,
        "N",
    ),
    Option(
        "--db-acquire-timeout",
        "how long a call waits for a free database connection before RESOURCE_EXHAUSTED",
        positive_float,
        "SECONDS",
    ),
    Option(
        "--workers",
        "server processes sharing the gRPC and v4 ports with SO_REUSEPORT; the database"
        " (embedded or not) and migrations are set up once",
        positive_int,
        "N",
    ),
    # TLS for the gRPC port (server.tls) and the Prometheus endpoint (server.metrics).
    Option("--tls-cert", "serve gRPC over TLS with this certificate chain", _path_or_none, "PEM"),
    Option("--tls-key", "private key of --tls-cert", _path_or_none, "PEM"),
    Option(
        "--tls-client-ca",
        "require client certificates signed by this CA: mutual TLS",
        _path_or_none,
        "PEM",
    ),
    Option(
        "--grpc-target-ca", "with --grpc-target: use TLS, trusting this CA", _path_or_none, "PEM"
    ),
    Option(
        "--grpc-target-cert",
        "with --grpc-target: client certificate for mutual TLS",
        _path_or_none,
        "PEM",
    ),
    Option("--grpc-target-key", "private key of --grpc-target-cert", _path_or_none, "PEM"),
    Option(
        "--metrics-listen",
        "serve Prometheus metrics at http://HOST:PORT/metrics (off unless given)",
        _text_or_none,
        "HOST:PORT",
    ),
    # The v4 REST-JSON shim.
    Option("--http-listen", "v4 shim listen address, '' to run without it", str, "HOST:PORT"),
    Option(
        "--grpc-target",
        "run only the v4 shim, against this remote gRPC server",
        _text_or_none,
        "HOST:PORT",
    ),
    Option("--sdkappid", "the one SDKAppID the v4 shim serves", positive_int, "ID"),
    Option(
        "--secret-key",
        "the app's secret key that signs UserSigs (prefer --secret-key-file)",
        _text_or_none,
        "KEY",
    ),
    Option("--secret-key-file", "read the secret key from this file", _path_or_none, "PATH"),
    Option(
        "--admin",
        "an admin identifier allowed to call the v4 shim; repeatable",
        str,
        "ID",
        repeat=True,
    ),
    Option(
        "--insecure-no-auth",
        "accept v4 calls without checking UserSig; for local experiments only",
        switch=True,
    ),
    Option("--max-body-bytes", "largest v4 request body accepted", positive_int, "N"),
)

_FIELDS = {f.name for f in fields(Settings)}


def _setting_name(option: Option) -> str:
    """The Settings field an option fills ('admin' fills 'admins')."""
    return "admins" if option.dest == "admin" else option.dest


def _default(option: Option) -> Any:
    name = _setting_name(option)
    return getattr(Settings(), name) if name in _FIELDS else None


def _env_value(parser: argparse.ArgumentParser, option: Option) -> tuple[bool, Any]:
    """(given, value) of the option's variable, read with the option's own parser."""
    raw = os.environ.get(option.env)
    if raw is None:
        return False, None
    try:
        if option.switch:
            return True, flag_bool(raw)
        if option.repeat:
            return True, tuple(option.parse(part) for part in raw.split(",") if part)
        return True, option.parse(raw)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"{option.env}: {exc}")


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    if value is None:
        return "none"
    if value == "":
        return "''"
    return str(value)


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """Add each option's flag, its default taken from its variable (checked like the flag
    would be) or from Settings; the help names the variable and the default."""
    for option in options:
        given, value = _env_value(parser, option)
        default = value if given else _default(option)
        help_text = f"{option.help} ({option.env}; default {_shown(_default(option))})"
        if option.dest == "secret_key":
            help_text = f"{option.help} ({option.env})"  # a default key is never shown
        if option.switch:
            parser.add_argument(
                option.flag, action="store_true", default=bool(default), help=help_text
            )
        elif option.repeat:
            parser.add_argument(
                option.flag,
                action="append",
                dest=f"{option.dest}_given",
                type=option.parse,
                metavar=option.metavar,
                help=help_text + "; the variable is comma-separated",
            )
            parser.set_defaults(**{option.dest: default})
        else:
            parser.add_argument(
                option.flag,
                type=option.parse,
                default=default,
                metavar=option.metavar,
                help=help_text,
            )


def add_database_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every subcommand that opens the database shares."""
    add_options(parser, DATABASE_OPTIONS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="follow-server",
        description="Follow/fan relationship service: gRPC follow.v1 over PostgreSQL.",
    )
    add_options(parser, SERVE_OPTIONS)
    return parser


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
    values = {
        _setting_name(o): getattr(args, o.dest)
        for o in SERVE_OPTIONS
        if _setting_name(o) in _FIELDS and o.dest not in ("secret_key", "admin")
    }
    admins = tuple(args.admin_given) if args.admin_given else args.admin
    settings = Settings(**values, secret_key=_secret_key(parser, args), admins=admins)
    _check_v4(parser, settings)
    return settings
