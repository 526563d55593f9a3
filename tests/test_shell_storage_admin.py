"""The rows of an admin's second day, on a real SQLite file: peers paused and
forgotten, users deactivated and given new tokens, client transactions, and a
DM's room stored all or nothing."""

from __future__ import annotations


import pytest

from scaiwave_federation.shell.store.store import Store, StorageError


def test_pause_and_forget_need_a_known_peer_and_forget_guards_the_queue(store: Store) -> None:
    with pytest.raises(StorageError) as err:
        store.set_paused("typo.test", True)
    assert err.value.code == "not_found" and store.get_peer("typo.test") is None
    store.enqueue("peer.test", "t1", "/x", b"body", 1)  # a queue without a peers row yet
    assert store.set_paused("peer.test", True)["paused"] == 1
    assert store.paused_peers() == {"peer.test"}
    with pytest.raises(StorageError) as err:
        store.forget_peer("peer.test", drop_queued=False)
    assert err.value.code == "conflict" and "1 transactions are queued" in err.value.message
    assert store.pending_count("peer.test") == 1 and store.get_peer("peer.test") is not None
    assert store.forget_peer("peer.test", drop_queued=True) == 1
    assert store.get_peer("peer.test") is None and store.pending_count("peer.test") == 0
    with pytest.raises(StorageError) as err:
        store.forget_peer("peer.test", drop_queued=True)
    assert err.value.code == "not_found"


def test_a_deactivated_users_token_finds_nobody_and_cannot_be_reissued(store: Store) -> None:
    store.create_tenant("acme")
    store.create_user("@a:h.test", "a", "acme", "h1")
    assert store.user_by_token_hash("h1")["user_id"] == "@a:h.test"
    store.set_token_hash("@a:h.test", "h2")
    assert store.user_by_token_hash("h1") is None and store.user_by_token_hash("h2") is not None
    first = store.deactivate_user("@a:h.test", 10)["deactivated_at"]
    assert first == 10 and store.deactivate_user("@a:h.test", 20)["deactivated_at"] == 10
    assert store.user_by_token_hash("h2") is None and store.get_user("@a:h.test") is not None
    with pytest.raises(StorageError) as err:
        store.set_token_hash("@a:h.test", "h3")
    assert err.value.code == "conflict"
    with pytest.raises(StorageError) as err:
        store.deactivate_user("@nobody:h.test", 1)
    assert err.value.code == "not_found"


def test_the_first_answer_of_a_client_txn_stays(store: Store) -> None:
    row = {"user_id": "@a:h.test", "txn_id": "t", "room_id": "!r:h.test", "body_hash": b"1" * 32,
           "response": '{"depth": 1}', "created_at": 1}
    store.save_client_txn(row)
    store.save_client_txn({**row, "response": '{"depth": 2}'})
    assert store.client_txn("@a:h.test", "t")["response"] == '{"depth": 1}'
    assert store.client_txn("@b:h.test", "t") is None


def test_a_room_with_its_first_rows_is_stored_all_or_nothing(store: Store) -> None:
    store.create_tenant("acme")
    room = {"room_id": "!r:h.test", "room_type": "dm", "host": "h.test", "tenant": "acme", "creator": "@a:h.test",
            "created_at": 1}
    bad_invite = {"room_id": "!r:h.test", "user_id": "@b:h.test", "inviter": "@a:h.test", "origin": "h.test",
                  "room_type": "dm", "payload": b"x", "created_at": 1, "state": "nonsense"}
    with pytest.raises(StorageError):
        store.create_room_with(room, [], {"@a:h.test": "join", "@b:h.test": "invite"}, bad_invite)
    assert store.get_room("!r:h.test") is None and store.members("!r:h.test") == []
    store.create_room_with(room, [], {"@a:h.test": "join"}, {**bad_invite, "state": "pending"})
    assert store.get_room("!r:h.test") is not None and store.get_invite("!r:h.test", "@b:h.test") is not None


def test_a_version_2_file_upgrades_keeping_its_users_and_peers(tmp_path) -> None:
    import sqlite3

    import sqlite_utils

    from scaiwave_federation.shell.store import schema

    data = tmp_path / "old"
    data.mkdir()
    conn = sqlite3.connect(data / "scaiwave.db", isolation_level=None)
    db = sqlite_utils.Database(conn)
    assert schema.migrate(db, schema.MIGRATIONS[:2]) == 2
    db.execute("INSERT INTO tenants (name) VALUES ('acme')")
    db.execute("INSERT INTO users VALUES ('@a:h.test', 'a', 'acme', 'h1')")
    db.execute("INSERT INTO peers (server_name, state) VALUES ('peer.test', 'active')")
    conn.close()
    with Store.open(data) as store:
        assert store.schema_version() == schema.SCHEMA_VERSION
        assert store.user_by_token_hash("h1")["deactivated_at"] is None
        assert store.get_peer("peer.test")["paused"] == 0 and store.paused_peers() == set()
