"""The rows an admin's second day changes: deactivated users and their new
tokens, the first answers of idempotent sends, paused and forgotten peers.

A mixin of :class:`.storage.Store` (kept apart so each storage module stays
small); every method runs inside the store's own transactions (``_write``).
"""

from __future__ import annotations

from typing import Any

from .schema import StorageError

__all__ = ["AdminRows"]

Row = dict[str, Any]


class AdminRows:
    """Users, client transactions and peer verbs (see the module docstring)."""

    # Provided by Store.
    _write: Any
    _one: Any
    _x: Any
    get_peer: Any
    pending_count: Any
    _insert: Any
    _all: Any
    _upsert: Any

    def deactivate_user(self, user_id: str, now: int) -> Row:
        """Deactivate a user (its token stops working; memberships stay);
        return its row. Raises ``not_found``; deactivating twice keeps the first time."""
        with self._write():
            self._need_user(user_id)
            self._x("UPDATE users SET deactivated_at = ? WHERE user_id = ? AND deactivated_at IS NULL", now, user_id)
            return self._one("SELECT * FROM users WHERE user_id = ?", user_id) or {}

    def set_token_hash(self, user_id: str, token_hash: str) -> Row:
        """Give a user a new token (the old one stops working); return its row.
        Raises ``not_found``, and ``conflict`` for a deactivated user."""
        with self._write():
            row = self._need_user(user_id)
            if row["deactivated_at"] is not None:
                raise StorageError("conflict", f"user {user_id!r} is deactivated")
            self._x("UPDATE users SET token_hash = ? WHERE user_id = ?", token_hash, user_id)
            return {**row, "token_hash": token_hash}

    def _need_user(self, user_id: str) -> Row:
        row = self._one("SELECT * FROM users WHERE user_id = ?", user_id)
        if row is None:
            raise StorageError("not_found", f"no user {user_id!r}")
        return row

    def client_txn(self, user_id: str, txn_id: str) -> Row | None:
        """The first answer to ``user_id``'s send with ``txn_id``, or None."""
        return self._one("SELECT * FROM client_txns WHERE user_id = ? AND txn_id = ?", user_id, txn_id)

    def save_client_txn(self, txn: Row) -> bool:
        """Record a send's answer ``{user_id, txn_id, room_id, body_hash, response, created_at}``
        (the first one stays); True if this one was the first."""
        row = {**txn, "body_hash": bytes(txn["body_hash"])}
        return self._insert("client_txns", row, "ON CONFLICT DO NOTHING").rowcount == 1


    def paused_peers(self) -> set[str]:
        """The peers whose delivery the admin paused."""
        return {r["server_name"] for r in self._all("SELECT server_name FROM peers WHERE paused = 1")}

    def set_paused(self, peer: str, paused: bool) -> Row:
        """Pause or resume delivery to a known peer (a peers row, or queued
        transactions); return its row. Raises ``not_found`` for a name we never
        dealt with, so a typo leaves no row behind."""
        with self._write():
            if self.get_peer(peer) is None and not self.pending_count(peer):
                raise StorageError("not_found", f"no peer {peer!r} (see `peers`)")
            self._upsert("peers", {"server_name": peer, "paused": int(paused)}, "server_name")
            return self.get_peer(peer) or {}

    def forget_peer(self, peer: str, *, drop_queued: bool) -> int:
        """Delete a peer's row and its queued transactions; return how many
        were dropped. Raises ``not_found`` for an unknown peer and ``conflict``
        while transactions are queued for it, unless ``drop_queued``."""
        with self._write():
            queued = self.pending_count(peer)
            if self.get_peer(peer) is None and not queued:
                raise StorageError("not_found", f"no peer {peer!r} (see `peers`)")
            if queued and not drop_queued:
                raise StorageError("conflict", f"{queued} transactions are queued for {peer}: deliver them "
                                               "(`retry`), or forget with --force to drop them")
            self._x("DELETE FROM outbox WHERE peer = ?", peer)
            self._x("DELETE FROM peers WHERE server_name = ?", peer)
            return queued
