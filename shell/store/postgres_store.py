"""The PostgreSQL backend: ``SCAIWAVE_DATABASE_URL=postgresql://…``, through psycopg 3.

For a server that has outgrown one process, or an operator who already runs,
replicates and backs up PostgreSQL. The queries are the store's own
(:mod:`.store`), rewritten for PostgreSQL by :mod:`.dialect`; the migrations
are the same list as SQLite's.

One connection, in autocommit mode with explicit ``BEGIN`` / ``COMMIT``
(exactly like the SQLite connection's ``isolation_level=None``), used by one
thread at a time (the daemon's :class:`.async_store.AsyncStore` runs blocking
psycopg calls on Trio's worker threads). Every session sets
``synchronous_commit=on``: a commit is on the server's disk (and its
synchronous standbys, if any) before we answer, whatever the server's
default. A connection lost between transactions is opened again on the next
call; one lost inside a transaction fails that call (``unavailable``: the
server rolled it back), and the next call reconnects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from .dialect import postgres_sql, redact_url
from .schema import StorageError, migrate
from .store import Store

try:
    import psycopg
    from psycopg import pq
except ImportError:  # pragma: no cover - the error below says how to get it
    psycopg = None  # type: ignore[assignment]

__all__ = ["PgDatabase", "PostgresStore"]

#: Seconds to wait for the server when connecting.
CONNECT_TIMEOUT_S = 10
#: The advisory lock every write transaction takes (see PgDatabase.execute):
#: "SCAI" in ASCII, a key no other user of the database is likely to pick.
WRITER_LOCK = 0x53434149
#: How long the readiness probe waits for another writer's lock.
PROBE_LOCK_TIMEOUT = "1s"


class PgDatabase:
    """A psycopg connection that takes the store's SQLite-dialect SQL.

    ``execute(sql, params)`` returns a psycopg cursor (``fetchone``,
    ``fetchall``, ``rowcount``, ``description``), like sqlite-utils'
    ``Database.execute`` returns an sqlite3 cursor: the store, the migrations
    and the tests use either the same way.
    """

    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn = self._connect()

    def _connect(self) -> Any:
        if psycopg is None:
            raise StorageError("open", "PostgreSQL needs psycopg: pip install 'scaiwave-federation[postgresql]'")
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
            conn.execute("SET synchronous_commit TO on")
        except psycopg.Error as exc:
            message = " ".join(str(exc).split())[:300]
            raise StorageError("open", f"cannot connect to {redact_url(self.url)}: {message}") from None
        return conn

    @property
    def in_transaction(self) -> bool:
        # A connection the server dropped has no transaction left: the server rolled it back.
        return not self.conn.closed and self.conn.info.transaction_status != pq.TransactionStatus.IDLE

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        """Run one statement (SQLite dialect, ``?`` placeholders) and return its cursor."""
        if self.conn.closed:
            self.conn = self._connect()  # lost between transactions: nothing of ours was open
        if sql == "BEGIN IMMEDIATE":
            # SQLite's one writer at a time, kept: a write transaction takes the
            # database's writer lock first. Several workers' transactions then
            # never take row locks in crossing orders (no deadlocks, which
            # PostgreSQL breaks only after deadlock_timeout, a second), and ids
            # commit in the order they were given out (a worker reading the
            # outbox past the last id it saw misses none).
            cursor = self.conn.execute("BEGIN")
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK,))
            return cursor
        return self.conn.execute(postgres_sql(sql), tuple(params) if params else ())

    def table_names(self) -> list[str]:
        """The tables of the database's schema (like sqlite-utils' ``Database.table_names``)."""
        sql = "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() ORDER BY 1"
        return [name for (name,) in self.execute(sql).fetchall()]

    def close(self) -> None:
        self.conn.close()


class PostgresStore(Store):
    """:class:`.store.Store` on a PostgreSQL database."""

    backend = "postgresql"

    @classmethod
    def open(cls, url: str) -> PostgresStore:  # type: ignore[override]
        """Connect to ``url`` and migrate the database (which must exist).

        Raises :class:`StorageError` ``open`` when the server cannot be
        reached or refuses us (the message never shows the password),
        ``schema`` like the SQLite store.
        """
        db = PgDatabase(url)
        try:
            migrate(db)
        except StorageError:
            db.close()
            raise
        except psycopg.Error as exc:
            db.close()
            message = " ".join(str(exc).split())[:300]
            raise StorageError("open", f"cannot use {redact_url(url)}: {message}") from None
        return cls(db, None, redact_url(url))

    def _in_transaction(self) -> bool:
        return self.db.in_transaction

    def _group_usable(self) -> bool:
        # A failed statement outside a savepoint aborts the whole transaction,
        # and COMMIT of an aborted transaction rolls it back without an error.
        return not self.db.conn.closed and self.db.conn.info.transaction_status == pq.TransactionStatus.INTRANS

    @contextlib.contextmanager
    def _lazily(self) -> Iterator[None]:
        """Commit the block without waiting for the server's disk
        (``synchronous_commit=off`` for it): still atomic, and the server
        writes it out within ``wal_writer_delay`` or with the next durable
        commit, whichever comes first."""
        self.db.execute("SET synchronous_commit TO off")
        try:
            yield
        finally:
            if not self.db.conn.closed:
                self.db.execute("SET synchronous_commit TO on")

    def probe_write(self, now: int) -> str:
        """Commit one row of ``meta``, waiting at most a second for a lock;
        ``"ok"`` or PostgreSQL's reason."""
        try:
            with self._write():
                self.db.execute(f"SET LOCAL lock_timeout = '{PROBE_LOCK_TIMEOUT}'")
                self.db.execute("INSERT INTO meta (key, value) VALUES ('ready_probe_at', ?)"
                                " ON CONFLICT (key) DO UPDATE SET value = excluded.value", [str(now)])
            return "ok"
        except (psycopg.Error, StorageError) as exc:
            return f"not writable: {' '.join(str(exc).split())[:300]}"
