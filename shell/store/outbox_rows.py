"""The outbox's rows: requests queued for peers, their attempts and removals.

A mixin of :class:`.storage.Store` (kept apart so each storage module stays
small); every method runs inside the store's own transactions (``_write``).
What goes to whom, when, is ``core.delivery``'s decision; these rows are its
durable mirror.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .dialect import INTEGRITY_ERRORS
from .schema import StorageError

__all__ = ["OutboxRows"]

Row = dict[str, Any]


class OutboxRows:
    """Queued requests for peers (see the module docstring)."""

    # Provided by Store.
    _write: Any
    _lazily: Any
    _one: Any
    _all: Any
    _x: Any
    _scalar: Any
    _insert: Any
    _store_events_in_tx: Any
    save_client_txn: Any
    set_membership: Any
    save_invite: Any

    def enqueue(self, peer: str, txn_id: str, path: str, body: bytes, now: int) -> int:
        """Queue a request for ``peer``, due at ``now``; return its outbox id.
        Raises ``conflict`` if ``txn_id`` is queued already."""
        if not isinstance(body, (bytes, bytearray, memoryview)):  # a str would be stored as TEXT
            raise StorageError("invalid", f"a queued body is bytes, not {type(body).__name__}")
        row = {"peer": peer, "txn_id": txn_id, "path": path, "body": bytes(body),
               "created_at": now, "next_attempt_at": now}
        try:
            # RETURNING, not lastrowid: PostgreSQL's cursors have no lastrowid.
            return int(self._insert("outbox", row, "RETURNING id").fetchone()[0])
        except INTEGRITY_ERRORS as exc:
            raise StorageError("conflict", f"txn {txn_id!r} is already queued") from exc

    def enqueue_many(self, items: Sequence[tuple[str, str, str, bytes]], now: int) -> list[int]:
        """Queue several ``(peer, txn_id, path, body)`` requests in one
        transaction (one event for every member server: one durable write);
        return their outbox ids, in order. Raises ``conflict`` like
        :meth:`enqueue`, and then none is queued."""
        with self._write():
            return self._enqueue_in_tx(items, now)

    def _enqueue_in_tx(self, items: Sequence[tuple[str, str, str, bytes]], now: int) -> list[int]:
        return [self.enqueue(peer, txn_id, path, body, now) for peer, txn_id, path, body in items]

    def store_events_and_enqueue(self, room_id: str, events: Sequence[Row],
                                 items: Sequence[tuple[str, str, str, bytes]], now: int, *,
                                 client_txn: Row | None = None,
                                 memberships: Mapping[str, str] | None = None,
                                 invite: Row | None = None) -> list[int]:
        """Store a room's new events and queue them for its member servers in
        one transaction (one durable write for a client's post): both or
        neither, with the user's send answer (``client_txn``, see
        :meth:`store_events`) and the memberships the events move (user id ->
        membership) and a local invitee's invite row (``invite``, the
        arguments of :meth:`save_invite`) if given. Returns the outbox ids;
        raises like :meth:`store_events`, :meth:`enqueue_many`,
        :meth:`set_membership` and :meth:`save_invite`."""
        with self._write():
            self._store_events_in_tx(room_id, events, None)
            for user_id, membership in (memberships or {}).items():
                self.set_membership(room_id, user_id, membership)
            if invite is not None:
                self.save_invite(**invite)
            if client_txn is not None and not self.save_client_txn(client_txn):
                # The same send answered meanwhile (by another worker): this
                # copy of the event is not stored.
                raise StorageError("conflict", f"send {client_txn['txn_id']!r} was answered already")
            return self._enqueue_in_tx(items, now)

    def delivered_many(self, ids: Sequence[int]) -> int:
        """Drop delivered requests (a whole transaction's) in one write; return
        how many were still queued (a restart may have re-sent some).

        Not flushed to disk on its own (see :meth:`_lazily`): a removal lost
        to a power cut only makes us send the items again, which the peer
        skips as duplicates. (Under load it was one fsync per transaction, on
        the disk the posts wait for.)"""
        if not ids:
            return 0
        marks = ", ".join("?" * len(ids))
        with self._lazily(), self._write():
            return self._x(f"DELETE FROM outbox WHERE id IN ({marks})", *ids).rowcount

    def due(self, peer: str | None = None, *, now: int, limit: int = 100) -> list[Row]:
        """Return queued requests with ``next_attempt_at <= now``, for ``peer``
        or all peers, in queue order, at most ``limit``."""
        if peer is None:
            sql = "SELECT * FROM outbox WHERE next_attempt_at <= ? ORDER BY id LIMIT ?"
            return self._all(sql, now, limit)
        sql = "SELECT * FROM outbox WHERE peer = ? AND next_attempt_at <= ? ORDER BY id LIMIT ?"
        return self._all(sql, peer, now, limit)

    def next_due_at(self, peer: str | None = None) -> int | None:
        """Return the earliest ``next_attempt_at`` queued (for ``peer`` or all),
        None if nothing is queued: when the sender should wake up next."""
        if peer is None:
            return self._scalar("SELECT min(next_attempt_at) FROM outbox")
        return self._scalar("SELECT min(next_attempt_at) FROM outbox WHERE peer = ?", peer)

    def pending_count(self, peer: str | None = None) -> int:
        """Return how many requests are queued, for ``peer`` or all peers."""
        if peer is None:
            return int(self._scalar("SELECT count(*) FROM outbox"))
        return int(self._scalar("SELECT count(*) FROM outbox WHERE peer = ?", peer))

    def mark_attempt(self, id: int, next_attempt_at: int) -> None:
        """Count a failed delivery and schedule the next try. Raises ``not_found``."""
        sql = "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ? WHERE id = ?"
        if self._x(sql, next_attempt_at, id).rowcount == 0:
            raise StorageError("not_found", f"no outbox entry {id}")

    def delivered(self, id: int) -> None:
        """Drop a delivered request from the outbox. Raises ``not_found``."""
        if self._x("DELETE FROM outbox WHERE id = ?", id).rowcount == 0:
            raise StorageError("not_found", f"no outbox entry {id}")

    def reset_retry(self, peer: str, now: int) -> int:
        """The admin "retry now": make every request for ``peer`` due at ``now``
        and clear the peer's ``retry_at``; return how many requests."""
        with self._write():
            sql = "UPDATE outbox SET next_attempt_at = ? WHERE peer = ?"
            count = self._x(sql, now, peer).rowcount
            self._x("UPDATE peers SET retry_at = NULL WHERE server_name = ?", peer)
        return count
