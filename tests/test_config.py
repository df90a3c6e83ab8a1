"""server.config: one table of options drives the flags and their FOLLOW_* variables, with
the same checks for both; a flag wins over its variable, which wins over the default."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from server.config import (
    DATABASE_OPTIONS,
    SERVE_OPTIONS,
    Settings,
    add_database_flags,
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
