"""Command-line flags, each with a FOLLOW_* environment equivalent, into one Settings object.

One table of options (SERVE_OPTIONS) drives both: the flag, its variable, its parser and its
help come from one row, so a value given in the environment passes the same checks as the
same value on the command line. A flag wins over its variable, which wins over the default.

A mistake is one line on stderr (Parser.error; a JSON object with --log-format json) and exit
status 2, never a usage block: the line names the flag or variable and what to give instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from server import logs, rules, tls

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
    http_tls_cert: Path | None = None
    http_tls_key: Path | None = None
    # Server processes sharing the gRPC and v4 ports (SO_REUSEPORT); see server.workers.
    workers: int = 1
    # The Watch stream (server.watch_hub): streams per process, and the idle heartbeat.
    max_watchers: int = 1000
    watch_heartbeat_seconds: float = 15.0
    # Webhooks (server.webhooks) and event retention (server.retention); durations in seconds.
    callback_urls: tuple[str, ...] = ()
    callback_token: str | None = field(default=None, repr=False)
    callback_retry_budget: float = 24 * 3600.0
    callback_timeout: float = 2.0
    callback_concurrency: int = 8
    callback_backoff_min: float = 1.0
    callback_backoff_max: float = 600.0
    event_retention: float = 7 * 24 * 3600.0


PROGRAM = "follow-server"
EXIT_CODES = """\
exit status:
  0  stopped cleanly on SIGTERM/SIGINT (check: no violations)
  1  a failure at run time: a port already in use, the database unreachable or refusing
     to start, a worker that died (check: violations found; import: bad rows)
  2  a usage or configuration mistake, reported before anything starts
Each failure is one line on stderr (one JSON object with --log-format json).
"""
SUBCOMMANDS_HELP = """\
commands:
  follow-server [serve] [OPTIONS]   run the service (the default; the options below)
  follow-server check [--repair]    verify every invariant of the stored graph; check --help
  follow-server import --accounts FILE --edges FILE
                                    bulk-load accounts and follows from CSV; import --help
  follow-server migrate             apply pending schema migrations and say what was done
"""


def version() -> str:
    """The installed package's version."""
    try:
        return metadata.version("follow-service")
    except metadata.PackageNotFoundError:
        return "unknown"


def requested_log_format(argv: Sequence[str]) -> str:
    """The log format asked for by argv or FOLLOW_LOG_FORMAT, read before (and whether or not)
    the rest parses, so that even a usage error is written in it."""
    wanted = os.environ.get(ENV_PREFIX + "LOG_FORMAT", "")
    for i, arg in enumerate(argv):
        if arg == "--log-format" and i + 1 < len(argv):
            wanted = argv[i + 1]
        elif arg.startswith("--log-format="):
            wanted = arg.split("=", 1)[1]
    return "json" if wanted.strip().lower() == "json" else "text"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (text, or JSON when --log-format json or
    FOLLOW_LOG_FORMAT=json asks for it) and exit status 2, instead of a usage block."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self._log_format = requested_log_format(sys.argv[1:])

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._log_format = requested_log_format(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        logs.print_fatal(f"{message} (see {self.prog} --help)", self._log_format, self.prog)
        self.exit(2)


_HOST = re.compile(r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.%A-Za-z]+\]")


def split_host_port(text: str, *, allow_zero: bool = True, example: int = 50051) -> tuple[str, int]:
    """HOST:PORT (or [v6]:PORT) as (host without brackets, port); argparse.ArgumentTypeError
    saying what is missing or wrong otherwise. The host is required: ':PORT' and a bare port
    are refused rather than guessed (every interface or only this machine?)."""
    host, sep, port = text.rpartition(":")
    if text.isdigit():
        raise argparse.ArgumentTypeError(
            f"{text!r} has no host: give HOST:PORT, e.g. 127.0.0.1:{text} (this machine only)"
            f" or 0.0.0.0:{text} (every interface)"
        )
    if not sep or not port or (text.startswith("[") and text.endswith("]")):
        host = text.rstrip(":") or "127.0.0.1"
        raise argparse.ArgumentTypeError(
            f"{text!r} has no port: give HOST:PORT, e.g. {host}:{example}"
        )
    if not host:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no host: give HOST:PORT, e.g. 127.0.0.1{text} (this machine only)"
            f" or 0.0.0.0{text} (every interface)"
        )
    if not _HOST.fullmatch(host):
        if ":" in host and not host.startswith("["):
            raise argparse.ArgumentTypeError(
                f"{text!r}: write an IPv6 host in brackets, e.g. [::1]:{example}"
            )
        raise argparse.ArgumentTypeError(f"{text!r}: {host!r} is not a host name or IP address")
    lowest = 0 if allow_zero else 1
    if not (port.isascii() and port.isdigit()) or not lowest <= int(port) <= 65535:
        zero = " (0: any free port)" if allow_zero else ""
        raise argparse.ArgumentTypeError(
            f"{text!r}: the port must be a number from {lowest} to 65535{zero}, not {port!r}"
        )
    return host.strip("[]"), int(port)


def listen_address(example: int, *, optional: bool = False) -> Callable[[str], str]:
    """A parser of a HOST:PORT to listen on (port 0: any free port); with `optional`, '' is
    accepted and means "off"."""

    def parse(text: str) -> str:
        if optional and text == "":
            return text
        split_host_port(text, example=example)
        return text

    return parse


def target_address(text: str) -> str:
    """A HOST:PORT to connect to (port 1 to 65535); '' means none."""
    if text:
        split_host_port(text, allow_zero=False)
    return text


def input_file(text: str) -> str:
    """A file to read ('-' is stdin), checked when the flags are read, so that a wrong path is
    a usage error before any database is started."""
    if text == "-":
        return text
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: no permission to read it")
    return text


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


_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """A positive duration in seconds: a number, optionally with a unit (s, m, h, d):
    '90', '1.5s', '15m', '24h', '7d'."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in ("s", "m", "h", "d") else ""
    try:
        number = float(value.removesuffix(unit)) if value else -1.0
    except ValueError:
        number = -1.0
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive duration: give seconds, or a number with s, m, h or d"
            " (e.g. 30s, 15m, 24h, 7d)"
        )
    return number * _UNITS[unit]


def callback_url(text: str) -> str:
    """An http:// or https:// URL with a host, to POST webhooks to."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an http:// or https:// URL with a host"
            " (e.g. https://hooks.example.com/follow)"
        )
    if parts.fragment:
        raise argparse.ArgumentTypeError(f"{text!r}: a callback URL has no #fragment")
    return text


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
    Option(
        "--grpc-listen",
        "gRPC listen address (port 0: any free port, logged at start)",
        listen_address(50051),
        "HOST:PORT",
    ),
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
        "--max-watchers",
        "Watch streams served at once per process (not counted in --max-in-flight); past"
        " it Watch gets RESOURCE_EXHAUSTED",
        positive_int,
        "N",
    ),
    Option(
        "--watch-heartbeat-seconds",
        "a Watch stream with nothing to send for this long gets a heartbeat event",
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
        lambda text: listen_address(9464, optional=True)(text) or None,
        "HOST:PORT",
    ),
    # The v4 REST-JSON shim.
    Option(
        "--http-listen",
        "v4 shim listen address, '' to run without it",
        listen_address(8080, optional=True),
        "HOST:PORT",
    ),
    Option(
        "--http-tls-cert",
        "serve the v4 shim over HTTPS with this certificate chain (the UserSig travels in"
        " the query string: use it off loopback)",
        _path_or_none,
        "PEM",
    ),
    Option("--http-tls-key", "private key of --http-tls-cert", _path_or_none, "PEM"),
    Option(
        "--grpc-target",
        "run only the v4 shim, against this remote gRPC server",
        lambda text: target_address(text) or None,
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
        "accept v4 calls without checking UserSig; for local experiments only, so refused"
        " unless --http-listen is a loopback address",
        switch=True,
    ),
    Option("--max-body-bytes", "largest v4 request body accepted", positive_int, "N"),
    # Webhooks, as the hosted service sends them (server.webhooks), and event retention.
    Option(
        "--callback-url",
        "POST Follow.CallbackAfterFollowAdd / CallbackAfterFollowDelete webhooks here (needs"
        " --sdkappid); repeatable, each URL gets every webhook",
        callback_url,
        "URL",
        repeat=True,
    ),
    Option(
        "--callback-token",
        "sign webhooks: RequestTime and Sign=sha256(token + RequestTime) in their URL"
        " (prefer --callback-token-file)",
        _text_or_none,
        "TOKEN",
    ),
    Option(
        "--callback-token-file", "read the callback token from this file", _path_or_none, "PATH"
    ),
    Option(
        "--callback-retry-budget",
        "how long a webhook is retried before it is parked (kept, logged, not sent again)",
        duration,
        "DURATION",
    ),
    Option("--callback-timeout", "how long one webhook request may take", duration, "DURATION"),
    Option(
        "--callback-concurrency",
        "webhook requests on the wire at once per URL, per server process",
        positive_int,
        "N",
    ),
    Option(
        "--callback-backoff-min",
        "the first retry's wait (it doubles each time)",
        duration,
        "DURATION",
    ),
    Option("--callback-backoff-max", "the longest wait between retries", duration, "DURATION"),
    Option(
        "--event-retention",
        "how long change events are kept (for Watch to resume from) before deletion",
        duration,
        "DURATION",
    ),
)

_FIELDS = {f.name for f in fields(Settings)}
_SECRETS = ("secret_key", "callback_token")  # read with their files; never shown


def _setting_name(option: Option) -> str:
    """The Settings field an option fills ('admin' fills 'admins')."""
    return {"admin": "admins", "callback_url": "callback_urls"}.get(option.dest, option.dest)


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
    if isinstance(value, bool):
        return "on" if value else "off"
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
        if option.dest in _SECRETS:
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


CREATE_DATABASE = Option(
    "--create-database",
    "with no --database-url: when --data-dir holds no database yet, create one there"
    " (otherwise a folder without a database is refused, so a mistyped path is not taken"
    " for an empty graph)",
    switch=True,
)


def add_database_flags(parser: argparse.ArgumentParser, *, create: bool = False) -> None:
    """Flags every subcommand that opens the database shares; `create` adds
    --create-database (the subcommand may make a new embedded database)."""
    add_options(parser, (*DATABASE_OPTIONS, *((CREATE_DATABASE,) if create else ())))


def add_progress_flags(parser: argparse.ArgumentParser) -> None:
    """--progress / --no-progress, the same for every subcommand (FOLLOW_PROGRESS): progress
    bars on stderr, by default when stderr is a terminal."""
    variable = ENV_PREFIX + "PROGRESS"
    raw = os.environ.get(variable)
    default = sys.stderr.isatty()
    if raw is not None:
        try:
            default = flag_bool(raw)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"{variable}: {exc}")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=default,
        help=f"progress bars on stderr ({variable}; default: when stderr is a terminal)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROGRAM,
        usage="follow-server [serve] [OPTIONS] | follow-server {check,import,migrate} [OPTIONS]",
        description="Follow/fan relationship service: gRPC follow.v1 over PostgreSQL, with the"
        " v4 REST-JSON shim beside it.\n\n" + SUBCOMMANDS_HELP,
        epilog=EXIT_CODES,
    )
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {version()}")
    add_options(parser, SERVE_OPTIONS)
    return parser


def _secret_key(
    parser: argparse.ArgumentParser, args: argparse.Namespace, dest: str = "secret_key"
) -> str | None:
    """A secret from --<dest> or --<dest>-file (the secret key, the callback token); the
    secret is never echoed."""
    flag = "--" + dest.replace("_", "-")
    given, path = getattr(args, dest), getattr(args, dest + "_file")
    if path is None:
        return str(given) if given else None
    if given:
        parser.error(f"give {flag} or {flag}-file, not both")
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        parser.error(f"cannot read {flag}-file {path}: {exc.strerror}")
    if not key:
        parser.error(f"{flag}-file {path} is empty")
    return key


def _check_callbacks(parser: argparse.ArgumentParser, settings: Settings) -> None:
    """Webhook settings that cannot work together, said before anything starts."""
    if not settings.callback_urls:
        if settings.callback_token:
            parser.error("--callback-token signs webhooks, but no --callback-url is given")
        return
    if settings.grpc_target:
        parser.error(
            "--callback-url is served from the database; it does not apply to --grpc-target"
            " (give it to the gRPC server)"
        )
    if settings.sdkappid is None:
        parser.error("--callback-url needs --sdkappid: every webhook's URL carries SdkAppid")
    if len(set(settings.callback_urls)) != len(settings.callback_urls):
        parser.error("--callback-url: the same URL is given twice")
    if settings.callback_backoff_min > settings.callback_backoff_max:
        parser.error(
            f"--callback-backoff-min ({settings.callback_backoff_min:g}s) is longer than"
            f" --callback-backoff-max ({settings.callback_backoff_max:g}s)"
        )


def _check_tls(parser: argparse.ArgumentParser, settings: Settings) -> None:
    """Half a TLS configuration is a mistake; said before anything starts."""
    try:
        tls.tls_files(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        tls.client_files(
            settings.grpc_target_ca, settings.grpc_target_cert, settings.grpc_target_key
        )
    except tls.TlsConfigError as exc:
        parser.error(str(exc))
    if (settings.http_tls_cert is None) != (settings.http_tls_key is None):
        parser.error("--http-tls-cert and --http-tls-key must be given together")
    if settings.http_tls_cert is not None and not settings.http_listen:
        parser.error("--http-tls-cert serves the v4 shim, which --http-listen '' turns off")


def _check_v4(parser: argparse.ArgumentParser, settings: Settings) -> None:
    """Refuse to start a shim that would run open by accident."""
    open_door = settings.insecure_no_auth and settings.http_listen
    if open_door and not tls.is_loopback(settings.http_listen):
        parser.error(
            f"--insecure-no-auth accepts every v4 call unchecked, so it runs only on a"
            f" loopback address (127.0.0.1, [::1], localhost), not --http-listen"
            f" {settings.http_listen}; give --sdkappid and --secret-key-file instead"
        )
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
        if _setting_name(o) in _FIELDS and o.dest not in _SECRETS and not o.repeat
    }
    repeated: dict[str, Any] = {
        _setting_name(o): tuple(given) if (given := getattr(args, f"{o.dest}_given")) else value
        for o in SERVE_OPTIONS
        if o.repeat and (value := getattr(args, o.dest)) is not None
    }
    settings = Settings(
        **values,
        **repeated,
        secret_key=_secret_key(parser, args),
        callback_token=_secret_key(parser, args, "callback_token"),
    )
    _check_tls(parser, settings)
    _check_v4(parser, settings)
    _check_callbacks(parser, settings)
    return settings
