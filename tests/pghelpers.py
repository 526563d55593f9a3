"""A real PostgreSQL for the tests, started by the test run itself.

The ``pgserver`` wheel ships PostgreSQL 16's binaries; :func:`start` runs one
private server (its own data directory under a temporary folder, a Unix
socket, no TCP port) for the whole run. As root, pgserver runs the server as
its own system user ``pgserver`` (PostgreSQL refuses to run as root) and
opens the folder's path to it. Each test gets a fresh database: an empty one
(:meth:`PgServer.fresh`), or a copy of one migrated to the newest schema
(:meth:`PgServer.migrated`: ``CREATE DATABASE ... TEMPLATE`` copies files,
faster than running the migrations again).
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

import pgserver
import psycopg

from scaiwave_federation.shell.store.store import Store

__all__ = ["PgServer", "start"]


class PgServer:
    """One running server; databases are made on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server = pgserver.get_server(root / "pg", cleanup_mode="stop")
        self._names = itertools.count(1)
        self._template: str | None = None

    def url(self, database: str) -> str:
        return self.server.get_uri(database)

    def _create(self, name: str, template: str = "template0") -> str:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.url(name)

    def fresh(self) -> str:
        """The URL of a new, empty database."""
        return self._create(f"t{next(self._names)}")

    def migrated(self) -> str:
        """The URL of a new database already at the newest schema."""
        if self._template is None:
            self._template = "scaiwave_template"
            Store.open(self._create(self._template)).close()
        return self._create(f"t{next(self._names)}", self._template)

    def stop(self) -> None:
        self.server.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)


def start() -> PgServer:
    """Start the run's server under a new temporary folder (short: the socket lives there)."""
    return PgServer(Path(tempfile.mkdtemp(prefix="scaiwave-pg-", dir="/tmp")))
