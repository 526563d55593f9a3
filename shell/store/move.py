"""``scaiwave admin db migrate --to postgresql://…``: a stopped server's SQLite data, moved to PostgreSQL.

Every table of the schema is copied, whatever it holds (keys, policy, peers,
tenants, users, rooms, members, events, invites, cursors, nonces, txns,
outbox, proposals, and tables later migrations add), in one PostgreSQL
transaction:

1. the SQLite file is opened in SQLite's EXCLUSIVE locking mode and read in
   one transaction: a daemon that has it open makes that fail (``conflict``:
   stop it first), and no daemon can open it while the copy runs;
2. the target is migrated to the newest schema and must hold no rows in any
   of our tables (``conflict`` otherwise: nothing is ever merged);
3. tables are copied parents first (foreign keys), with PostgreSQL's COPY;
   the outbox's id sequence continues after the highest id SQLite ever gave
   out (ids are never reused);
4. each table's row count is compared on both sides before the commit; a
   difference rolls everything back (``internal_error``).

Refusals raise :class:`MoveError` with a stable ``code``; the CLI prints
``error: CODE: message`` and exits 1, never a traceback.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlite_utils

from .dialect import is_postgres_url, redact_url
from .schema import StorageError, migrate
from .store import DB_FILENAME

__all__ = ["MoveError", "move_to_postgres"]

#: Rows read from SQLite per batch.
BATCH = 5_000


class MoveError(Exception):
    """The move was refused or failed; nothing was committed to the target."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def move_to_postgres(data_dir: Path, url: str, progress: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Copy ``<data_dir>/scaiwave.db`` into the empty PostgreSQL database at ``url``.

    Returns ``{"from", "to", "schema_version", "tables": {name: rows}}``.
    Raises :class:`MoveError`: ``bad_request`` (not a postgresql:// URL),
    ``not_found`` (no database file), ``conflict`` (the daemon holds the
    file, or the target has rows), ``storage_unavailable`` (the server cannot
    be reached), ``internal_error`` (a count differs; nothing committed).
    """
    if not is_postgres_url(url):
        raise MoveError("bad_request", f"--to takes a postgresql:// URL, got {redact_url(url)[:80]!r}")
    path = Path(data_dir) / DB_FILENAME
    if not path.is_file():
        raise MoveError("not_found", f"no SQLite database at {path} (SCAIWAVE_DATA_DIR)")
    source = _open_exclusive(path)
    try:
        return _move(source, path, url, progress or (lambda table, rows: None))
    finally:
        source.close()


def _open_exclusive(path: Path) -> sqlite_utils.Database:
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        db = sqlite_utils.Database(conn, execute_plugins=False)
        migrate(db)  # what the daemon would do at its next start; takes the lock for good
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("SELECT count(*) FROM meta").fetchone()
    except sqlite3.OperationalError as exc:
        conn.close()
        if "locked" in str(exc) or "busy" in str(exc):
            raise MoveError("conflict", f"{path} is in use: stop the daemon (`scaiwave serve`) first, "
                                        "then move its data") from None
        raise MoveError("not_found", f"cannot read {path}: {exc}") from None
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise MoveError("not_found", f"{path} is not a scaiwave database: {exc}") from None
    except StorageError as exc:
        conn.close()
        raise MoveError(exc.code if exc.code == "schema" else "not_found", str(exc)) from None
    return db


def _tables_in_order(source: sqlite_utils.Database) -> list[str]:
    """The schema's tables, each after the tables its foreign keys name."""
    names = [n for n in source.table_names() if n != "meta" and not n.startswith("sqlite_")]
    parents = {n: {fk.other_table for fk in source.table(n).foreign_keys} - {n} for n in names}
    ordered: list[str] = []
    while len(ordered) < len(names):
        ready = sorted(n for n in names if n not in ordered and parents[n] <= set(ordered))
        if not ready:  # pragma: no cover - our schema has no cycles
            raise MoveError("internal_error", "the schema's foreign keys form a cycle")
        ordered.extend(ready)
    return ordered


#: Tables a fresh migration fills with seed rows (migration 4's shared-state
#: generation): an empty target holds these rows and nothing else, and the
#: copy replaces them with the source's.
SEEDED = {"generations": "name = 'shared' AND value = 0"}


def _move(source: sqlite_utils.Database, path: Path, url: str, progress: Callable[[str, int], None]) -> dict[str, Any]:
    from .postgres_store import PostgresStore

    try:
        target = PostgresStore.open(url)
    except StorageError as exc:
        code = "storage_unavailable" if exc.code == "open" else "conflict"
        raise MoveError(code, str(exc)) from None
    db = target.db
    try:
        tables = _tables_in_order(source)
        missing = sorted(set(tables) - set(db.table_names()))
        if missing:
            raise MoveError("internal_error", f"the target lacks tables {', '.join(missing)}")
        full = [t for t in tables if db.execute(
            f"SELECT 1 FROM {t} WHERE NOT ({SEEDED[t]}) LIMIT 1" if t in SEEDED else f"SELECT 1 FROM {t} LIMIT 1"
        ).fetchone() is not None]
        if full:
            raise MoveError("conflict", f"{target.location} is not empty (rows in {', '.join(full)}): "
                                        "moving never merges; give an empty database")
        counts: dict[str, int] = {}
        db.execute("BEGIN")
        try:
            for table in SEEDED:
                db.execute(f"DELETE FROM {table}")
            for table in tables:
                counts[table] = _copy_table(source, db, table)
                progress(table, counts[table])
            _continue_sequences(source, db, tables)
            for table in tables:
                got = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                if got != counts[table] or counts[table] != source.execute(f"SELECT count(*) FROM {table}").fetchone()[0]:
                    raise MoveError("internal_error", f"{table}: {counts[table]} rows read, {got} in the target; "
                                                      "nothing was committed")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return {"from": str(path), "to": target.location, "schema_version": target.schema_version(),
                "tables": counts}
    except MoveError:
        raise
    except Exception as exc:  # the server went away, a row PostgreSQL refuses: one line, nothing committed
        raise MoveError("internal_error", f"the copy failed, nothing was committed: "
                                          f"{' '.join(str(exc).split())[:300]}") from None
    finally:
        target.close()


def _copy_table(source: sqlite_utils.Database, db: Any, table: str) -> int:
    columns = [c.name for c in source[table].columns]
    cursor = source.execute(f"SELECT {', '.join(columns)} FROM {table}")
    rows = 0
    with db.conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        while batch := cursor.fetchmany(BATCH):
            for row in batch:
                copy.write_row(row)
            rows += len(batch)
    return rows


def _continue_sequences(source: sqlite_utils.Database, db: Any, tables: list[str]) -> None:
    """Identity columns (the outbox's id) go on after the highest id SQLite ever gave out."""
    given = dict(source.execute("SELECT name, seq FROM sqlite_sequence").fetchall()) \
        if "sqlite_sequence" in source.table_names() else {}
    identity = db.execute("SELECT table_name, column_name FROM information_schema.columns"
                          " WHERE table_schema = current_schema() AND is_identity = 'YES'").fetchall()
    for table, column in identity:
        if table not in tables:
            continue
        highest = max(given.get(table) or 0, db.execute(f"SELECT coalesce(max({column}), 0) FROM {table}").fetchone()[0])
        if highest:
            db.execute("SELECT setval(pg_get_serial_sequence(?, ?), ?)", [table, column, highest])
