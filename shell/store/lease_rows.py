"""The rows several workers share: leases, the shared-state generation, and
what the outbox's owner reads of rows other workers queued.

A mixin of :class:`.store.Store` (kept apart so each storage module stays
small). Who may claim what, and when a holder is presumed dead, is
``core.leases``'s decision; these are its conditional writes. Every statement
is portable SQL (``?`` placeholders, ``INSERT ... ON CONFLICT ... DO UPDATE
... WHERE``, integer milliseconds), the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .schema import StorageError

__all__ = ["LeaseRows", "briefly", "LEASE_BUSY_MS"]

Row = dict[str, Any]
T = TypeVar("T")

#: How long a lease write waits for another process's write lock. The store
#: runs one call at a time: a renewal stuck behind a lock held for long (a
#: backup, an admin's sqlite3 shell) would hold up every request behind it
#: for the connection's 10 s; it fails fast instead, and the lease loop
#: tries again (a lease lasts three renewals).
LEASE_BUSY_MS = 1000


def briefly(store: Any, call: Callable[[], T]) -> T:
    """Run ``call`` (a lease write) on ``store`` waiting at most
    :data:`LEASE_BUSY_MS` for a write lock (SQLite's busy timeout, as the
    readiness probe does; another backend sets its own lock timeout).
    Runs on the storage thread."""
    db = getattr(store, "db", None)
    if db is None or not isinstance(getattr(db, "conn", None), sqlite3.Connection):
        return call()
    (busy,) = db.execute("PRAGMA busy_timeout").fetchone()
    db.execute(f"PRAGMA busy_timeout = {LEASE_BUSY_MS}")
    try:
        return call()
    finally:
        db.execute(f"PRAGMA busy_timeout = {int(busy)}")


class LeaseRows:
    """Leases, the generation counter, and outbox reads for workers (see the module doc)."""

    # Provided by Store.
    _write: Any
    _lazily: Any
    _all: Any
    _one: Any
    _x: Any
    _scalar: Any
    _insert: Any

    # -- leases ----------------------------------------------------------------------

    def claim_lease(self, name: str, owner: str, expires_at: int, now: int) -> tuple[bool, Row | None]:
        """Take lease ``name`` for ``owner`` until ``expires_at`` if it is free,
        stale (``expires_at <= now``) or ``owner``'s already. Returns
        ``(taken, the row as it is now)``. One conditional write: of two
        workers claiming at once, one wins."""
        with self._lazily(), self._write():
            taken = self._x(
                "INSERT INTO leases (name, owner, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at"
                " WHERE leases.expires_at <= ? OR leases.owner = ?",
                name, owner, expires_at, now, owner).rowcount == 1
            return taken, self._one("SELECT name, owner, expires_at FROM leases WHERE name = ?", name)

    def renew_leases(self, owner: str, names: Sequence[str], expires_at: int) -> list[Row]:
        """Extend ``owner``'s leases among ``names`` to ``expires_at`` (only
        where ``owner`` still holds them); return the whole lease table after."""
        with self._lazily(), self._write():
            for start in range(0, len(names), 500):
                chunk = list(names[start:start + 500])
                marks = ", ".join("?" * len(chunk))
                self._x(f"UPDATE leases SET expires_at = ? WHERE owner = ? AND name IN ({marks})",
                        expires_at, owner, *chunk)
            return self.lease_rows()

    def release_lease(self, name: str, owner: str) -> bool:
        """Give lease ``name`` up if ``owner`` holds it; True if it did."""
        with self._lazily(), self._write():
            return self._x("DELETE FROM leases WHERE name = ? AND owner = ?", name, owner).rowcount == 1

    def lease_rows(self) -> list[Row]:
        """The whole lease table, by name."""
        return self._all("SELECT name, owner, expires_at FROM leases ORDER BY name")

    # -- the shared-state generation ------------------------------------------------

    def shared_generation(self) -> int:
        """The counter bumped by every :meth:`shared_change` (one indexed read)."""
        return int(self._scalar("SELECT value FROM generations WHERE name = 'shared'") or 0)

    def shared_change(self, change: Callable[[], T], *, expect: int | None = None) -> tuple[T, int]:
        """Run ``change`` (writes to state workers cache: the key ring, the
        policy, peers' pauses) and bump the shared generation, in one
        transaction; return ``(its result, the new generation)``. With
        ``expect``, only if the generation is still ``expect`` (else
        ``conflict``, and nothing is written): another worker changed the
        state first (a key rotation that must happen once)."""
        with self._write():
            if expect is not None:
                current = self.shared_generation()
                if current != expect:
                    raise StorageError("conflict", f"shared state changed (generation {current}, not {expect})")
            result = change()
            self._x("UPDATE generations SET value = value + 1 WHERE name = 'shared'")
            return result, self.shared_generation()

    # -- backfill jobs, as every worker's admin API shows them -----------------------

    def save_job(self, job_id: int | None, view: Row, now: int) -> int:
        """Store a backfill job's view (its admin API answer, without ``id``);
        ``job_id`` None: a new job. Returns the job's id. Not flushed on its
        own (a progress report lost to a power cut is harmless)."""
        text = json.dumps({k: v for k, v in view.items() if k != "id"}, sort_keys=True)
        with self._lazily():
            if job_id is None:
                # RETURNING, not lastrowid: PostgreSQL's cursors have none.
                return int(self._scalar("INSERT INTO jobs (view, updated_at) VALUES (?, ?) RETURNING id", text, now))
            self._x("UPDATE jobs SET view = ?, updated_at = ? WHERE id = ?", text, now, job_id)
            return job_id

    def get_job(self, job_id: int) -> Row | None:
        """A backfill job's view (with ``id``), or None."""
        text = self._scalar("SELECT view FROM jobs WHERE id = ?", job_id)
        return None if text is None else {"id": job_id, **json.loads(text)}

    def prune_jobs(self, before: int) -> int:
        """Forget jobs not updated since ``before``; return how many."""
        return self._x("DELETE FROM jobs WHERE updated_at < ?", before).rowcount

    # -- the outbox, as its owner reads it -------------------------------------------

    def outbox_after(self, after_id: int, limit: int = 5000) -> list[Row]:
        """``id`` and ``peer`` of the queued rows with ``id > after_id``, by id."""
        return self._all("SELECT id, peer FROM outbox WHERE id > ? ORDER BY id LIMIT ?", after_id, limit)

    #: Read in every write that queues a post for a peer: answered from the
    #: ``(peer, id)`` index alone, in its order (migration 5).
    OUTBOX_BETWEEN = "SELECT id FROM outbox WHERE peer = ? AND id > ? AND id < ? ORDER BY id"

    def outbox_between(self, peer: str, after_id: int, before_id: int) -> list[int]:
        """The ids of ``peer``'s queued rows with ``after_id < id < before_id``, by id."""
        return [r[0] for r in self._x(self.OUTBOX_BETWEEN, peer, after_id, before_id).fetchall()]

    def outbox_ids(self, peers: Sequence[str]) -> list[tuple[int, str]]:
        """``(id, peer)`` of every row queued for ``peers``, by id."""
        out: list[tuple[int, str]] = []
        for start in range(0, len(peers), 500):
            chunk = list(peers[start:start + 500])
            marks = ", ".join("?" * len(chunk))
            out += [(r["id"], r["peer"]) for r in
                    self._all(f"SELECT id, peer FROM outbox WHERE peer IN ({marks}) ORDER BY id", *chunk)]
        return sorted(out)

    def outbox_from(self, peer: str, after_id: int, limit: int) -> list[Row]:
        """``peer``'s next ``limit`` rows with ``id > after_id`` (id, peer, body
        and backoff), by id: a refill of its delivery window (core.handover),
        from the ``(peer, id)`` index."""
        return self._all("SELECT id, peer, body, attempts, next_attempt_at FROM outbox"
                         " WHERE peer = ? AND id > ? ORDER BY id LIMIT ?", peer, after_id, limit)

    def outbox_rows(self, ids: Sequence[int]) -> list[Row]:
        """The rows with these ids still queued (their peer, body and backoff), by id."""
        out: list[Row] = []
        for start in range(0, len(ids), 500):
            chunk = list(ids[start:start + 500])
            marks = ", ".join("?" * len(chunk))
            out += self._all(f"SELECT id, peer, body, attempts, next_attempt_at FROM outbox WHERE id IN ({marks})",
                             *chunk)
        return sorted(out, key=lambda r: r["id"])

    def queued_peers(self) -> list[str]:
        """The peers with anything queued, by name."""
        # A skip scan of the (peer, id) index, one seek per peer: DISTINCT read
        # every row of it (100,000 rows queued for a dead peer: at every resync).
        return [r["peer"] for r in self._all(
            "WITH RECURSIVE p(peer) AS (SELECT min(peer) FROM outbox UNION ALL"
            " SELECT (SELECT min(peer) FROM outbox WHERE peer > p.peer) FROM p WHERE p.peer IS NOT NULL)"
            " SELECT peer FROM p WHERE peer IS NOT NULL")]
