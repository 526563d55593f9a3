"""The schema and its migrations, one list for both backends.

The database records its schema version in ``meta.schema_version``. Opening a
database runs, in one transaction, every migration in :data:`MIGRATIONS` that
the file has not seen yet, so a crash halfway through an upgrade leaves the
file at its old version, untouched. A file written by a newer scaiwave (a
version above ``len(MIGRATIONS)``) is refused rather than guessed at.

Rules for migrations, because a released one runs on files in the field:

- never edit a released migration; append a new one;
- write plain SQL, not sqlite-utils' table helpers, so the DDL a migration
  runs cannot change when the library does; write it in SQLite's dialect with
  ``?`` placeholders: the same text runs on PostgreSQL (:mod:`.dialect`
  rewrites the few words that differ there, in one place);
- run statements one by one through ``db.execute``: ``executescript`` would
  COMMIT the surrounding transaction first and break the all-or-nothing upgrade.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sqlite_utils

__all__ = ["StorageError", "MIGRATIONS", "SCHEMA_VERSION", "migrate", "schema_version"]


class StorageError(Exception):
    """A storage operation refused or failed.

    ``code`` is a short stable string the shell maps to its own replies:

    ``conflict``  the row exists, or another row holds its place (HTTP 409)
    ``not_found`` the row to change does not exist (404)
    ``invalid``   the caller passed a value the schema cannot hold (400)
    ``schema``    the file's schema is newer than this code, or a migration failed
    ``open``      the database cannot be opened (not SQLite, no WAL, no access,
                  no PostgreSQL server at the URL, wrong password)
    ``unavailable`` the disk is full or failing (SQLITE_FULL, SQLITE_IOERR, ...):
                  nothing of the call was stored; retry later (HTTP 503
                  ``storage_unavailable``)

    ``str(err)`` is a one-line message for an admin.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"StorageError({self.code!r}, {self.message!r})"


# --------------------------------------------------------------------------
# Migration 1: the initial schema. Times are integer milliseconds since the
# epoch; ids, keys, signed envelopes and CBOR blobs are BLOBs.

_M1 = [
    # Federation signing keys. The current key is the one row with expired_at
    # NULL; the partial unique index makes "at most one current key" a property
    # of the file, not of every caller. Old keys keep public_key forever (old
    # events verify forever) but their seed is wiped (NULL) on rotation, and
    # may lack created_at (the descriptor's old_keys do not carry it).
    """CREATE TABLE keys (
        key_id      TEXT PRIMARY KEY,
        seed        BLOB,
        public_key  BLOB NOT NULL,
        created_at  INTEGER,
        expired_at  INTEGER
    )""",
    "CREATE UNIQUE INDEX keys_single_current ON keys ((expired_at IS NULL))"
    " WHERE expired_at IS NULL",
    # One row (id = 1) of policy JSON: its shape belongs to the core, not here.
    """CREATE TABLE policy (
        id     INTEGER PRIMARY KEY CHECK (id = 1),
        value  TEXT NOT NULL
    )""",
    # Peer states are the core's vocabulary, so no CHECK on state.
    """CREATE TABLE peers (
        server_name            TEXT PRIMARY KEY,
        state                  TEXT NOT NULL DEFAULT 'known',
        protocol_version       TEXT,
        key_id                 TEXT,
        last_seen              INTEGER,
        last_error_code        TEXT,
        last_error_message     TEXT,
        last_error_at          INTEGER,
        failures               INTEGER NOT NULL DEFAULT 0,
        retry_at               INTEGER,
        descriptor             TEXT,
        descriptor_fetched_at  INTEGER
    )""",
    """CREATE TABLE tenants (
        name                TEXT PRIMARY KEY,
        federation_enabled  INTEGER NOT NULL DEFAULT 1
                            CHECK (federation_enabled IN (0, 1))
    )""",
    """CREATE TABLE users (
        user_id     TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        tenant      TEXT NOT NULL REFERENCES tenants (name),
        token_hash  TEXT NOT NULL UNIQUE
    )""",
    "CREATE INDEX users_tenant ON users (tenant)",
    # tenant is NULL for rooms hosted elsewhere that a local user joined.
    """CREATE TABLE rooms (
        room_id     TEXT PRIMARY KEY,
        room_type   TEXT NOT NULL,
        host        TEXT NOT NULL,
        tenant      TEXT REFERENCES tenants (name),
        creator     TEXT NOT NULL,
        created_at  INTEGER NOT NULL
    )""",
    "CREATE INDEX rooms_tenant ON rooms (tenant)",
    # user_id is not a foreign key: remote participants have no users row.
    """CREATE TABLE members (
        room_id     TEXT NOT NULL REFERENCES rooms (room_id),
        user_id     TEXT NOT NULL,
        membership  TEXT NOT NULL
                    CHECK (membership IN ('invite', 'join', 'leave', 'decline')),
        PRIMARY KEY (room_id, user_id)
    )""",
    "CREATE INDEX members_user ON members (user_id)",
    # A room's history is a chain ordered by depth: one event per depth, and
    # the id is the 32-byte content hash. room_id is deliberately not a
    # foreign key: backfilled history may arrive before any local rooms row.
    """CREATE TABLE events (
        event_id  BLOB PRIMARY KEY
                  CHECK (typeof(event_id) = 'blob' AND length(event_id) = 32),
        room_id   TEXT NOT NULL,
        depth     INTEGER NOT NULL,
        sender    TEXT NOT NULL,
        origin    TEXT NOT NULL,
        type      TEXT NOT NULL,
        ts        INTEGER NOT NULL,
        envelope  BLOB NOT NULL,
        UNIQUE (room_id, depth)
    )""",
    """CREATE TABLE invites (
        room_id     TEXT NOT NULL,
        user_id     TEXT NOT NULL,
        inviter     TEXT NOT NULL,
        origin      TEXT NOT NULL,
        room_type   TEXT NOT NULL,
        state       TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'accepted', 'declined')),
        payload     BLOB NOT NULL,
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (room_id, user_id)
    )""",
    "CREATE INDEX invites_user_state ON invites (user_id, state)",
    """CREATE TABLE backfill_cursors (
        room_id     TEXT NOT NULL,
        peer        TEXT NOT NULL,
        cursor      BLOB NOT NULL,
        stored      INTEGER NOT NULL DEFAULT 0,
        updated_at  INTEGER NOT NULL,
        PRIMARY KEY (room_id, peer)
    )""",
    """CREATE TABLE nonces (
        origin      TEXT NOT NULL,
        nonce       BLOB NOT NULL,
        expires_at  INTEGER NOT NULL,
        PRIMARY KEY (origin, nonce)
    )""",
    "CREATE INDEX nonces_expiry ON nonces (expires_at)",
    """CREATE TABLE txns (
        origin      TEXT NOT NULL,
        txn_id      TEXT NOT NULL,
        response    BLOB NOT NULL,
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (origin, txn_id)
    )""",
    "CREATE INDEX txns_created ON txns (created_at)",
    # AUTOINCREMENT so a delivered row's id is never reused: a late
    # delivered(id) from a stale sender cannot hit a newer request.
    """CREATE TABLE outbox (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        peer             TEXT NOT NULL,
        txn_id           TEXT NOT NULL UNIQUE,
        path             TEXT NOT NULL,
        body             BLOB NOT NULL,
        created_at       INTEGER NOT NULL,
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  INTEGER NOT NULL
    )""",
    "CREATE INDEX outbox_due ON outbox (next_attempt_at, id)",
    "CREATE INDEX outbox_peer ON outbox (peer, next_attempt_at)",
]


def _m1_initial(db: sqlite_utils.Database) -> None:
    """Create the initial schema (version 1)."""
    for statement in _M1:
        db.execute(statement)


def _m2_proposals(db: sqlite_utils.Database) -> None:
    """Version 2: which chained event of a room carries which proposal, one
    per proposal (core/proposals.py: a proposal is chained at most once per
    room). Filled from the events already stored."""
    from scaiwave_federation.core import Refused, decode_event

    db.execute("""CREATE TABLE proposals (
        room_id      TEXT NOT NULL,
        proposal_id  BLOB NOT NULL CHECK (typeof(proposal_id) = 'blob' AND length(proposal_id) = 32),
        event_id     BLOB NOT NULL,
        PRIMARY KEY (room_id, proposal_id)
    )""")
    for room_id, envelope in db.execute("SELECT room_id, envelope FROM events").fetchall():
        event = decode_event(envelope)
        assert not isinstance(event, Refused), event  # our own stored, verified events
        record = event.as_record()
        if "proposal_id" in record:
            db.execute("INSERT INTO proposals VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                       [room_id, record["proposal_id"], record["event_id"]])


def _m3_admin_day_two(db: sqlite_utils.Database) -> None:
    """Version 3: what an admin's second day needs. ``peers.paused`` (1: the
    outbox holds this peer's queue), ``users.deactivated_at`` (set: the token
    no longer works), and ``client_txns``: the first answer to each user's
    ``PUT /v1/rooms/{room_id}/send/{txn_id}``, so a retry stores nothing twice."""
    db.execute("ALTER TABLE peers ADD COLUMN paused INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1))")
    db.execute("ALTER TABLE users ADD COLUMN deactivated_at INTEGER")
    db.execute("""CREATE TABLE client_txns (
        user_id     TEXT NOT NULL,
        txn_id      TEXT NOT NULL,
        room_id     TEXT NOT NULL,
        body_hash   BLOB NOT NULL,
        response    TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (user_id, txn_id)
    )""")


def _m4_workers(db: sqlite_utils.Database) -> None:
    """Version 4: what several workers on one database share (core/leases.py).
    ``leases``: who delivers to which peer, runs the singleton jobs, pulls
    which room, until when (plain rows and conditional writes: no advisory
    lock, the same SQL on every backend). ``generations``: a counter bumped
    with every change of the state workers cache (key ring, policy, peers'
    pauses), so a worker sees another's change with one cheap read. ``jobs``:
    backfill jobs' progress, for the admin API of every worker."""
    db.execute("""CREATE TABLE leases (
        name        TEXT PRIMARY KEY,
        owner       TEXT NOT NULL,
        expires_at  INTEGER NOT NULL
    )""")
    db.execute("CREATE INDEX leases_owner ON leases (owner)")
    db.execute("""CREATE TABLE generations (
        name   TEXT PRIMARY KEY,
        value  INTEGER NOT NULL
    )""")
    db.execute("INSERT INTO generations (name, value) VALUES ('shared', 0)")
    # Backfill jobs (an admin's pulls, catch-ups) as the admin API shows them,
    # so every worker answers for a job any worker runs. ``view``: JSON.
    db.execute("""CREATE TABLE jobs (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        view        TEXT NOT NULL,
        updated_at  INTEGER NOT NULL
    )""")


def _m5_outbox_by_peer(db: sqlite_utils.Database) -> None:
    """Version 5: the outbox indexed as it is read, by peer and id.

    Every post queued for a peer reads that peer's rows between two ids in
    its own write (``Store.outbox_between``, core/handover.py); with the
    index on ``(peer, next_attempt_at)`` that read scanned all of the
    peer's queued rows and sorted them, once per post (tens of µs with a
    busy peer's hundred rows, and more the longer a peer is down). ``(peer,
    id)`` answers it, and every other read by peer, in id order from the
    index. ``outbox_due`` (by due time) served no read of the daemon's; one
    index fewer to update per queued and per delivered row."""
    db.execute("DROP INDEX outbox_due")
    db.execute("DROP INDEX outbox_peer")
    db.execute("CREATE INDEX outbox_peer_id ON outbox (peer, id)")


Migration = Callable[[sqlite_utils.Database], None]

#: Applied in order; migration ``i`` (0-based) takes a file to version ``i + 1``.
MIGRATIONS: list[Migration] = [_m1_initial, _m2_proposals, _m3_admin_day_two, _m4_workers,
                               _m5_outbox_by_peer]

#: PostgreSQL advisory lock key held while migrating ("scaiwave" in ASCII, as a bigint).
MIGRATION_LOCK = 0x73636169776176

#: The schema version this code writes.
SCHEMA_VERSION = len(MIGRATIONS)


def _is_postgres(db: Any) -> bool:
    return getattr(db, "dialect", "sqlite") == "postgresql"


def _in_transaction(db: Any) -> bool:
    return bool(db.in_transaction if _is_postgres(db) else db.conn.in_transaction)


def schema_version(db: Any) -> int:
    """Return the database's schema version, 0 for one without a ``meta`` table."""
    if _is_postgres(db):
        sql = "SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = 'meta'"
    else:
        sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    if db.execute(sql).fetchone() is None:
        return 0
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return 0 if row is None else int(row[0])


def migrate(db: Any, migrations: Sequence[Migration] | None = None) -> int:
    """Bring the database up to the newest schema; return the version reached.

    Takes a ``Database`` whose connection is in autocommit mode
    (``isolation_level=None``) with no transaction open. Every pending
    migration and the version bump run in ONE ``BEGIN IMMEDIATE`` transaction:
    a failing migration leaves the file exactly as it was. Re-running on an
    up-to-date file changes nothing.

    Raises :class:`StorageError` ``schema`` when the file is newer than
    ``migrations`` knows, or when a migration fails.
    """
    steps = list(MIGRATIONS if migrations is None else migrations)
    newest = len(steps)
    # IMMEDIATE: take the write lock before reading the version, so two
    # processes opening a fresh file cannot both decide to run migration 1.
    # On PostgreSQL a transaction-scoped advisory lock does the same for
    # several workers starting against one database.
    db.execute("BEGIN IMMEDIATE")
    try:
        if _is_postgres(db):
            db.execute("SELECT pg_advisory_xact_lock(?)", [MIGRATION_LOCK])
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        current = schema_version(db)
        if current > newest:
            raise StorageError(
                "schema",
                f"database schema version {current} is newer than this scaiwave (max {newest})",
            )
        for version in range(current + 1, newest + 1):
            try:
                steps[version - 1](db)
            except StorageError:
                raise
            except Exception as exc:
                raise StorageError(
                    "schema", f"migration to schema version {version} failed: {exc}"
                ) from exc
        if current != newest:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [str(newest)],
            )
        db.execute("COMMIT")
    except BaseException:
        if _in_transaction(db):
            db.execute("ROLLBACK")
        raise
    return newest
