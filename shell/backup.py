"""Online backup of the daemon's database (``scaiwave admin db backup``).

The daemon copies its own ``scaiwave.db`` with SQLite's backup API, from a
second connection, while it keeps serving: the copy is taken in one read
transaction, so it is one consistent moment of the database (WAL mode lets
the daemon's writer go on meanwhile). The copy is then checked
(``PRAGMA integrity_check``), flushed to disk, and only then reported.

The file is created mode 0600 and never overwritten: it holds the federation
key's seed, like the database itself. A failed backup (a full disk, say)
removes what it wrote. The daemon writes it, not the CLI, so that it works
when the daemon runs as a user the admin is not (systemd's ``DynamicUser``):
the default place is ``<data_dir>/backups/``, which a hardened unit can write.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

__all__ = ["BackupError", "backup_database", "default_backup_path"]


class BackupError(Exception):
    """The backup could not be made. ``code`` is a :class:`Code` value; ``str()`` is for the admin."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def default_backup_path(data_dir: Path, now_ms: int) -> Path:
    """``<data_dir>/backups/scaiwave-YYYYMMDDTHHMMSSZ.db`` (the directory is created, mode 0700)."""
    folder = data_dir / "backups"
    folder.mkdir(mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now_ms / 1000))
    return folder / f"scaiwave-{stamp}.db"


def backup_database(source: Path, dest: Path) -> dict[str, Any]:
    """Copy the database at ``source`` to the new file ``dest``; blocking (run it on a thread).

    Returns ``{"path", "bytes", "schema_version", "integrity"}``. Raises
    :class:`BackupError`: ``bad_request`` for a relative path or one that
    cannot be created, ``conflict`` when ``dest`` exists, ``internal_error``
    when SQLite fails (nothing is left behind then).
    """
    if not dest.is_absolute():
        raise BackupError("bad_request", f"the backup path must be absolute, got {str(dest)[:200]!r}")
    try:
        os.close(os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        raise BackupError("conflict", f"{dest} exists: a backup never overwrites a file") from None
    except OSError as exc:
        raise BackupError("bad_request", f"cannot create {dest}: {exc.strerror}") from None
    try:
        src = sqlite3.connect(source, timeout=10)
        try:
            dst = sqlite3.connect(dest)
            try:
                src.backup(dst)  # every page in one step: one snapshot
                integrity = dst.execute("PRAGMA integrity_check").fetchone()[0]
                row = dst.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            finally:
                dst.close()
        finally:
            src.close()
        with open(dest, "rb+") as f:
            os.fsync(f.fileno())
    except (sqlite3.Error, OSError) as exc:
        dest.unlink(missing_ok=True)
        raise BackupError("internal_error", f"backup failed, nothing was kept: {exc}") from None
    if integrity != "ok":
        dest.unlink(missing_ok=True)
        raise BackupError("internal_error", f"the copy failed its integrity check ({integrity}); nothing was kept")
    return {"path": str(dest), "bytes": dest.stat().st_size, "schema_version": int(row[0]) if row else 0,
            "integrity": integrity}
