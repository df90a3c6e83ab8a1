"""A throwaway single PostgreSQL server without Citus, built like tests.support.citus' nodes.

The Citus bench (`make bench-citus`) compares the cluster with one plain server, and the
comparison is only fair when both run the same PostgreSQL binaries with the same settings:
so this is the harness's own machinery (initdb, pg_ctl, runuser as root, 127.0.0.1 only,
trust auth, one temporary folder deleted by `stop()`) with zero workers, no Citus preloaded
and no Citus settings.

    with SinglePostgres() as pg:
        url = pg.url                           # its `follow` database
        other = pg.create_database("bench")    # another one
"""

from __future__ import annotations

from pathlib import Path

from tests.support.citus import DATABASE, DEFAULT_SETTINGS, CitusCluster, Node, pg_bin


def postgres_missing_reason(bin_dir: Path | None = None) -> str | None:
    """Why a plain server cannot start here (a sentence), or None if it can."""
    bin_dir = bin_dir or pg_bin()
    for tool in ("initdb", "pg_ctl", "postgres", "psql"):
        if not (bin_dir / tool).exists():
            return f"PostgreSQL not found: no {tool} in {bin_dir}"
    return None


class SinglePostgres(CitusCluster):
    """One PostgreSQL server (the cluster harness with no workers and no Citus)."""

    def __init__(
        self, *, bin_dir: Path | None = None, settings: dict[str, str] | None = None
    ) -> None:
        super().__init__(0, bin_dir=bin_dir)
        plain = {
            key: value
            for key, value in DEFAULT_SETTINGS.items()
            if key != "shared_preload_libraries" and not key.startswith("citus.")
        }
        self.settings = {**plain, **(settings or {})}

    def start(self) -> SinglePostgres:
        """initdb and start the server, then create the `follow` database."""
        reason = postgres_missing_reason(self.bin_dir)
        if reason:
            raise RuntimeError(reason)
        if self.root is not None:
            raise RuntimeError("this server is already started")
        try:
            self._start_nodes()
            self.create_database(DATABASE, citus=False)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> SinglePostgres:
        return self.start()

    @property
    def node(self) -> Node:
        """The one server."""
        return self._coordinator()

    def create_database(self, name: str, *, citus: bool = False) -> str:
        """CREATE DATABASE `name` (never with Citus here); returns its URL."""
        if citus:
            raise ValueError("a SinglePostgres has no Citus")
        return super().create_database(name, citus=False)
