"""server/cli.py: every start-up mistake, run through the real `follow-server` in a
subprocess, ends in one line on stderr (one JSON object with --log-format json) that says
what is wrong and what to do, and exit status 2 (usage or configuration) or 1 (a failure at
run time), before anything is started where it can be checked first. Never a traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO


@dataclass
class Outcome:
    """What one run of follow-server left: its exit status and its stderr lines."""

    code: int
    lines: list[str]

    @property
    def line(self) -> str:
        """The one line a failed start prints; fails the test if there is not exactly one."""
        assert len(self.lines) == 1, "\n".join(self.lines)
        return self.lines[0]


def follow_server(*args: str, env: dict[str, str] | None = None, timeout: float = 90) -> Outcome:
    """Run `python -m server ARGS` with no FOLLOW_* variables but `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FOLLOW_")}
    done = subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=REPO,
        env={**clean, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr, done.stderr
    return Outcome(done.returncode, lines)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port some other process listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "pgdata"


def _serve(data_dir: Path, *args: str) -> tuple[str, ...]:
    """Flags of a server that would start, but for `args`."""
    return (
        "--data-dir",
        str(data_dir),
        "--insecure-no-auth",
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        *args,
    )


@pytest.mark.parametrize("flag", ["--grpc-listen", "--http-listen", "--metrics-listen"])
def test_a_taken_port_is_one_line_and_exit_1_before_the_database_starts(
    taken_port: int, data_dir: Path, flag: str
) -> None:
    outcome = follow_server(*_serve(data_dir, flag, f"127.0.0.1:{taken_port}"))
    assert outcome.code == 1
    assert outcome.line == (
        f"follow-server: error: {flag} 127.0.0.1:{taken_port}: the port is already in use by"
        " another process; stop it or choose another port"
    )
    assert not data_dir.exists(), "the embedded database was started anyway"


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ("--grpc-listen", "50060"),
            "argument --grpc-listen: '50060' has no host: give HOST:PORT, e.g. 127.0.0.1:50060",
        ),
        (
            ("--http-listen", "localhost"),
            "argument --http-listen: 'localhost' has no port: give HOST:PORT, e.g. localhost:8080",
        ),
        (
            ("--http-listen", "127.0.0.1:99999"),
            "argument --http-listen: '127.0.0.1:99999': the port must be a number from 0 to 65535",
        ),
        (("--sdkappid", "abc"), "argument --sdkappid: 'abc' is not a whole number"),
        (
            ("--insecure-no-auth", "--http-listen", "0.0.0.0:8080"),
            "--insecure-no-auth accepts every v4 call unchecked, so it runs only on a loopback",
        ),
        (("--tls-cert", "server.pem"), "--tls-cert and --tls-key must be given together"),
        (
            ("chekc",),
            "unknown command 'chekc': the commands are serve (the default), check, import, migrate",
        ),
        (("--no-such-flag",), "unrecognized arguments: --no-such-flag"),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2(args: tuple[str, ...], said: str) -> None:
    outcome = follow_server(*args)
    assert outcome.code == 2
    assert outcome.line.startswith(f"follow-server: error: {said}"), outcome.line


def test_a_bad_variable_is_named_like_a_bad_flag() -> None:
    outcome = follow_server(env={"FOLLOW_HTTP_LISTEN": "127.0.0.1:99999"})
    assert outcome.code == 2
    assert "FOLLOW_HTTP_LISTEN: '127.0.0.1:99999': the port must be" in outcome.line


def test_unreadable_tls_file_is_one_line_before_the_database_starts(
    tmp_path: Path, data_dir: Path
) -> None:
    outcome = follow_server(
        *_serve(data_dir, "--tls-cert", str(tmp_path / "no.pem"), "--tls-key", "k.pem")
    )
    assert outcome.code == 2
    assert f"cannot read certificate {tmp_path / 'no.pem'}" in outcome.line
    assert not data_dir.exists()


def test_data_dir_under_proc(tmp_path: Path) -> None:
    outcome = follow_server(*_serve(Path("/proc/follow")))
    assert outcome.code == 2
    assert outcome.line == (
        "follow-server: error: --data-dir /proc/follow is under /proc, a kernel file system,"
        " not storage; give a folder on disk (default var/pgdata)"
    )


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    outcome = follow_server(*_serve(afile))
    assert outcome.code == 2
    assert f"--data-dir {afile} is a file, not a folder" in outcome.line


def test_data_dir_full_of_other_files_is_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    before = folder.stat()
    outcome = follow_server(*_serve(folder))
    assert outcome.code == 2
    assert f"--data-dir {folder} holds files but no PostgreSQL database" in outcome.line
    after = folder.stat()
    assert (after.st_uid, after.st_mode) == (before.st_uid, before.st_mode)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_failed_embedded_start_says_postgres_own_reason(tmp_path: Path) -> None:
    """A folder that claims to be a database but is not: PostgreSQL's own complaint, in one
    line, exit 1 (it used to be a CalledProcessError with the reason buried in a log)."""
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "PG_VERSION").write_text("99\n")
    outcome = follow_server(*_serve(folder))
    assert outcome.code == 1
    assert outcome.lines[-1].startswith(
        f"follow-server: error: embedded PostgreSQL did not start in {folder}:"
    )
    assert "version 99" in outcome.lines[-1]
    assert all("error" not in line for line in outcome.lines[:-1]), outcome.lines


UNREACHABLE = "postgresql://postgres@127.0.0.1:1/follow"


def test_unreachable_database_url() -> None:
    outcome = follow_server(
        "--database-url", UNREACHABLE, "--insecure-no-auth", "--grpc-listen", "127.0.0.1:0"
    )
    assert outcome.code == 1
    assert outcome.line == (
        f"follow-server: error: cannot connect to --database-url {UNREACHABLE}: connection"
        " refused (is PostgreSQL running there, on that port?)"
    )


def test_database_url_password_is_not_printed() -> None:
    url = "postgresql://postgres:hunter2@127.0.0.1:1/follow"
    outcome = follow_server("--database-url", url, "--insecure-no-auth")
    assert outcome.code == 1
    assert "hunter2" not in outcome.line
    assert "postgresql://postgres:***@127.0.0.1:1/follow" in outcome.line


@pytest.mark.parametrize(
    "args",
    [
        ("--log-format", "json", "--grpc-listen", "50060"),
        ("--log-format", "json", "--database-url", UNREACHABLE, "--insecure-no-auth"),
        ("check", "--log-format", "json", "--data-dir", "/nonexistent/follow"),
    ],
    ids=["usage", "runtime", "subcommand"],
)
def test_with_log_format_json_the_line_is_a_json_object(args: tuple[str, ...]) -> None:
    outcome = follow_server(*args)
    assert outcome.code in (1, 2)
    entry = json.loads(outcome.line)
    assert entry["level"] == "ERROR"
    assert entry["logger"].startswith("follow-server")
    assert entry["message"]


def test_json_from_the_variable_too() -> None:
    outcome = follow_server("--grpc-listen", "50060", env={"FOLLOW_LOG_FORMAT": "json"})
    assert outcome.code == 2
    assert "has no host" in json.loads(outcome.line)["message"]


def test_check_refuses_a_data_dir_without_a_database(data_dir: Path) -> None:
    """`check` on a folder that holds no database used to create one and report 0
    violations (exit 0): now nothing is created and the mistake is named."""
    outcome = follow_server("check", "--data-dir", str(data_dir))
    assert outcome.code == 2
    assert outcome.line.startswith(
        f"follow-server check: error: --data-dir {data_dir} holds no database yet"
    )
    assert not data_dir.exists()


def test_import_refuses_a_missing_file_before_starting_anything(data_dir: Path) -> None:
    outcome = follow_server("import", "--accounts", "/nonexistent.csv", "--data-dir", str(data_dir))
    assert outcome.code == 2
    assert outcome.line == (
        "follow-server import: error: argument --accounts: /nonexistent.csv: no such file"
        " (see follow-server import --help)"
    )
    assert not data_dir.exists()


def test_import_needs_create_database_for_a_new_data_dir(tmp_path: Path, data_dir: Path) -> None:
    accounts = tmp_path / "accounts.csv"
    accounts.write_text("alice\nbob\n")
    refused = follow_server("import", "--accounts", str(accounts), "--data-dir", str(data_dir))
    assert refused.code == 2
    assert "--create-database makes a new one" in refused.line
    assert not data_dir.exists()
    created = follow_server(
        "import",
        "--accounts",
        str(accounts),
        "--data-dir",
        str(data_dir),
        "--create-database",
        "--no-progress",
    )
    assert created.code == 0, created.lines
    assert any("imported 2 account(s)" in line for line in created.lines)
    checked = follow_server("check", "--data-dir", str(data_dir), "--no-progress")
    assert checked.code == 0, checked.lines


def test_help_names_the_commands_the_variables_and_the_exit_codes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "server", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    text = " ".join(done.stdout.split())
    for words in (
        "follow-server check [--repair]",
        "follow-server import --accounts FILE",
        "FOLLOW_GRPC_LISTEN; default 127.0.0.1:50051",
        "FOLLOW_HTTP_TLS_CERT",
        "exit status: 0",
        "2 a usage or configuration mistake",
    ):
        assert words in text, words


def test_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "server", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.startswith("follow-server ")
