"""Received transactions: their stored replies, and a transaction stored whole.

A mixin of :class:`.store.Store` (kept apart so each storage module stays
small). A transaction's events, its reply, the memberships its proposals
moved and the outbox rows of the events it chained are one write
(:meth:`TxnRows.store_txn`); what they are is ``core.inbound``'s decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .schema import StorageError

__all__ = ["TxnOutcome", "TxnRows"]

Row = dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class TxnOutcome:
    """What :meth:`Store.store_txn` did.

    ``response``: the stored response to send back (the first one on a
    replay). ``replayed``: (origin, txn_id) was stored already and nothing was
    written. ``new_events``: how many events this call stored. ``outbox_ids``:
    the ids of the requests it queued (``enqueue``), in order; none on a replay.
    """

    response: bytes
    replayed: bool
    new_events: int
    outbox_ids: tuple[int, ...] = ()


class TxnRows:
    """Stored replies to received transactions (see the module docstring)."""

    # Provided by Store.
    _write: Any
    _x: Any
    _scalar: Any
    _insert: Any
    _insert_event: Any
    _enqueue_in_tx: Any
    set_membership: Any

    def get_txn_response(self, origin: str, txn_id: str) -> bytes | None:
        """Return the stored response to (origin, txn_id), or None."""
        sql = "SELECT response FROM txns WHERE origin = ? AND txn_id = ?"
        value = self._scalar(sql, origin, txn_id)
        return None if value is None else bytes(value)

    def save_txn_response(self, origin: str, txn_id: str, response: bytes, now: int) -> bool:
        """Store the response to (origin, txn_id); False, changing nothing, if
        one is stored already: the first response stands."""
        row = {"origin": origin, "txn_id": txn_id, "response": _blob(response), "created_at": now}
        return self._insert("txns", row, "ON CONFLICT DO NOTHING").rowcount == 1

    def store_txn(
        self, origin: str, txn_id: str, response: bytes, now: int, room_id: str | None,
        events: Sequence[Row], enqueue: Sequence[tuple[str, str, str, bytes]] = (),
        memberships: Sequence[tuple[str, str, str]] = (),
    ) -> TxnOutcome:
        """Store a transaction's events and its response in one database
        transaction, and queue ``enqueue`` (``(peer, txn_id, path, body)``, as
        :meth:`enqueue_many`: the events it chained, for the rooms' member
        servers) and set ``memberships`` (``(room_id, user_id, membership)``,
        the moves its proposals made) in that same transaction: a chained
        event is queued in the order it was chained, and never stored without
        being queued or its membership moved.

        If (origin, txn_id) is stored already nothing is written and the first
        response comes back (``replayed=True``). Raises like
        :meth:`store_events`, and then the response is not stored either.
        With ``room_id`` None the events may span rooms: each names its own in
        a ``room_id`` key (else ``invalid``).
        """
        with self._write():
            first = self.get_txn_response(origin, txn_id)
            if first is not None:
                return TxnOutcome(response=first, replayed=True, new_events=0)
            new = 0
            for event in events:
                room = room_id if room_id is not None else event.get("room_id")
                if room is None:
                    raise StorageError("invalid", "an event of the transaction names no room")
                new += self._insert_event(room, event)
            for member_room, user_id, membership in memberships:
                self.set_membership(member_room, user_id, membership)
            self.save_txn_response(origin, txn_id, response, now)
            ids = self._enqueue_in_tx(enqueue, now) if enqueue else []
        return TxnOutcome(response=bytes(response), replayed=False, new_events=new, outbox_ids=tuple(ids))

    def prune_txns(self, before: int) -> int:
        """Forget txn responses created before ``before``; return how many.
        (Peers retry a transaction for minutes, not forever.)"""
        return self._x("DELETE FROM txns WHERE created_at < ?", before).rowcount


def _blob(value: bytes) -> bytes:
    if isinstance(value, str):  # stored as TEXT, it would never compare equal to a BLOB
        raise StorageError("invalid", "expected bytes, got str")
    return bytes(value)
