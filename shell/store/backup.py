"""Online backup of the daemon's database (``scaiwave admin db backup``).

The daemon copies its own ``scaiwave.db`` with SQLite's backup API, from a
second connection, while it keeps serving: the copy is taken in one read
transaction, so it is one consistent moment of the database (WAL mode lets
the daemon's writer go on meanwhile). The copy is then checked
(``PRAGMA integrity_check``), flushed to disk, and only then reported.

The file is created mode 0600 and never overwritten: it holds the federation
key's seed, like the database itself. A failed backup (a full disk, say)
removes what it wrote. The daemon writes it, not the CLI, so that it works
when the daemon runs as a user the admin is not (systemd's ``DynamicUser``).

Backups go into ``<data_dir>/backups/`` only, under a plain file name: the
request names the file, never a path. A token holder who could name any path
could have the daemon create files anywhere it may write, filled with text
that remote users chose (their messages are in the database).
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

__all__ = ["BackupError", "backup_database", "backup_path", "BACKUP_NAME"]


class BackupError(Exception):
    """The backup could not be made. ``code`` is a :class:`Code` value; ``str()`` is for the admin."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


#: A backup's file name: no directory part, no leading dot.
BACKUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def backup_path(data_dir: Path, name: str | None, now_ms: int) -> Path:
    """``<data_dir>/backups/NAME``, by default ``scaiwave-YYYYMMDDTHHMMSSZ.db``.

    Creates the directory (mode 0700). Raises :class:`BackupError`
    ``bad_request`` for a name that is not a plain file name.
    """
    if name is None:
        name = f"scaiwave-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now_ms / 1000))}.db"
    if not isinstance(name, str) or not BACKUP_NAME.fullmatch(name):
        raise BackupError("bad_request", f"name is a file name (letters, digits, '.', '_', '-'; no '/'), written "
                          f"into {data_dir / 'backups'}/; got {str(name)[:120]!r}")
    folder = data_dir / "backups"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise BackupError("bad_request", f"cannot create {folder}: {exc.strerror}") from None
    return folder / name


def backup_database(source: Path, dest: Path) -> dict[str, Any]:
    """Copy the database at ``source`` to the new file ``dest``; blocking (run it on a thread).

    Returns ``{"path", "bytes", "schema_version", "integrity"}``. Raises
    :class:`BackupError`: ``bad_request`` when ``dest`` cannot be created,
    ``conflict`` when it exists (a symlink included), ``internal_error`` when
    SQLite fails (nothing is left behind then).
    """
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
