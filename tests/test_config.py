"""server.config: one table of options drives the flags and their FOLLOW_* variables, with
the same checks for both; a flag wins over its variable, which wins over the default."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from server.config import (
    DATABASE_OPTIONS,
    SERVE_OPTIONS,
    Settings,
    add_database_flags,
    add_progress_flags,
    parse_settings,
)

NO_SHIM = ["--http-listen", ""]


def test_defaults_are_the_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing given, every setting is Settings()'s default."""
    for option in SERVE_OPTIONS:
        monkeypatch.delenv(option.env, raising=False)
    assert parse_settings(NO_SHIM) == Settings(http_listen="")


def test_every_variable_is_read_and_checked_like_its_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FOLLOW_* values go through the flag's own parser."""
    monkeypatch.setenv("FOLLOW_MAX_FOLLOWING", "7")
    monkeypatch.setenv("FOLLOW_LOG_LEVEL", "debug")
    monkeypatch.setenv("FOLLOW_LOG_FORMAT", "JSON")
    monkeypatch.setenv("FOLLOW_GRACE_SECONDS", "2.5")
    monkeypatch.setenv("FOLLOW_DATA_DIR", "/tmp/somewhere")
    monkeypatch.setenv("FOLLOW_INSECURE_NO_AUTH", "yes")
    s = parse_settings([])
    assert (s.max_following, s.log_level, s.log_format) == (7, "DEBUG", "json")
    assert s.grace_seconds == 2.5
    assert s.data_dir == Path("/tmp/somewhere")
    assert s.insecure_no_auth


def test_flag_wins_over_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOLLOW_MAX_FOLLOWING", "7")
    monkeypatch.setenv("FOLLOW_ADMIN", "x,y")
    s = parse_settings([*NO_SHIM, "--max-following", "9", "--admin", "z"])
    assert s.max_following == 9
    assert s.admins == ("z",)


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("FOLLOW_MAX_FOLLOWING", "-5", "FOLLOW_MAX_FOLLOWING: -5 is not a positive integer"),
        ("FOLLOW_SDKAPPID", "abc", "FOLLOW_SDKAPPID: 'abc' is not a whole number"),
        ("FOLLOW_LOG_LEVEL", "verbose", "FOLLOW_LOG_LEVEL: 'verbose' is not one of"),
        ("FOLLOW_LOG_FORMAT", "xml", "FOLLOW_LOG_FORMAT: 'xml' is not one of text, json"),
        ("FOLLOW_GRACE_SECONDS", "soon", "FOLLOW_GRACE_SECONDS: 'soon' is not a number"),
        ("FOLLOW_INSECURE_NO_AUTH", "perhaps", "FOLLOW_INSECURE_NO_AUTH: 'perhaps' is not one"),
    ],
)
def test_bad_variable_is_a_usage_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    said: str,
) -> None:
    """A bad FOLLOW_* value stops with exit status 2 and names the variable, as a bad flag
    would; it never starts with a value that refuses every call later."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exited:
        parse_settings(NO_SHIM)
    assert exited.value.code == 2
    assert said in capsys.readouterr().err


def test_bad_flag_value_names_what_is_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings([*NO_SHIM, "--sdkappid", "abc"])
    assert exited.value.code == 2
    assert "'abc' is not a whole number" in capsys.readouterr().err


def test_help_shows_every_variable_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    """--help names each option's FOLLOW_* variable and its default (never a key)."""
    with pytest.raises(SystemExit):
        parse_settings(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in SERVE_OPTIONS:
        assert option.env in text, option.flag
    assert "default 5000" in text
    assert "default 127.0.0.1:50051" in text


def test_subcommands_share_the_database_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """import and check read the same database flags and variables as the server."""
    monkeypatch.setenv("FOLLOW_DATABASE_URL", "postgresql://u@h/d")
    parser = argparse.ArgumentParser()
    add_database_flags(parser)
    args = parser.parse_args(["--log-level", "warning"])
    assert args.database_url == "postgresql://u@h/d"
    assert args.log_level == "WARNING"
    assert {o.dest for o in DATABASE_OPTIONS} <= {o.dest for o in SERVE_OPTIONS}


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--grpc-listen", "50060"], "'50060' has no host: give HOST:PORT, e.g. 127.0.0.1:50060"),
        (["--http-listen", "localhost"], "'localhost' has no port: give HOST:PORT"),
        (["--http-listen", ":8080"], "':8080' has no host"),
        (["--http-listen", "127.0.0.1:99999"], "the port must be a number from 0 to 65535"),
        (["--metrics-listen", "127.0.0.1:x"], "the port must be a number from 0 to 65535"),
        (["--grpc-listen", "::1:50051"], "write an IPv6 host in brackets"),
        (["--grpc-target", "h:0", "--insecure-no-auth"], "from 1 to 65535"),
        (["--grpc-listen", "a b:1"], "'a b' is not a host name or IP address"),
    ],
)
def test_addresses_need_a_host_and_a_port_in_range(
    capsys: pytest.CaptureFixture[str], argv: list[str], said: str
) -> None:
    """HOST:PORT everywhere: no host, no port, a port past 65535 (which used to wrap) are
    one-line usage errors that say what to give."""
    with pytest.raises(SystemExit) as exited:
        parse_settings([*argv, *NO_SHIM] if "--http-listen" not in argv else argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert said in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:0", "[::1]:8080", "localhost:1", "0.0.0.0:65535", "follow.internal:9"]
)
def test_good_addresses_are_accepted(listen: str) -> None:
    assert parse_settings(["--grpc-listen", listen, *NO_SHIM]).grpc_listen == listen


def test_variables_get_the_address_checks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FOLLOW_HTTP_LISTEN", "127.0.0.1:70000")
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--insecure-no-auth"])
    assert exited.value.code == 2
    assert "FOLLOW_HTTP_LISTEN: '127.0.0.1:70000': the port must be" in capsys.readouterr().err


def test_usage_error_is_one_line_not_a_usage_block(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--no-such-flag"])
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "follow-server: error: unrecognized arguments: --no-such-flag (see follow-server --help)"
    ]


def test_usage_error_is_json_with_log_format_json(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--log-format", "json", "--sdkappid", "abc"])
    assert exited.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "ERROR"
    assert "'abc' is not a whole number" in entry["message"]


def test_insecure_no_auth_only_on_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    """--insecure-no-auth opens every relationship to whoever reaches the port: refused
    unless the shim listens on loopback."""
    assert parse_settings(["--insecure-no-auth", "--http-listen", "[::1]:0"]).insecure_no_auth
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--insecure-no-auth", "--http-listen", "0.0.0.0:8080"])
    assert exited.value.code == 2
    assert "runs only on a loopback address" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key must be given together"),
        (["--http-tls-key", "k.pem"], "--http-tls-cert and --http-tls-key must be given"),
        (
            ["--http-tls-cert", "c", "--http-tls-key", "k", *NO_SHIM],
            "which --http-listen '' turns off",
        ),
    ],
)
def test_half_a_tls_pair_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], argv: list[str], said: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings([*argv, "--insecure-no-auth"])
    assert exited.value.code == 2
    assert said in capsys.readouterr().err


def test_help_lists_subcommands_exit_codes_and_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("follow-server check", "follow-server import", "exit status: 0", "2 a usage"):
        assert words in text
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--version"])
    assert exited.value.code == 0
    assert re.fullmatch(r"follow-server \S+\n", capsys.readouterr().out)


def test_subcommand_flags_progress_and_create(monkeypatch: pytest.MonkeyPatch) -> None:
    """--progress/--no-progress (FOLLOW_PROGRESS) and --create-database read the same way
    for every subcommand that asks for them."""
    parser = argparse.ArgumentParser()
    add_database_flags(parser, create=True)
    add_progress_flags(parser)
    args = parser.parse_args(["--no-progress", "--create-database"])
    assert (args.progress, args.create_database) == (False, True)
    monkeypatch.setenv("FOLLOW_PROGRESS", "1")
    parser = argparse.ArgumentParser()
    add_progress_flags(parser)
    assert parser.parse_args([]).progress is True


WEBHOOK = ["--sdkappid", "1400000000", *NO_SHIM]


def test_callback_options_from_flags_and_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--callback-url repeats (FOLLOW_CALLBACK_URL is comma-separated); durations take
    units; the token comes from its flag, its variable or its file, and is never in the
    Settings' repr."""
    s = parse_settings(
        [
            *WEBHOOK,
            "--callback-url",
            "http://127.0.0.1:9/a",
            "--callback-url",
            "https://hooks.example.com/b?x=1",
            "--callback-token",
            "tok",
            "--callback-retry-budget",
            "90m",
            "--callback-timeout",
            "1.5",
            "--callback-backoff-min",
            "250s",
            "--callback-backoff-max",
            "1h",
            "--event-retention",
            "2d",
        ]
    )
    assert s.callback_urls == ("http://127.0.0.1:9/a", "https://hooks.example.com/b?x=1")
    assert (s.callback_retry_budget, s.callback_timeout) == (5400.0, 1.5)
    assert (s.callback_backoff_min, s.callback_backoff_max) == (250.0, 3600.0)
    assert s.event_retention == 2 * 86400.0
    assert s.callback_token == "tok"
    assert "tok" not in repr(s)
    monkeypatch.setenv("FOLLOW_CALLBACK_URL", "http://127.0.0.1:1/x,http://127.0.0.1:2/y")
    monkeypatch.setenv("FOLLOW_CALLBACK_TOKEN", "from-env")
    s = parse_settings(WEBHOOK)
    assert s.callback_urls == ("http://127.0.0.1:1/x", "http://127.0.0.1:2/y")
    assert s.callback_token == "from-env"
    monkeypatch.delenv("FOLLOW_CALLBACK_TOKEN")
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert parse_settings([*WEBHOOK, "--callback-token-file", str(token_file)]).callback_token == (
        "from-file"
    )


def test_callback_defaults() -> None:
    """Defaults from the issue: retry budget 24 h, request timeout 2 s, retention 7 days;
    no URL means no webhooks."""
    s = Settings()
    assert s.callback_urls == ()
    assert s.callback_token is None
    assert (s.callback_retry_budget, s.callback_timeout) == (86400.0, 2.0)
    assert s.event_retention == 7 * 86400.0


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--callback-url", "ftp://x/y", *WEBHOOK], "is not an http:// or https:// URL"),
        (["--callback-url", "http:///nohost", *WEBHOOK], "is not an http:// or https:// URL"),
        (["--callback-url", "http://h/p#f", *WEBHOOK], "has no #fragment"),
        (["--callback-url", "http://h/p", *NO_SHIM], "--callback-url needs --sdkappid"),
        (["--callback-token", "t", *WEBHOOK], "but no --callback-url is given"),
        (
            ["--callback-url", "http://h/p", "--callback-url", "http://h/p", *WEBHOOK],
            "the same URL is given twice",
        ),
        (["--callback-timeout", "0", *WEBHOOK], "'0' is not a positive duration"),
        (["--event-retention", "7w", *WEBHOOK], "'7w' is not a positive duration"),
        (["--callback-retry-budget=-1h", *WEBHOOK], "is not a positive duration"),
        (
            ["--callback-url", "http://h/p", "--callback-backoff-min", "20m", *WEBHOOK],
            "--callback-backoff-min (1200s) is longer than --callback-backoff-max",
        ),
        (
            ["--callback-url", "http://h/p", "--callback-backoff-max", "0.5", *WEBHOOK],
            "is longer than --callback-backoff-max (0.5s)",
        ),
        (
            [
                "--callback-url",
                "http://h/p",
                "--grpc-target",
                "127.0.0.1:1",
                "--sdkappid",
                "1",
                "--insecure-no-auth",
                "--http-listen",
                "127.0.0.1:0",
            ],
            "it does not apply to --grpc-target",
        ),
    ],
)
def test_bad_callback_settings_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], said: str
) -> None:
    """Each webhook mistake is refused at start with one line naming the flag."""
    with pytest.raises(SystemExit) as exited:
        parse_settings(argv)
    assert exited.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert said in line


def test_bad_callback_variable_names_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad FOLLOW_CALLBACK_URL is named in the error, like every other variable."""
    monkeypatch.setenv("FOLLOW_CALLBACK_URL", "http://ok/a,not-a-url")
    with pytest.raises(SystemExit):
        parse_settings(WEBHOOK)
    assert "FOLLOW_CALLBACK_URL: 'not-a-url' is not an http" in capsys.readouterr().err
