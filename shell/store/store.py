"""Durable storage for the daemon: one interface, on SQLite (the default) or PostgreSQL.

:class:`Store` is synchronous: plain methods, usable from the CLI, scripts and
tests without Trio. :class:`.async_store.AsyncStore` is what the daemon uses:
the same methods as coroutines, each run on a worker thread through a
``trio.CapacityLimiter(1)``, so the event loop never blocks on the database.

The queries live here, once; the backends (:mod:`.sqlite_store`,
:mod:`.postgres_store`) only connect, begin transactions and say how to
commit lazily. Nothing is acknowledged to a peer before it is durably stored:

- SQLite: ``<data_dir>/scaiwave.db`` in WAL mode with ``synchronous=FULL``
  (a commit survives power loss, not just a process crash), created mode 0600
  (it holds the signing key's seed);
- PostgreSQL: ``synchronous_commit=on`` for every durable commit, whatever
  the server's default;
- every multi-row write (a page of events and its backfill cursor, a
  transaction's events and its response) is one database transaction, so a
  crash leaves all of it or none of it; unique constraints refuse duplicate
  events, transactions and nonces on both backends.

Rows come back as plain dicts keyed by column name, BLOB columns as ``bytes``,
times as integer milliseconds. Failures a caller can act on raise
:class:`StorageError` with a ``code`` (the table is in :mod:`.schema`).
"""

from __future__ import annotations

import abc
import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from scaiwave_federation.core import PAGE_ENVELOPE_HEAD

from .dialect import INTEGRITY_ERRORS, is_postgres_url
from .schema import SCHEMA_VERSION, StorageError
from .admin_rows import AdminRows
from .outbox_rows import OutboxRows
from .lease_rows import LeaseRows
from .txn_rows import TxnOutcome, TxnRows

__all__ = [
    "DB_FILENAME",
    "DEFAULT_POLICY",
    "SCHEMA_VERSION",
    "Store",
    "StorageError",
    "TxnOutcome",
]

DB_FILENAME = "scaiwave.db"

#: ``get_policy()`` before any policy is set: a new server federates only with
#: peers an admin names.
DEFAULT_POLICY: dict[str, Any] = {
    "default_mode": "invite_only",
    "allowed_peers": [],
    "blocked_peers": [],
}

_PEER_FIELDS = frozenset(
    "state protocol_version key_id last_seen last_error_code last_error_message last_error_at"
    " failures retry_at descriptor descriptor_fetched_at paused".split()
)
_MEMBERSHIPS = frozenset({"invite", "join", "leave", "decline"})
_INVITE_STATES = frozenset({"pending", "accepted", "declined"})
# last_error_message can come from a peer's reply: a hostile peer must not be
# able to grow a row (or the admin API's output) without bound.
_MAX_ERROR_MESSAGE = 500

Row = dict[str, Any]


class Store(AdminRows, OutboxRows, LeaseRows, TxnRows, abc.ABC):
    """The daemon's storage interface, and its queries, written once for both backends.

    :meth:`open` picks the backend: a data directory opens
    :class:`.sqlite_store.SqliteStore` (``<data_dir>/scaiwave.db``, the
    default), a ``postgresql://`` URL :class:`.postgres_store.PostgresStore`.
    Every query here runs on both: SQLite's dialect with ``?`` placeholders,
    rewritten for PostgreSQL in one place (:mod:`.dialect`). A backend
    provides the connection (``db.execute(sql, params)``), how a write
    transaction begins, and :meth:`_lazily`.

    Not safe for use from several threads at the same time: the daemon goes
    through :class:`AsyncStore`, which serialises every call on one worker
    thread at a time.
    """

    #: ``"sqlite"`` or ``"postgresql"``: what ``federation check`` reports.
    backend = "sqlite"

    def __init__(self, db: Any, path: Path | None, location: str = "") -> None:
        """Wrap an open, migrated database; use :meth:`open` instead."""
        self.db = db
        self.path = path
        #: Where the data is, for an admin: the file, or the URL without its password.
        self.location = location or str(path)

    @classmethod
    def open(cls, target: Path | str) -> Store:
        """Open (creating if needed) the database and migrate it.

        ``target``: a data directory (SQLite, ``<target>/scaiwave.db``) or a
        ``postgresql://`` URL. Raises :class:`StorageError` ``schema`` for a
        database from a newer scaiwave or a failed migration, ``open`` for
        one that cannot be used.
        """
        if is_postgres_url(target):
            from .postgres_store import PostgresStore

            return PostgresStore.open(str(target))
        from .sqlite_store import SqliteStore

        return SqliteStore.open(target)

    def close(self) -> None:
        """Close the connection. Idempotent."""
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def describe(self) -> Row:
        """``{"backend", "location", "schema_version"}`` for health and self-test."""
        return {"backend": self.backend, "location": self.location, "schema_version": self.schema_version()}

    # -- what each backend provides

    @abc.abstractmethod
    def probe_write(self, now: int) -> str:
        """Commit one small write, waiting at most a second for another
        writer; ``"ok"`` or the database's reason (``/readyz``)."""

    @abc.abstractmethod
    def _in_transaction(self) -> bool:
        """True while a transaction is open on the connection."""

    def _group_usable(self) -> bool:
        """True while a group commit's transaction (``AsyncStore``) is open
        and can still commit what it holds."""
        return self._in_transaction()

    @abc.abstractmethod
    def _lazily(self) -> contextlib.AbstractContextManager[None]:
        """Commit the block without waiting for the disk: atomic still, and
        made durable by the next durable commit. Only for writes whose loss in
        a power cut is harmless (see the backends)."""

    def schema_version(self) -> int:
        """Return the schema version of the open file."""
        return int(self._scalar("SELECT value FROM meta WHERE key = 'schema_version'"))

    # ------------------------------------------------------------- helpers

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """Run the block as one transaction: all of it is stored, or none.

        On SQLite, BEGIN IMMEDIATE takes the write lock up front, so a writer
        in another process makes us wait at BEGIN (busy timeout) instead of
        failing with SQLITE_BUSY halfway through, after our reads (PostgreSQL
        locks rows as they are written: a plain BEGIN). Inside another
        transaction (:meth:`create_room_with`) the block is a savepoint of it.
        """
        if self._in_transaction():
            self.db.execute("SAVEPOINT nested")
            try:
                yield
                self.db.execute("RELEASE nested")
            except BaseException:
                self.db.execute("ROLLBACK TO nested")
                self.db.execute("RELEASE nested")
                raise
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            if self._in_transaction():
                self.db.execute("ROLLBACK")
            raise

    def _x(self, sql: str, *params: Any) -> Any:
        return self.db.execute(sql, params)

    def _insert(self, table: str, row: Row, on_conflict: str = "") -> Any:
        # Table and column names come from this module (upsert_peer checks its
        # kwargs first), never from remote data: formatting them in is safe.
        cols, marks = ", ".join(row), ", ".join("?" * len(row))
        sql = f"INSERT INTO {table} ({cols}) VALUES ({marks}) {on_conflict}"
        return self._x(sql, *row.values())

    def _upsert(self, table: str, row: Row, key: str) -> Any:
        # Insert, or update the columns of ``row`` outside the primary ``key``.
        sets = ", ".join(f"{c} = excluded.{c}" for c in row if c not in key.split(", "))
        return self._insert(table, row, f"ON CONFLICT ({key}) DO UPDATE SET {sets}")

    def _all(self, sql: str, *params: Any) -> list[Row]:
        cur = self.db.execute(sql, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    def _one(self, sql: str, *params: Any) -> Row | None:
        rows = self._all(sql, *params)
        return rows[0] if rows else None

    def _scalar(self, sql: str, *params: Any) -> Any:
        row = self.db.execute(sql, params).fetchone()
        return None if row is None else row[0]

    # ---------------------------------------------------------------- keys

    def save_keyring(self, current: Row | None, old: Sequence[Row]) -> None:
        """Replace the whole keyring atomically.

        Each key: ``key_id``, ``seed`` (bytes; None allowed for old keys,
        whose seeds are wiped on rotation), ``public_key``, ``created_at``
        (None allowed for old keys), ``expired_at`` (None for ``current``, set
        for every old key). Raises ``invalid`` otherwise, or for a repeated key_id.
        """
        if current is not None and (current.get("expired_at") is not None or not current["seed"]):
            raise StorageError("invalid", "the current key needs a seed and no expired_at")
        if any(key.get("expired_at") is None for key in old):
            raise StorageError("invalid", "every old key needs an expired_at")
        with self._write():
            self._x("DELETE FROM keys")
            for key in ([current] if current is not None else []) + list(old):
                row = {"key_id": key["key_id"], "seed": _blob(key.get("seed")),
                       "public_key": _blob(key["public_key"]), "created_at": key.get("created_at"),
                       "expired_at": key.get("expired_at")}
                try:
                    self._insert("keys", row)
                except INTEGRITY_ERRORS as exc:
                    raise StorageError("invalid", f"key {row['key_id']!r}: {exc}") from exc

    def load_keyring(self) -> tuple[Row | None, list[Row]]:
        """Return ``(current key or None, old keys in the order they expired)``."""
        rows = self._all("SELECT * FROM keys ORDER BY expired_at, key_id")
        current = next((r for r in rows if r["expired_at"] is None), None)
        return current, [r for r in rows if r["expired_at"] is not None]

    # -------------------------------------------------------------- policy

    def get_policy(self) -> Row:
        """Return the federation policy dict (a copy of :data:`DEFAULT_POLICY` if unset)."""
        text = self._scalar("SELECT value FROM policy WHERE id = 1")
        return json.loads(text if text is not None else json.dumps(DEFAULT_POLICY))

    def set_policy(self, policy: Row) -> None:
        """Store the federation policy dict (the core validates it, not storage)."""
        self._upsert("policy", {"id": 1, "value": json.dumps(policy, sort_keys=True)}, "id")

    # --------------------------------------------------------------- peers

    def get_peer(self, name: str) -> Row | None:
        """Return the peers row of server ``name``, or None."""
        return self._one("SELECT * FROM peers WHERE server_name = ?", name)

    def list_peers(self) -> list[Row]:
        """Return every peers row, by server name."""
        return self._all("SELECT * FROM peers ORDER BY server_name")

    def upsert_peer(self, name: str, **fields: Any) -> None:
        """Create the peer (state ``known`` unless given) or update just ``fields``.
        Raises ``invalid`` for a field that is not a peers column."""
        unknown = set(fields) - _PEER_FIELDS
        if unknown:
            raise StorageError("invalid", f"unknown peer fields: {', '.join(sorted(unknown))}")
        if fields:
            self._upsert("peers", {"server_name": name, **fields}, "server_name")
        else:
            self._insert("peers", {"server_name": name}, "ON CONFLICT DO NOTHING")

    def mark_seen(self, name: str, now: int) -> None:
        """Record a good exchange: ``last_seen = now``; clear ``last_error_*``,
        ``failures`` and ``retry_at``. Creates the peer (state ``known``) if missing."""
        cleared = dict.fromkeys(("last_error_code", "last_error_message", "last_error_at"))
        row = {"server_name": name, "last_seen": now, **cleared, "failures": 0, "retry_at": None}
        self._upsert("peers", row, "server_name")

    def mark_error(self, name: str, code: str, message: str, now: int, retry_at: int | None) -> int:
        """Record a failed exchange; return the peer's consecutive failures.

        Sets ``last_error_code/_message/_at`` (message flattened to one line of
        at most 500 characters), adds 1 to ``failures``, sets ``retry_at``.
        Creates the peer (state ``known``) if missing.
        """
        flat = " ".join(str(message).split())[:_MAX_ERROR_MESSAGE]
        changes = {"last_error_code": code, "last_error_message": flat, "last_error_at": now,
                   "retry_at": retry_at}
        row = {"server_name": name, "failures": 1, **changes}
        update = ", ".join(f"{c} = excluded.{c}" for c in changes)
        with self._write():
            clause = f"ON CONFLICT (server_name) DO UPDATE SET {update}"
            self._insert("peers", row, clause + ", failures = peers.failures + 1")
            return int(self._scalar("SELECT failures FROM peers WHERE server_name = ?", name))

    def save_descriptor(self, name: str, text: str, now: int) -> None:
        """Cache a peer's descriptor JSON text exactly as received, fetched at ``now``."""
        self.upsert_peer(name, descriptor=text, descriptor_fetched_at=now)

    # ------------------------------------------------------ tenants, users

    def create_tenant(self, name: str, federation_enabled: bool = True) -> Row:
        """Create a tenant; return ``{"name", "federation_enabled"}``. Raises ``conflict``."""
        try:
            self._insert("tenants", {"name": name, "federation_enabled": int(federation_enabled)})
        except INTEGRITY_ERRORS as exc:
            raise StorageError("conflict", f"tenant {name!r} already exists") from exc
        return {"name": name, "federation_enabled": bool(federation_enabled)}

    def get_tenant(self, name: str) -> Row | None:
        """Return ``{"name", "federation_enabled": bool}`` or None."""
        row = self._one("SELECT * FROM tenants WHERE name = ?", name)
        return _tenant(row) if row else None

    def list_tenants(self) -> list[Row]:
        """Return every tenant, by name."""
        return [_tenant(r) for r in self._all("SELECT * FROM tenants ORDER BY name")]

    def set_tenant_federation(self, name: str, enabled: bool) -> None:
        """Turn federation on or off for all of a tenant's rooms. Raises ``not_found``."""
        sql = "UPDATE tenants SET federation_enabled = ? WHERE name = ?"
        if self._x(sql, int(enabled), name).rowcount == 0:
            raise StorageError("not_found", f"no tenant {name!r}")

    def create_user(self, user_id: str, name: str, tenant: str, token_hash: str) -> Row:
        """Create a local user and return its row. Raises ``not_found`` for an
        unknown tenant, ``conflict`` if the user id or the token hash is taken."""
        row = {"user_id": user_id, "name": name, "tenant": tenant, "token_hash": token_hash}
        with self._write():
            self._need_tenant(tenant)
            try:
                self._insert("users", row)
            except INTEGRITY_ERRORS as exc:
                raise StorageError("conflict", f"user {user_id!r} already exists") from exc
        return {**row, "deactivated_at": None}

    def _need_tenant(self, tenant: str) -> None:
        # Checked up front, not left to the foreign key, to say what is missing.
        if self._scalar("SELECT 1 FROM tenants WHERE name = ?", tenant) is None:
            raise StorageError("not_found", f"no tenant {tenant!r}")

    def get_user(self, user_id: str) -> Row | None:
        """Return the users row or None."""
        return self._one("SELECT * FROM users WHERE user_id = ?", user_id)

    def user_by_token_hash(self, token_hash: str) -> Row | None:
        """Return the active (not deactivated) user whose access token hashes
        to ``token_hash``, or None."""
        return self._one("SELECT * FROM users WHERE token_hash = ? AND deactivated_at IS NULL", token_hash)

    def list_users(self) -> list[Row]:
        """Return every local user, by user id."""
        return self._all("SELECT * FROM users ORDER BY user_id")

    # ------------------------------------------------------ rooms, members

    def create_room(
        self, room_id: str, room_type: str, host: str, creator: str, created_at: int,
        tenant: str | None = None,
    ) -> Row:
        """Create a rooms row and return it. ``tenant`` is None for a room hosted
        elsewhere. Raises ``conflict`` if it exists, ``not_found`` for an unknown tenant."""
        row = {"room_id": room_id, "room_type": room_type, "host": host, "tenant": tenant,
               "creator": creator, "created_at": created_at}
        with self._write():
            if tenant is not None:
                self._need_tenant(tenant)
            try:
                self._insert("rooms", row)
            except INTEGRITY_ERRORS as exc:
                raise StorageError("conflict", f"room {room_id!r} already exists") from exc
        return row

    def create_room_with(self, room: Row, events: Sequence[Row], memberships: Mapping[str, str],
                         invite: Row | None = None) -> None:
        """Create a room with its first events, memberships and (a local
        invitee's) invite, all or nothing: a DM whose invite was refused, or
        whose storing fails, leaves no room behind. Raises like the parts."""
        with self._write():
            self.create_room(**room)
            self._store_events_in_tx(room["room_id"], events, None)
            for user_id, membership in memberships.items():
                self.set_membership(room["room_id"], user_id, membership)
            if invite is not None:
                self.save_invite(**invite)

    def get_room(self, room_id: str) -> Row | None:
        """Return the rooms row or None."""
        return self._one("SELECT * FROM rooms WHERE room_id = ?", room_id)

    def set_membership(self, room_id: str, user_id: str, membership: str) -> None:
        """Set a participant's membership: ``invite``, ``join``, ``leave`` or
        ``decline`` (else ``invalid``). Raises ``not_found`` if the room has no row."""
        if membership not in _MEMBERSHIPS:
            raise StorageError("invalid", f"unknown membership {membership!r}")
        row = {"room_id": room_id, "user_id": user_id, "membership": membership}
        try:
            self._upsert("members", row, "room_id, user_id")
        except INTEGRITY_ERRORS as exc:  # the rooms foreign key
            raise StorageError("not_found", f"no room {room_id!r}") from exc

    def members(self, room_id: str) -> list[Row]:
        """Return the room's ``{"room_id", "user_id", "membership"}`` rows, by user id."""
        return self._all("SELECT * FROM members WHERE room_id = ? ORDER BY user_id", room_id)

    def rooms_for_user(self, user_id: str) -> list[Row]:
        """Return each room the user has any membership in (callers filter), as
        the rooms row plus ``membership``, oldest room first."""
        return self._all(
            "SELECT rooms.*, members.membership FROM members JOIN rooms USING (room_id)"
            " WHERE members.user_id = ? ORDER BY rooms.created_at, rooms.room_id",
            user_id,
        )

    # --------------------------------------------------------------- events

    def _insert_event(self, room_id: str, event: Row) -> bool:
        """Insert one event inside the caller's transaction; True if it was new.

        A method of its own so the crash test can kill the process between
        rows. ON CONFLICT DO NOTHING, not INSERT OR IGNORE: OR IGNORE would
        also skip rows that break NOT NULL or CHECK constraints, silently.
        """
        if event.get("room_id", room_id) != room_id:
            raise StorageError("invalid", f"an event of {event['room_id']} given for {room_id}")
        try:
            row = {"event_id": _blob(event["event_id"]), "room_id": room_id,
                   "depth": event["depth"],
                   **{f: event[f] for f in ("sender", "origin", "type", "ts")},
                   "envelope": _blob(event["envelope"])}
        except KeyError as exc:
            raise StorageError("invalid", f"event lacks {exc.args[0]!r}") from exc
        eid, depth = row["event_id"], row["depth"]
        if event.get("proposal_id") is not None:
            self._insert_proposal(room_id, bytes(event["proposal_id"]), eid)
        try:
            if self._insert("events", row, "ON CONFLICT DO NOTHING").rowcount == 1:
                return True
        except INTEGRITY_ERRORS as exc:
            raise StorageError("invalid", f"event at depth {depth} refused: {exc}") from exc
        # Not inserted: either this very event is stored (a resumed pull, a
        # resent transaction: fine), or another event holds its id or its
        # (room, depth) slot: a fork, which the caller must hear about.
        held = self._all(
            "SELECT event_id, room_id, depth FROM events"
            " WHERE event_id = ? OR (room_id = ? AND depth = ?)", eid, room_id, depth,
        )
        if held != [{"event_id": eid, "room_id": room_id, "depth": depth}]:
            raise StorageError("conflict", f"another event is stored at depth {depth} of {room_id}")
        return False

    def _insert_proposal(self, room_id: str, proposal_id: bytes, event_id: bytes) -> None:
        """A proposal is chained at most once per room (core/proposals.py): a
        second chained event for it is a ``conflict``; the same one again is fine."""
        row = {"room_id": room_id, "proposal_id": proposal_id, "event_id": event_id}
        if self._insert("proposals", row, "ON CONFLICT DO NOTHING").rowcount == 0:
            if self.proposal_chained(room_id, proposal_id) != event_id:
                raise StorageError("conflict", f"the proposal is already chained in {room_id}")

    def proposal_chained(self, room_id: str, proposal_id: bytes) -> bytes | None:
        """The id of the chained event of ``room_id`` carrying ``proposal_id``, or None."""
        return self._scalar("SELECT event_id FROM proposals WHERE room_id = ? AND proposal_id = ?",
                            room_id, proposal_id)

    def _store_events_in_tx(self, room_id: str, events: Sequence[Row], cursor: Row | None) -> int:
        new = sum(self._insert_event(room_id, event) for event in events)
        if cursor is not None:
            row = {"room_id": room_id, "peer": cursor["peer"], "cursor": _blob(cursor["cursor"]),
                   "stored": cursor.get("stored", 0), "updated_at": cursor["updated_at"]}
            self._upsert("backfill_cursors", row, "room_id, peer")
        return new

    def store_events(self, room_id: str, events: Sequence[Row], cursor: Row | None = None, *,
                     client_txn: Row | None = None) -> int:
        """Store a batch of events, and optionally a backfill cursor, atomically.

        ``events``: dicts with ``event_id`` (32 bytes), ``depth``, ``sender``,
        ``origin``, ``type``, ``ts``, ``envelope`` (bytes). Events already
        stored are skipped. ``cursor``: ``{"peer", "cursor": bytes, "stored",
        "updated_at"}``, upserted for (room_id, peer) in the same transaction,
        so a page and its cursor land together (empty ``events`` just moves the
        cursor). Returns how many events were new.

        ``client_txn``: a user's send answer (:meth:`save_client_txn`) stored
        in the same transaction, so a retry can never store the event twice.

        Raises ``conflict`` if a different event holds an event's id or
        (room_id, depth), ``invalid`` for a malformed event; either way
        nothing of the batch or cursor is stored.
        """
        with self._write():
            new = self._store_events_in_tx(room_id, events, cursor)
            if client_txn is not None:
                self.save_client_txn(client_txn)
            return new

    def event_at(self, room_id: str, depth: int) -> Row | None:
        """Return the room's event at ``depth``, or None."""
        return self._one("SELECT * FROM events WHERE room_id = ? AND depth = ?", room_id, depth)

    def head(self, room_id: str) -> Row | None:
        """Return the room's highest-depth event, or None if it has none."""
        sql = "SELECT * FROM events WHERE room_id = ? ORDER BY depth DESC LIMIT 1"
        return self._one(sql, room_id)

    def page_before(self, room_id: str, before_depth: int | None, limit: int,
                    max_bytes: int) -> tuple[list[int], list[bytes]]:
        """A backfill page's events: ``(depths, envelopes)`` of up to ``limit``
        events strictly below ``before_depth`` (None: from the head), highest
        depth first, as many as fit in ``max_bytes`` as the core counts them
        (:func:`~scaiwave_federation.core.backfill.page_bytes`; ``max_bytes``
        holds one event of the largest size at least). The database stops
        there: a page of large events is not read whole and then cut."""
        below, args = ("", [room_id]) if before_depth is None else (" AND depth < ?", [room_id, before_depth])
        sql = (f"SELECT depth, envelope FROM (SELECT depth, envelope, SUM(length(envelope) + {PAGE_ENVELOPE_HEAD})"
               f" OVER (ORDER BY depth DESC) AS upto FROM events WHERE room_id = ?{below}"
               f" ORDER BY depth DESC LIMIT ?) AS page WHERE upto <= ? ORDER BY depth DESC")
        rows = self._x(sql, *args, limit, max_bytes).fetchall()
        return [r[0] for r in rows], [bytes(r[1]) for r in rows]

    def events_after(self, room_id: str, after_depth: int | None, limit: int) -> list[Row]:
        """Return up to ``limit`` events strictly above ``after_depth`` (None:
        from the first), lowest depth first."""
        if after_depth is None:
            sql = "SELECT * FROM events WHERE room_id = ? ORDER BY depth LIMIT ?"
            return self._all(sql, room_id, limit)
        sql = "SELECT * FROM events WHERE room_id = ? AND depth > ? ORDER BY depth LIMIT ?"
        return self._all(sql, room_id, after_depth, limit)

    def event_count(self, room_id: str) -> int:
        """Return how many events of the room are stored."""
        return int(self._scalar("SELECT count(*) FROM events WHERE room_id = ?", room_id))

    def get_event(self, event_id: bytes) -> Row | None:
        """Return the event with this 32-byte id, or None."""
        return self._one("SELECT * FROM events WHERE event_id = ?", _blob(event_id))

    def depths(self, room_id: str) -> list[int]:
        """Return the room's stored depths, ascending (a gap shows as a gap)."""
        rows = self._x("SELECT depth FROM events WHERE room_id = ? ORDER BY depth", room_id)
        return [depth for (depth,) in rows.fetchall()]

    # -------------------------------------------------------------- invites

    def save_invite(
        self, room_id: str, user_id: str, inviter: str, origin: str, room_type: str,
        payload: bytes, created_at: int, state: str = "pending",
    ) -> bool:
        """Store an invite (``pending`` by default) of ``user_id`` into ``room_id``;
        True if new.

        The same payload again (a retried PUT) changes nothing, so a retry
        cannot reopen an accepted or declined invite; a different payload is
        a fresh invite and replaces the row. Raises ``invalid`` for a bad state.
        """
        if state not in _INVITE_STATES:
            raise StorageError("invalid", f"unknown invite state {state!r}")
        row = {"room_id": room_id, "user_id": user_id, "inviter": inviter, "origin": origin,
               "room_type": room_type, "state": state, "payload": _blob(payload),
               "created_at": created_at}
        with self._write():
            sql = "SELECT payload FROM invites WHERE room_id = ? AND user_id = ?"
            if self._scalar(sql, room_id, user_id) == row["payload"]:
                return False
            self._upsert("invites", row, "room_id, user_id")
            return True

    def get_invite(self, room_id: str, user_id: str) -> Row | None:
        """Return the invites row or None."""
        sql = "SELECT * FROM invites WHERE room_id = ? AND user_id = ?"
        return self._one(sql, room_id, user_id)

    def pending_invites(self, user_id: str) -> list[Row]:
        """Return the user's pending invites, oldest first."""
        sql = "SELECT * FROM invites WHERE user_id = ? AND state = 'pending' ORDER BY created_at"
        return self._all(sql, user_id)

    def set_invite_state(self, room_id: str, user_id: str, state: str) -> None:
        """Set an invite ``pending``, ``accepted`` or ``declined`` (else ``invalid``).
        Raises ``not_found`` if there is no such invite."""
        if state not in _INVITE_STATES:
            raise StorageError("invalid", f"unknown invite state {state!r}")
        sql = "UPDATE invites SET state = ? WHERE room_id = ? AND user_id = ?"
        if self._x(sql, state, room_id, user_id).rowcount == 0:
            raise StorageError("not_found", f"no invite of {user_id} into {room_id}")

    # ----------------------------------------------------- backfill cursors

    def get_cursor(self, room_id: str, peer: str) -> Row | None:
        """Return ``{"room_id", "peer", "cursor": bytes, "stored", "updated_at"}`` or None."""
        sql = "SELECT * FROM backfill_cursors WHERE room_id = ? AND peer = ?"
        return self._one(sql, room_id, peer)

    def clear_cursor(self, room_id: str, peer: str) -> None:
        """Forget the backfill cursor of a finished or abandoned pull."""
        self._x("DELETE FROM backfill_cursors WHERE room_id = ? AND peer = ?", room_id, peer)

    # --------------------------------------------------------------- nonces

    def remember_nonce(self, origin: str, nonce: bytes, expires_at: int) -> bool:
        """Record a request nonce; False if (origin, nonce) was known already.

        Not flushed to disk on its own (see :meth:`_lazily`): the request's
        own durable write, a transaction's events and reply, flushes it too,
        so a power cut cannot lose the nonce of anything we stored; it can
        lose the nonce of a read (a backfill page) from the last moments,
        which a replay could then fetch once more."""
        row = {"origin": origin, "nonce": _blob(nonce), "expires_at": expires_at}
        with self._lazily():
            return self._insert("nonces", row, "ON CONFLICT DO NOTHING").rowcount == 1

    def live_nonces(self, now: int) -> list[tuple[str, bytes, int]]:
        """Return ``(origin, nonce, expires_at)`` of nonces still live at ``now``
        (``expires_at > now``): the core's replay window after a restart."""
        sql = "SELECT origin, nonce, expires_at FROM nonces WHERE expires_at > ?"
        return [(o, bytes(n), e) for o, n, e in self._x(sql, now).fetchall()]

    def expire_nonces(self, now: int) -> int:
        """Delete nonces with ``expires_at <= now``; return how many."""
        return self._x("DELETE FROM nonces WHERE expires_at <= ?", now).rowcount


def _blob(value: Any) -> bytes | None:
    # A str would be stored as TEXT and never compare equal to a BLOB: refuse
    # it here rather than lose lookups later.
    if value is None:
        return None
    if isinstance(value, str):
        raise StorageError("invalid", "expected bytes, got str")
    return bytes(value)


def _tenant(row: Row) -> Row:
    return {"name": row["name"], "federation_enabled": bool(row["federation_enabled"])}
