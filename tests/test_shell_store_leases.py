"""The lease rows (shell/store/lease_rows.py) on a real database file: the
conditional writes core.leases relies on, the shared-state generation, and
the outbox reads of a worker; and migration 4 on a version-3 file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from scaiwave_federation.shell.store import schema
from scaiwave_federation.shell.store.store import DB_FILENAME, Store, StorageError


@pytest.fixture
def store(tmp_path: Path):
    with Store.open(tmp_path) as s:
        yield s


def test_a_claim_takes_a_free_stale_or_own_lease_only(store: Store) -> None:
    assert store.claim_lease("peer:p", "w1", 100, 0) == (True, {"name": "peer:p", "owner": "w1", "expires_at": 100})
    # Held by a live w1: w2's claim writes nothing.
    assert store.claim_lease("peer:p", "w2", 150, 99) == (False, {"name": "peer:p", "owner": "w1", "expires_at": 100})
    # w1 again (a claim of one's own lease extends it).
    assert store.claim_lease("peer:p", "w1", 120, 50)[0]
    # Stale at 120: w2 takes it over.
    assert store.claim_lease("peer:p", "w2", 220, 120) == (True, {"name": "peer:p", "owner": "w2", "expires_at": 220})


def test_renewal_only_where_still_the_owner_and_release(store: Store) -> None:
    store.claim_lease("peer:a", "w1", 100, 0)
    store.claim_lease("peer:b", "w1", 100, 0)
    store.claim_lease("peer:b", "w2", 300, 100)  # b went to w2
    rows = store.renew_leases("w1", ["peer:a", "peer:b"], 200)
    assert rows == [{"name": "peer:a", "owner": "w1", "expires_at": 200},
                    {"name": "peer:b", "owner": "w2", "expires_at": 300}]
    assert store.release_lease("peer:b", "w1") is False
    assert store.release_lease("peer:a", "w1") is True
    assert store.lease_rows() == [{"name": "peer:b", "owner": "w2", "expires_at": 300}]


def test_shared_change_bumps_the_generation_atomically(store: Store) -> None:
    assert store.shared_generation() == 0
    assert store.shared_change(lambda: store.set_policy({"default_mode": "open", "allowed_peers": [],
                                                         "blocked_peers": []})) == (None, 1)
    # Expecting an older generation: refused, and nothing of the change is written.
    with pytest.raises(StorageError) as err:
        store.shared_change(lambda: store.set_policy({"default_mode": "closed", "allowed_peers": [],
                                                      "blocked_peers": []}), expect=0)
    assert err.value.code == "conflict"
    assert store.get_policy()["default_mode"] == "open" and store.shared_generation() == 1

    def failing() -> None:
        store.set_policy({"default_mode": "closed", "allowed_peers": [], "blocked_peers": []})
        raise RuntimeError("half way")

    with pytest.raises(RuntimeError):
        store.shared_change(failing, expect=1)
    assert store.get_policy()["default_mode"] == "open" and store.shared_generation() == 1


def test_outbox_reads_of_a_worker(store: Store) -> None:
    ids = store.enqueue_many([("p.test", "t1", "/x", b"1"), ("q.test", "t2", "/x", b"2"),
                              ("p.test", "t3", "/x", b"3")], 5)
    assert [r["id"] for r in store.outbox_after(0)] == ids
    assert store.outbox_after(ids[0]) == [{"id": ids[1], "peer": "q.test"}, {"id": ids[2], "peer": "p.test"}]
    assert store.outbox_ids(["p.test"]) == [(ids[0], "p.test"), (ids[2], "p.test")]
    rows = store.outbox_rows([ids[2], ids[0]])
    assert [(r["id"], bytes(r["body"]), r["next_attempt_at"]) for r in rows] == [(ids[0], b"1", 5), (ids[2], b"3", 5)]
    assert store.queued_peers() == ["p.test", "q.test"]


def test_backfill_jobs_are_shared_rows(store: Store) -> None:
    first = store.save_job(None, {"room_id": "!r:h", "state": "running", "stored": 0}, 10)
    second = store.save_job(None, {"room_id": "!s:h", "state": "running", "stored": 0}, 20)
    assert second > first
    assert store.save_job(first, {"id": first, "room_id": "!r:h", "state": "done", "stored": 9}, 30) == first
    assert store.get_job(first) == {"id": first, "room_id": "!r:h", "state": "done", "stored": 9}
    assert store.prune_jobs(25) == 1  # the second, last changed at 20
    assert store.get_job(second) is None and store.get_job(first) is not None


def test_a_version_3_file_gets_the_lease_tables(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / DB_FILENAME, isolation_level=None)
    assert schema.migrate(sqlite_utils.Database(conn), schema.MIGRATIONS[:3]) == 3
    conn.close()
    with Store.open(tmp_path) as store:
        assert store.schema_version() == schema.SCHEMA_VERSION
        assert store.lease_rows() == [] and store.shared_generation() == 0


def test_a_version_4_files_queued_rows_survive_the_outbox_index_change(tmp_path: Path) -> None:
    """Migration 5 swaps the outbox's indexes: rows queued before it are all
    there after it, in order, and read by peer and id range."""
    conn = sqlite3.connect(tmp_path / DB_FILENAME, isolation_level=None)
    assert schema.migrate(sqlite_utils.Database(conn), schema.MIGRATIONS[:4]) == 4
    for n, peer in enumerate(["b.test", "c.test", "b.test", "b.test"]):
        conn.execute("INSERT INTO outbox (peer, txn_id, path, body, created_at, next_attempt_at)"
                     " VALUES (?, ?, '/send', x'00', 1, 1)", (peer, f"t{n}"))
    conn.close()
    with Store.open(tmp_path) as store:
        assert store.schema_version() == schema.SCHEMA_VERSION
        assert store.outbox_ids(["b.test", "c.test"]) == [(1, "b.test"), (2, "c.test"), (3, "b.test"), (4, "b.test")]
        assert store.outbox_between("b.test", 1, 4) == [3]
