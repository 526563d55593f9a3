"""The SQLite backend (the default): one file, ``<data_dir>/scaiwave.db``, through sqlite-utils.

WAL mode with ``synchronous=FULL``: a commit survives power loss, not just a
process crash. The file is created mode 0600 (it holds the signing key's
seed); SQLite gives its ``-wal`` and ``-shm`` files the same mode.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import sqlite_utils

from .schema import StorageError, migrate
from .store import DB_FILENAME, Store

__all__ = ["SqliteStore"]

#: How long the readiness probe waits for another writer's lock.
PROBE_BUSY_MS = 1000


class SqliteStore(Store):
    """:class:`.store.Store` on one SQLite file.

    The connection has ``check_same_thread=False`` because the daemon's
    calls run, one at a time, on whichever worker thread Trio hands out.
    """

    backend = "sqlite"

    @classmethod
    def open(cls, data_dir: Path | str) -> SqliteStore:
        """Open (creating if needed) ``<data_dir>/scaiwave.db`` and migrate it.

        Creates ``data_dir`` (mode 0700) and the file (mode 0600) if missing.
        Raises :class:`StorageError` ``schema`` for a file from a newer
        scaiwave or a failed migration, ``open`` for a file that cannot be used.
        """
        data_dir = Path(data_dir)
        path = data_dir / DB_FILENAME
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Create the file ourselves so it never exists world-readable.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            # isolation_level=None: the sqlite3 module issues no implicit BEGIN;
            # our transactions are explicit (_write). timeout: a second process
            # (the CLI while the daemon runs) waits for the write lock.
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError("open", f"cannot open {path}: {exc}") from exc
        try:
            db = sqlite_utils.Database(conn, execute_plugins=False)
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StorageError("open", f"cannot use WAL for {path} (journal mode {mode})")
            # FULL fsyncs the WAL at every commit; NORMAL could lose the last
            # commits on power loss, after we already answered the peer.
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            migrate(db)
        except StorageError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            raise StorageError("open", f"cannot open {path}: {exc}") from exc
        return cls(db, path)

    def _in_transaction(self) -> bool:
        return bool(self.db.conn.in_transaction)

    @contextlib.contextmanager
    def _lazily(self) -> Iterator[None]:
        """Commit the block without waiting for the disk (``synchronous=NORMAL``
        for it): in WAL mode it is still atomic, and the next durable commit
        (``FULL``, every other write) flushes it along with its own. Inside a
        larger transaction (a group commit, see ``AsyncStore.submit``) that
        transaction's commit decides (SQLite cannot change it midway)."""
        if self.db.conn.in_transaction:
            yield
            return
        self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            self.db.execute("PRAGMA synchronous=FULL")

    def probe_write(self, now: int) -> str:
        """Commit one row of ``meta`` with a 1 s lock wait; ``"ok"`` or SQLite's reason."""
        db = self.db
        (busy,) = db.execute("PRAGMA busy_timeout").fetchone()
        try:
            db.execute(f"PRAGMA busy_timeout = {PROBE_BUSY_MS}")
            with self._write():
                db.execute("INSERT INTO meta (key, value) VALUES ('ready_probe_at', ?)"
                           " ON CONFLICT (key) DO UPDATE SET value = excluded.value", [str(now)])
            return "ok"
        except sqlite3.Error as exc:
            return f"not writable: {exc}"
        finally:
            db.execute(f"PRAGMA busy_timeout = {int(busy)}")
