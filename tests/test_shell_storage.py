"""Storage: schema and migrations, every table's methods, atomicity (including
a real process crash in the middle of a write), and the Trio wrapper.

Every test runs on both backends: a real SQLite file under tmp_path (WAL,
fsync and crash recovery are what is under test, so no in-memory database)
and a real PostgreSQL database on the server the run starts (conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scaiwave_federation.shell.store import schema
from scaiwave_federation.shell.store.dialect import INTEGRITY_ERRORS
from scaiwave_federation.core.backfill import page_bytes
from scaiwave_federation.shell.store.store import (
    DB_FILENAME,
    DEFAULT_POLICY,
    SCHEMA_VERSION,
    StorageError,
    Store,
    TxnOutcome,
)

ROOM = "!room1:host.test"


def ev(depth: int, room: str = ROOM, tag: str = "") -> dict:
    """A stand-in event: the id is a 32-byte hash, as the core's are."""
    eid = hashlib.sha256(f"{room}|{depth}|{tag}".encode()).digest()
    return {
        "event_id": eid,
        "depth": depth,
        "sender": "@alice:host.test",
        "origin": "host.test",
        "type": "m.message",
        "ts": 1_700_000_000_000 + depth,
        "envelope": b"\xa1" + eid,
    }


# ------------------------------------------------------------------ schema


def _ddl(s: Store) -> list:
    """The schema as the database describes it (to see that nothing changed)."""
    if s.backend == "sqlite":
        return s.db.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
    return s.db.execute("SELECT table_name, column_name, data_type, is_nullable, column_default"
                        " FROM information_schema.columns WHERE table_schema = current_schema()"
                        " ORDER BY 1, 2").fetchall()


def test_schema_on_new_database(store_target) -> None:
    with Store.open(store_target) as s:
        assert s.schema_version() == SCHEMA_VERSION == len(schema.MIGRATIONS)
        tables = set(s.db.table_names())
        assert {"meta", "keys", "policy", "peers", "tenants", "users", "rooms", "members",
                "events", "invites", "backfill_cursors", "nonces", "txns", "outbox"} <= tables
        assert s.describe() == {"backend": s.backend, "location": s.location, "schema_version": SCHEMA_VERSION}
        if s.backend == "postgresql":
            # Every commit waits for the server's disk, whatever its default.
            assert s.db.execute("SHOW synchronous_commit").fetchone()[0] == "on"
            assert ":***@" in s.location or "@" not in s.location.split("//", 1)[1].split("/")[0]
            return
        assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert s.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    data_dir = Path(store_target)
    assert stat.S_IMODE(data_dir.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE((data_dir / DB_FILENAME).stat().st_mode) & 0o077 == 0


def test_reopen_is_idempotent(store_target) -> None:
    with Store.open(store_target) as s:
        s.create_tenant("acme")
        ddl = _ddl(s)
    with Store.open(store_target) as s:
        assert s.schema_version() == SCHEMA_VERSION
        assert _ddl(s) == ddl
        assert s.get_tenant("acme") == {"name": "acme", "federation_enabled": True}
        # Running the migrations again on an up-to-date database changes nothing.
        assert schema.migrate(s.db) == SCHEMA_VERSION
        assert _ddl(s) == ddl


def test_migrations_apply_in_order_and_a_failure_rolls_back_all(store_target) -> None:
    calls = []

    def m2(db) -> None:
        calls.append("m2")
        db.execute("CREATE TABLE extra (x INTEGER)")

    def m3_broken(db) -> None:
        db.execute("CREATE TABLE more (x INTEGER)")
        raise RuntimeError("boom")

    with Store.open(store_target) as s:
        with pytest.raises(StorageError) as info:
            schema.migrate(s.db, [*schema.MIGRATIONS, m2, m3_broken])
        assert info.value.code == "schema"
        assert f"version {SCHEMA_VERSION + 2}" in str(info.value)
        # Neither m2's nor m3's table survived: one transaction for all steps.
        assert not {"extra", "more"} & set(s.db.table_names())
        assert s.schema_version() == SCHEMA_VERSION
        assert schema.migrate(s.db, [*schema.MIGRATIONS, m2]) == SCHEMA_VERSION + 1
        assert calls == ["m2", "m2"]
        assert "extra" in s.db.table_names() and s.schema_version() == SCHEMA_VERSION + 1


def test_newer_schema_is_refused(store_target) -> None:
    with Store.open(store_target) as s:
        s.db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StorageError) as info:
        Store.open(store_target)
    assert info.value.code == "schema"
    assert str(info.value) == (
        f"database schema version 99 is newer than this scaiwave (max {SCHEMA_VERSION})"
    )


def test_not_a_database_is_refused(tmp_path: Path, backend: str, request) -> None:
    if backend == "sqlite":
        (tmp_path / DB_FILENAME).write_bytes(b"this is not sqlite" * 100)
        target = tmp_path
    else:  # no such database on the server; and a wrong password never shows
        target = request.getfixturevalue("pg").url("no_such_database").replace("postgres:@", "postgres:s3cret@")
    with pytest.raises(StorageError) as info:
        Store.open(target)
    assert info.value.code == "open"
    assert "s3cret" not in str(info.value)


# ----------------------------------------------------------- keys, policy


def key(kid: str, created: int | None, expired: int | None = None, seed: bytes | None = b"s" * 32):
    return {"key_id": kid, "seed": seed, "public_key": kid.encode() * 4,
            "created_at": created, "expired_at": expired}


def test_keyring(store: Store) -> None:
    assert store.load_keyring() == (None, [])
    store.save_keyring(key("k1", 1), [])
    assert store.load_keyring() == (key("k1", 1), [])
    # Rotation: k1 becomes old with its seed wiped, k2 is current.
    store.save_keyring(key("k2", 5), [key("k1", 1, expired=5, seed=None)])
    current, old = store.load_keyring()
    assert current == key("k2", 5)
    assert old == [key("k1", 1, expired=5, seed=None)]
    with pytest.raises(StorageError, match="current key") as info:
        store.save_keyring(key("k3", 9, expired=10), [])
    assert info.value.code == "invalid"
    with pytest.raises(StorageError, match="expired_at"):
        store.save_keyring(key("k3", 9), [key("k2", 5)])  # two current keys
    with pytest.raises(StorageError) as info:
        store.save_keyring(key("k2", 5), [key("k2", 1, expired=5)])  # one id twice
    assert info.value.code == "invalid"
    assert store.load_keyring() == (current, old)  # refused writes changed nothing
    # Old keys may come without created_at; they list in the order they expired.
    older = [key("k1", None, expired=5, seed=None), key("k0", None, expired=2, seed=None)]
    store.save_keyring(None, older)
    assert store.load_keyring() == (None, older[::-1])


def test_keyring_file_allows_one_current_key(store: Store) -> None:
    store.save_keyring(key("k1", 1), [])
    with pytest.raises(INTEGRITY_ERRORS):
        store.db.execute("INSERT INTO keys VALUES ('k2', ?, ?, 2, NULL)", [b"\0", b"\0"])


def test_policy(store: Store) -> None:
    assert store.get_policy() == DEFAULT_POLICY
    store.get_policy()["allowed_peers"].append("mutated.test")  # a copy, not the default
    assert store.get_policy() == DEFAULT_POLICY
    policy = {"default_mode": "open", "allowed_peers": [], "blocked_peers": ["bad.test"]}
    store.set_policy(policy)
    assert store.get_policy() == policy


# ------------------------------------------------------------------- peers


def test_peers_errors_and_recovery(store: Store) -> None:
    assert store.get_peer("peer.test") is None
    assert store.mark_error("peer.test", "tls_failure", "bad\ncert", now=10, retry_at=20) == 1
    assert store.mark_error("peer.test", "peer_unreachable", "refused", now=30, retry_at=90) == 2
    peer = store.get_peer("peer.test")
    assert peer["state"] == "known" and peer["failures"] == 2 and peer["retry_at"] == 90
    assert (peer["last_error_code"], peer["last_error_message"], peer["last_error_at"]) == (
        "peer_unreachable", "refused", 30)
    store.mark_seen("peer.test", 100)
    peer = store.get_peer("peer.test")
    assert peer["last_seen"] == 100 and peer["failures"] == 0 and peer["retry_at"] is None
    assert peer["last_error_code"] is peer["last_error_message"] is peer["last_error_at"] is None
    long = "x" * 5000
    store.mark_error("peer.test", "malformed", long, now=110, retry_at=None)
    assert len(store.get_peer("peer.test")["last_error_message"]) == 500


def test_upsert_peer_and_descriptor(store: Store) -> None:
    store.mark_seen("b.test", 5)  # creates the row
    store.upsert_peer("a.test", state="peered", protocol_version="1", key_id="k1")
    store.upsert_peer("a.test", key_id="k2")  # only key_id changes
    store.upsert_peer("c.test")
    store.save_descriptor("a.test", '{"server_name": "a.test"}', now=7)
    a = store.get_peer("a.test")
    assert (a["state"], a["protocol_version"], a["key_id"]) == ("peered", "1", "k2")
    assert (a["descriptor"], a["descriptor_fetched_at"]) == ('{"server_name": "a.test"}', 7)
    assert [p["server_name"] for p in store.list_peers()] == ["a.test", "b.test", "c.test"]
    assert store.get_peer("c.test")["state"] == "known"
    with pytest.raises(StorageError) as info:
        store.upsert_peer("a.test", **{"state = 'x'; --": 1})
    assert info.value.code == "invalid"


# --------------------------------------------------------- tenants, users


def test_tenants_and_users(store: Store) -> None:
    assert store.create_tenant("acme") == {"name": "acme", "federation_enabled": True}
    store.create_tenant("secret", federation_enabled=False)
    with pytest.raises(StorageError) as info:
        store.create_tenant("acme")
    assert info.value.code == "conflict"
    assert store.list_tenants() == [
        {"name": "acme", "federation_enabled": True},
        {"name": "secret", "federation_enabled": False},
    ]
    store.set_tenant_federation("acme", False)
    assert store.get_tenant("acme")["federation_enabled"] is False
    assert store.get_tenant("nope") is None
    with pytest.raises(StorageError, match="no tenant") as info:
        store.set_tenant_federation("nope", True)
    assert info.value.code == "not_found"

    alice = store.create_user("@alice:host.test", "alice", "acme", "h1")
    assert store.get_user("@alice:host.test") == alice
    assert store.user_by_token_hash("h1") == alice
    assert store.user_by_token_hash("nope") is None
    for args, code in [
        (("@alice:host.test", "alice", "acme", "h2"), "conflict"),  # same id
        (("@bob:host.test", "bob", "acme", "h1"), "conflict"),  # same token hash
        (("@carol:host.test", "carol", "nope", "h3"), "not_found"),  # unknown tenant
    ]:
        with pytest.raises(StorageError) as info:
            store.create_user(*args)
        assert info.value.code == code
    store.create_user("@bob:host.test", "bob", "secret", "h2")
    assert [u["user_id"] for u in store.list_users()] == ["@alice:host.test", "@bob:host.test"]


# ---------------------------------------------------------- rooms, members


def test_rooms_and_members(store: Store) -> None:
    store.create_tenant("acme")
    room = store.create_room(ROOM, "group", "host.test", "@alice:host.test", 10, tenant="acme")
    assert store.get_room(ROOM) == room
    remote = store.create_room("!dm:peer.test", "dm", "peer.test", "@bob:peer.test", 20)
    assert remote["tenant"] is None
    with pytest.raises(StorageError) as info:
        store.create_room(ROOM, "group", "host.test", "@alice:host.test", 11)
    assert info.value.code == "conflict"
    with pytest.raises(StorageError) as info:
        store.create_room("!x:host.test", "group", "host.test", "@a:host.test", 1, tenant="nope")
    assert info.value.code == "not_found"

    store.set_membership(ROOM, "@alice:host.test", "join")
    store.set_membership(ROOM, "@bob:peer.test", "invite")
    store.set_membership(ROOM, "@bob:peer.test", "join")
    store.set_membership("!dm:peer.test", "@alice:host.test", "invite")
    assert store.members(ROOM) == [
        {"room_id": ROOM, "user_id": "@alice:host.test", "membership": "join"},
        {"room_id": ROOM, "user_id": "@bob:peer.test", "membership": "join"},
    ]
    rooms = store.rooms_for_user("@alice:host.test")
    assert [(r["room_id"], r["membership"]) for r in rooms] == [
        (ROOM, "join"), ("!dm:peer.test", "invite")]
    with pytest.raises(StorageError) as info:
        store.set_membership(ROOM, "@alice:host.test", "banned")
    assert info.value.code == "invalid"
    with pytest.raises(StorageError) as info:
        store.set_membership("!nope:host.test", "@alice:host.test", "join")
    assert info.value.code == "not_found"


def test_invites(store: Store) -> None:
    args = (ROOM, "@bob:host.test", "@alice:peer.test", "peer.test", "dm")
    assert store.save_invite(*args, b"signed-1", 10) is True
    assert store.save_invite("!r2:peer.test", "@bob:host.test", "@carol:peer.test", "peer.test",
                             "group", b"signed-2", 5) is True
    pending = store.pending_invites("@bob:host.test")
    assert [i["room_id"] for i in pending] == ["!r2:peer.test", ROOM]  # oldest first
    store.set_invite_state(ROOM, "@bob:host.test", "accepted")
    # A retried PUT of the same invite does not reopen it...
    assert store.save_invite(*args, b"signed-1", 11) is False
    assert store.get_invite(ROOM, "@bob:host.test")["state"] == "accepted"
    # ...but a new invite (new signed payload) is pending again.
    assert store.save_invite(*args, b"signed-3", 12) is True
    invite = store.get_invite(ROOM, "@bob:host.test")
    assert (invite["state"], invite["payload"], invite["created_at"]) == (
        "pending", b"signed-3", 12)
    store.set_invite_state("!r2:peer.test", "@bob:host.test", "declined")
    with pytest.raises(StorageError):
        store.save_invite("!r3:peer.test", "@bob:host.test", "@c:peer.test", "peer.test", "group",
                          b"signed-4", 13, state="lost")
    store.save_invite(room_id="!r4:peer.test", user_id="@bob:host.test", inviter="@c:peer.test",
                      origin="peer.test", room_type="group", state="accepted",
                      payload=b"signed-5", created_at=14)
    assert store.get_invite("!r4:peer.test", "@bob:host.test")["state"] == "accepted"
    assert [i["room_id"] for i in store.pending_invites("@bob:host.test")] == [ROOM]
    for room, state, code in [(ROOM, "maybe", "invalid"), ("!no:x.test", "accepted", "not_found")]:
        with pytest.raises(StorageError) as info:
            store.set_invite_state(room, "@bob:host.test", state)
        assert info.value.code == code


# ------------------------------------------------------------------ events


def test_a_backfill_page_is_read_up_to_its_byte_budget(store: Store) -> None:
    """``page_before`` reads a page as build_page will hold it: at most
    ``limit`` events below ``before``, newest first, and no more than fit in
    ``max_bytes`` as the core counts them; the database stops there."""
    events = [{**ev(d), "envelope": bytes([d]) * (1000 + d)} for d in range(1, 11)]
    store.store_events(ROOM, events)
    store.store_events("!other:host.test", [ev(d, room="!other:host.test") for d in range(3)])
    assert store.page_before(ROOM, None, 3, 10**9) == ([10, 9, 8], [e["envelope"] for e in events[::-1][:3]])
    assert store.page_before(ROOM, 4, 10, 10**9)[0] == [3, 2, 1]
    assert store.page_before(ROOM, 1, 10, 10**9) == ([], [])
    budget = sum(page_bytes(e["envelope"]) for e in events[-3:])  # depths 10, 9, 8 exactly
    for cut, depths in [(budget, [10, 9, 8]), (budget - 1, [10, 9]), (budget + page_bytes(events[6]["envelope"]),
                                                                        [10, 9, 8, 7])]:
        got, envelopes = store.page_before(ROOM, None, 500, cut)
        assert got == depths and envelopes == [events[d - 1]["envelope"] for d in depths]


def test_event_queries(store: Store) -> None:
    assert store.head(ROOM) is None and store.page_before(ROOM, None, 10, 10**9) == ([], [])
    assert store.store_events(ROOM, [ev(d) for d in range(10)]) == 10
    store.store_events("!other:host.test", [ev(d, room="!other:host.test") for d in range(3)])
    assert store.head(ROOM) == {"room_id": ROOM, **ev(9)}
    assert store.page_before(ROOM, None, 3, 10**9)[0] == [9, 8, 7]
    assert store.page_before(ROOM, 7, 3, 10**9)[0] == [6, 5, 4]
    assert store.page_before(ROOM, 2, 10, 10**9)[0] == [1, 0]
    assert [e["depth"] for e in store.events_after(ROOM, None, 3)] == [0, 1, 2]
    assert [e["depth"] for e in store.events_after(ROOM, 7, 10)] == [8, 9]
    assert store.event_count(ROOM) == 10 and store.depths(ROOM) == list(range(10))
    got = store.get_event(ev(4)["event_id"])
    assert got == {"room_id": ROOM, **ev(4)} and isinstance(got["envelope"], bytes)
    assert store.get_event(b"\0" * 32) is None


def test_store_events_conflict_stores_nothing_of_the_batch(store: Store) -> None:
    store.store_events(ROOM, [ev(0), ev(1)])
    store.store_events(ROOM, [], cursor={"peer": "p.test", "cursor": b"c0", "stored": 2,
                                         "updated_at": 1})
    batch = [ev(2), ev(3), ev(1, tag="fork"), ev(4)]  # 3rd: a different event at depth 1
    with pytest.raises(StorageError) as info:
        store.store_events(ROOM, batch, cursor={"peer": "p.test", "cursor": b"c1", "stored": 5,
                                                "updated_at": 2})
    assert info.value.code == "conflict"
    assert store.depths(ROOM) == [0, 1] and store.get_event(ev(1)["event_id"]) == {
        "room_id": ROOM, **ev(1)}
    assert store.get_cursor(ROOM, "p.test")["cursor"] == b"c0"  # the cursor rolled back too


def test_store_events_is_idempotent(store: Store) -> None:
    page = [ev(d) for d in range(5)]
    assert store.store_events(ROOM, page) == 5
    assert store.store_events(ROOM, page) == 0
    assert store.store_events(ROOM, [ev(4), ev(5)]) == 1  # overlapping page: only the new one
    assert store.event_count(ROOM) == 6


def test_store_events_refuses_bad_events(store: Store) -> None:
    other = ev(0, room="!other:host.test")
    cases = [
        {**ev(0), "event_id": b"short"},  # not a 32-byte id: the CHECK constraint
        {**ev(0), "event_id": "a" * 32},  # str, not bytes
        {k: v for k, v in ev(0).items() if k != "sender"},
        {**other, "room_id": "!other:host.test"},  # says another room
    ]
    for bad in cases:
        with pytest.raises(StorageError) as info:
            store.store_events(ROOM, [ev(5), bad])
        assert info.value.code == "invalid", bad
    # The same event id in another room's slot is a conflict, not a duplicate.
    store.store_events("!other:host.test", [other])
    with pytest.raises(StorageError) as info:
        store.store_events(ROOM, [{**other, "depth": 0}])
    assert info.value.code == "conflict"
    assert store.event_count(ROOM) == 0


def test_page_and_cursor_are_stored_together(store: Store) -> None:
    cursor = {"peer": "peer.test", "cursor": b"\x82\x01\x02", "stored": 3, "updated_at": 50}
    assert store.store_events(ROOM, [ev(9), ev(8), ev(7)], cursor=cursor) == 3
    assert store.get_cursor(ROOM, "peer.test") == {"room_id": ROOM, **cursor}
    cursor2 = {**cursor, "cursor": b"\x82\x03", "stored": 5, "updated_at": 60}
    store.store_events(ROOM, [ev(6), ev(5)], cursor=cursor2)
    assert store.get_cursor(ROOM, "peer.test") == {"room_id": ROOM, **cursor2}
    store.clear_cursor(ROOM, "peer.test")
    assert store.get_cursor(ROOM, "peer.test") is None


CRASH_CHILD = textwrap.dedent(
    """
    import hashlib, json, os, signal, sys
    from pathlib import Path
    from scaiwave_federation.shell.store.store import Store

    room = sys.argv[2]

    def ev(depth):
        eid = hashlib.sha256(f"{room}|{depth}|".encode()).digest()
        # Big envelopes, and a one-page cache below: uncommitted rows of
        # page 2 spill into the WAL file before the crash, so recovery has
        # real uncommitted frames to discard, not just lost memory.
        return {"event_id": eid, "depth": depth, "sender": "@a:host.test",
                "origin": "host.test", "type": "m.message", "ts": depth,
                "envelope": eid * 200}

    store = Store.open(sys.argv[1])
    if store.backend == "sqlite":
        store.db.execute("PRAGMA cache_size=1")
        wal = Path(sys.argv[1]) / "scaiwave.db-wal"
        size = lambda: wal.stat().st_size
    else:  # PostgreSQL: the server holds the open transaction when the client dies
        size = lambda: store.db.execute("SELECT count(*) FROM events").fetchone()[0]
    store.store_events(room, [ev(d) for d in range(100, 90, -1)],
                       cursor={"peer": "peer.test", "cursor": b"page-1", "stored": 10,
                               "updated_at": 1})
    after_page_1 = size()

    inserted = 0
    real_insert = Store._insert_event

    def insert_then_die(self, room_id, event):
        global inserted
        new = real_insert(self, room_id, event)
        inserted += 1
        if inserted == 7:  # page 2 is 10 events: die with 7 of them written
            print(json.dumps({"after_page_1": after_page_1, "at_crash": size(),
                              "in_transaction": self._in_transaction()}), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
            os._exit(1)  # where SIGKILL is not available
        return new

    Store._insert_event = insert_then_die
    store.store_events(room, [ev(d) for d in range(90, 80, -1)],
                       cursor={"peer": "peer.test", "cursor": b"page-2", "stored": 20,
                               "updated_at": 2})
    print("page 2 committed: the crash did not happen", flush=True)
    """
)


def test_crash_between_pages_keeps_page_1_and_nothing_of_page_2(store_target) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, str(store_target), ROOM],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode in (-signal.SIGKILL, 1), proc.stderr
    report = json.loads(proc.stdout.splitlines()[0])
    assert report["in_transaction"] is True
    # SQLite: page 2's frames reached the WAL file; PostgreSQL: the 7 rows
    # were written in the server, visible to the dying transaction.
    assert report["at_crash"] > report["after_page_1"]
    if isinstance(store_target, Path):
        assert (store_target / f"{DB_FILENAME}-wal").exists()  # not checkpointed: recovery runs

    with Store.open(store_target) as s:
        assert s.depths(ROOM) == list(range(91, 101))
        cursor = s.get_cursor(ROOM, "peer.test")
        assert (cursor["cursor"], cursor["stored"], cursor["updated_at"]) == (b"page-1", 10, 1)
        if s.backend == "sqlite":
            assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # The pull resumes from the cursor: page 2 again stores all of it, once.
        assert s.store_events(ROOM, [ev(d) for d in range(90, 80, -1)]) == 10
        assert s.event_count(ROOM) == 20


# ---------------------------------------------------- nonces, txns, outbox


def test_nonces(store: Store) -> None:
    assert store.remember_nonce("a.test", b"n1", 100) is True
    assert store.remember_nonce("a.test", b"n1", 100) is False  # a replay
    assert store.remember_nonce("b.test", b"n1", 200) is True  # per origin
    store.remember_nonce("a.test", b"n2", 50)
    assert store.live_nonces(60) == [("a.test", b"n1", 100), ("b.test", b"n1", 200)]
    assert store.expire_nonces(100) == 2
    assert store.live_nonces(0) == [("b.test", b"n1", 200)]


def test_txn_idempotency(store: Store) -> None:
    first = store.store_txn("peer.test", "t1", b"ok-1", 10, ROOM, [ev(0), ev(1)])
    assert first == TxnOutcome(response=b"ok-1", replayed=False, new_events=2)
    again = store.store_txn("peer.test", "t1", b"ok-2", 20, ROOM, [ev(0), ev(1), ev(2)])
    assert again == TxnOutcome(response=b"ok-1", replayed=True, new_events=0)
    assert store.get_txn_response("peer.test", "t1") == b"ok-1"
    assert store.event_count(ROOM) == 2
    assert store.get_txn_response("other.test", "t1") is None
    # A conflicting transaction stores neither its events nor its response.
    with pytest.raises(StorageError):
        store.store_txn("peer.test", "t2", b"ok", 30, ROOM, [ev(2), ev(1, tag="fork")])
    assert store.get_txn_response("peer.test", "t2") is None and store.event_count(ROOM) == 2
    assert store.store_txn("peer.test", "t3", b"empty", 40, None, []).new_events == 0
    # room_id None: a transaction spanning rooms, each event naming its own.
    other = "!other:host.test"
    multi = [{**ev(2), "room_id": ROOM}, {**ev(0, room=other), "room_id": other}]
    assert store.store_txn("peer.test", "t5", b"multi", 45, None, multi).new_events == 2
    assert store.depths(ROOM) == [0, 1, 2] and store.depths(other) == [0]
    with pytest.raises(StorageError) as info:
        store.store_txn("peer.test", "t6", b"x", 46, None, [ev(3)])
    assert info.value.code == "invalid"
    assert store.save_txn_response("peer.test", "t3", b"other", 50) is False
    assert store.save_txn_response("peer.test", "t4", b"four", 50) is True
    assert store.prune_txns(before=40) == 1  # t1 (10); t2 and t6 were never stored
    assert store.get_txn_response("peer.test", "t1") is None


def test_a_transactions_chained_events_are_queued_in_its_write(store: Store) -> None:
    """Events chained from a transaction's proposals are queued in the write
    that stores them: in chain order, never stored without being queued, and
    not again for a repeated transaction (nor when the write fails)."""
    store.create_room(ROOM, "group", "host.test", "@alice:host.test", 1)
    items = [("b.test", "c1", "/send", b"x"), ("c.test", "c2", "/send", b"x")]
    first = store.store_txn("peer.test", "t1", b"ok", 10, ROOM, [ev(0), ev(1)], items)
    assert first.new_events == 2 and len(first.outbox_ids) == 2
    assert [r["id"] for r in store.due(now=10)] == list(first.outbox_ids)
    again = store.store_txn("peer.test", "t1", b"ok", 20, ROOM, [ev(0), ev(1)], items,
                            [(ROOM, "@carol:peer.test", "leave")])
    assert again.replayed and again.outbox_ids == () and store.pending_count() == 2
    assert "@carol:peer.test" not in {m["user_id"] for m in store.members(ROOM)}  # a replay moves nobody
    with pytest.raises(StorageError):
        store.store_txn("peer.test", "t2", b"ok", 30, ROOM, [ev(1, tag="fork")], [("d.test", "c3", "/send", b"y")],
                        [(ROOM, "@dan:d.test", "join")])
    assert store.pending_count("d.test") == 0 and store.get_txn_response("peer.test", "t2") is None
    assert "@dan:d.test" not in {m["user_id"] for m in store.members(ROOM)}  # nor does a failed write
    moved = store.store_txn("peer.test", "t3", b"ok", 35, ROOM, [ev(2)], (), [(ROOM, "@dan:d.test", "join")])
    assert not moved.replayed and {"room_id": ROOM, "user_id": "@dan:d.test", "membership": "join"} in store.members(ROOM)
    # The rows a worker reads below its own (core.handover): by peer and id range.
    b_row = first.outbox_ids[0]
    later = store.enqueue_many([("b.test", "c4", "/send", b"z"), ("b.test", "c5", "/send", b"z")], 40)
    assert store.outbox_between("b.test", 0, later[1]) == [b_row, later[0]]
    assert store.outbox_between("b.test", b_row, later[1]) == [later[0]]
    assert store.outbox_between("c.test", 0, later[1]) == [first.outbox_ids[1]]


def test_a_posts_read_of_its_peers_rows_does_not_grow_with_the_queue(store: Store) -> None:
    """Every write that queues a post for a peer reads the peer's rows between
    two ids (``outbox_between``, core.handover). It must be a range read of
    an index in id order: with the old ``(peer, next_attempt_at)`` index it
    scanned and sorted all of the peer's queued rows, once per post, so a
    peer down for an hour made every post into its rooms slower."""
    ids = store.enqueue_many([("b.test", f"q{n}", "/send", b"x") for n in range(300)], 1)
    assert store.outbox_between("b.test", ids[10], ids[13]) == ids[11:13]
    if store.backend == "sqlite":
        plan = " / ".join(r[3] for r in store.db.execute("EXPLAIN QUERY PLAN " + store.OUTBOX_BETWEEN,
                                                         ["b.test", 0, 1]).fetchall())
        assert "outbox_peer_id" in plan and "TEMP B-TREE" not in plan, plan
    else:
        # Told to avoid a sequential scan (300 rows are few for its planner),
        # PostgreSQL reads the index in order: no sort.
        with store._write():
            store.db.execute("SET LOCAL enable_seqscan = off")
            plan = " / ".join(r[0] for r in store.db.execute("EXPLAIN " + store.OUTBOX_BETWEEN,
                                                             ["b.test", 0, 1]).fetchall())
        assert "outbox_peer_id" in plan and "Sort" not in plan, plan


def test_outbox(store: Store) -> None:
    a1 = store.enqueue("a.test", "txn-a1", "/send/txn-a1", b"body-a1", 100)
    a2 = store.enqueue("a.test", "txn-a2", "/send/txn-a2", b"body-a2", 110)
    b1 = store.enqueue("b.test", "txn-b1", "/send/txn-b1", b"body-b1", 100)
    with pytest.raises(StorageError) as info:
        store.enqueue("a.test", "txn-a1", "/send/txn-a1", b"body", 120)
    assert info.value.code == "conflict"
    assert [r["id"] for r in store.due(now=105)] == [a1, b1]
    assert [r["txn_id"] for r in store.due("a.test", now=200)] == ["txn-a1", "txn-a2"]
    assert store.due("a.test", now=200)[0]["body"] == b"body-a1"
    assert store.pending_count("a.test") == 2 and store.pending_count() == 3
    store.mark_attempt(a1, next_attempt_at=1000)
    store.mark_attempt(a2, next_attempt_at=2000)
    store.mark_error("a.test", "peer_unreachable", "refused", now=150, retry_at=1000)
    assert store.due("a.test", now=500) == [] and store.next_due_at("a.test") == 1000
    assert store.due("a.test", now=1000)[0]["attempts"] == 1
    # The admin "retry now".
    assert store.reset_retry("a.test", now=500) == 2
    assert [r["id"] for r in store.due("a.test", now=500)] == [a1, a2]
    assert store.get_peer("a.test")["retry_at"] is None
    store.delivered(a1)
    assert store.pending_count("a.test") == 1 and store.next_due_at() == 100
    for call in (lambda: store.delivered(a1), lambda: store.mark_attempt(a1, 1)):
        with pytest.raises(StorageError) as info:
            call()
        assert info.value.code == "not_found"



def test_outbox_many_at_once(store: Store) -> None:
    ids = store.enqueue_many([("a.test", "m1", "/send", b"x"), ("b.test", "m2", "/send", b"x")], 100)
    assert [r["id"] for r in store.due(now=100)] == ids and ids == sorted(ids)
    # One conflicting row: none of the batch is queued.
    with pytest.raises(StorageError) as info:
        store.enqueue_many([("c.test", "m3", "/send", b"y"), ("c.test", "m1", "/send", b"y")], 100)
    assert info.value.code == "conflict" and store.pending_count("c.test") == 0
    assert store.delivered_many([]) == 0
    assert store.delivered_many([ids[0], ids[0] + 1000]) == 1  # an id already gone is no error
    assert [r["id"] for r in store.due(now=100)] == [ids[1]]


def test_a_post_is_stored_and_queued_in_one_write(store: Store) -> None:
    ids = store.store_events_and_enqueue(ROOM, [ev(0), ev(1)], [("a.test", "p1", "/send", b"x")], 100)
    assert [r["id"] for r in store.due(now=100)] == ids and store.depths(ROOM) == [0, 1]
    assert store.store_events_and_enqueue(ROOM, [ev(2)], [], 100) == []  # no member server: stored only
    # A fork (another event at depth 2): neither the event nor its queue entry is kept.
    with pytest.raises(StorageError) as info:
        store.store_events_and_enqueue(ROOM, [ev(2, tag="fork")], [("a.test", "p2", "/send", b"y")], 100)
    assert info.value.code == "conflict" and store.pending_count() == 1 and store.depths(ROOM) == [0, 1, 2]
    # The memberships an event moves go in its write: both or neither.
    store.create_room(ROOM, "group", "host.test", "@alice:host.test", 1)
    store.store_events_and_enqueue(ROOM, [ev(3)], [], 100, memberships={"@bob:host.test": "leave"})
    assert {"room_id": ROOM, "user_id": "@bob:host.test", "membership": "leave"} in store.members(ROOM)
    with pytest.raises(StorageError):
        store.store_events_and_enqueue(ROOM, [ev(3, tag="fork")], [], 100, memberships={"@carol:host.test": "join"})
    assert "@carol:host.test" not in {m["user_id"] for m in store.members(ROOM)}


def test_a_refill_reads_a_peers_next_rows_and_the_queued_peers_are_found_by_seeks(store: Store) -> None:
    """``outbox_from`` (a refill of a peer's delivery window, core.handover):
    the peer's next rows above an id, in id order, at most ``limit``.
    ``queued_peers`` (every resync): one seek per peer of the (peer, id)
    index, not a read of every row; the same answer on both backends."""
    assert store.queued_peers() == []
    assert store.outbox_from("b.test", 0, 10) == []
    ids = store.enqueue_many([(peer, f"r{n}-{peer}", "/send", b"x%d" % n)
                              for n in range(30) for peer in ("b.test", "a.test:8448", "é.test")], 5)
    b_ids = ids[0::3]
    rows = store.outbox_from("b.test", b_ids[3], 5)
    assert [r["id"] for r in rows] == b_ids[4:9]
    assert {r["peer"] for r in rows} == {"b.test"} and bytes(rows[0]["body"]) == b"x4"
    assert rows[0]["attempts"] == 0 and rows[0]["next_attempt_at"] == 5
    assert [r["id"] for r in store.outbox_from("b.test", b_ids[-2], 5)] == b_ids[-1:]
    assert store.queued_peers() == sorted({"b.test", "a.test:8448", "é.test"})
    store.delivered_many(ids[1::3])
    assert store.queued_peers() == sorted({"b.test", "é.test"})
