"""server.database: what a data folder must be before the embedded PostgreSQL is started, and
what running as root changes, said rather than done silently."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from server.database import check_data_dir, check_database_url, say_what_root_changes
from server.errors import ConfigError, StartupError


def test_a_new_or_empty_folder_may_be_created(tmp_path: Path) -> None:
    assert check_data_dir(tmp_path / "new" / "deeper") is False
    (tmp_path / "empty").mkdir()
    assert check_data_dir(tmp_path / "empty") is False


def test_a_folder_with_a_database_is_used(tmp_path: Path) -> None:
    (tmp_path / "PG_VERSION").write_text("18\n")
    assert check_data_dir(tmp_path, create=False) is True


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda p: p.write_text("x"), "is a file, not a folder"),
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("x")), "holds files but no PostgreSQL"),
    ],
    ids=["file", "other-files"],
)
def test_unusable_folders_are_refused(tmp_path: Path, make: object, said: str) -> None:
    folder = tmp_path / "data"
    make(folder)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=said):
        check_data_dir(folder)


@pytest.mark.parametrize("path", ["/proc/follow", "/sys/x", "/dev/shm/pg"])
def test_kernel_file_systems_are_refused(path: str) -> None:
    with pytest.raises(ConfigError, match="a kernel file system"):
        check_data_dir(Path(path))


def test_under_a_file_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"cannot be created: .*afile is a file"):
        check_data_dir(tmp_path / "afile" / "data")


def test_without_create_a_folder_without_a_database_is_refused(tmp_path: Path) -> None:
    """check and import read an existing graph: a mistyped path is not an empty graph."""
    for folder in (tmp_path / "missing", tmp_path):
        with pytest.raises(ConfigError, match=r"holds no database yet.*--create-database"):
            check_data_dir(folder, create=False)
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's start hands the folder over")
def test_root_is_told_that_an_existing_folder_changes_owner(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    caplog.set_level(logging.WARNING, logger="server.database")
    say_what_root_changes(folder, exists=True)
    assert any(
        f"existing --data-dir {folder}" in r.getMessage()
        and "is given to 'pgserver'" in r.getMessage()
        for r in caplog.records
    ), caplog.text


async def test_an_unreachable_url_is_one_startup_error() -> None:
    with pytest.raises(StartupError, match=r"127\.0\.0\.1:1/x: connection refused"):
        await check_database_url("postgresql://u:secret@127.0.0.1:1/x")
    with pytest.raises(StartupError) as caught:
        await check_database_url("postgresql://u:secret@127.0.0.1:1/x")
    assert "secret" not in str(caught.value)
