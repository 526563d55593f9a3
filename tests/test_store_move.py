"""Moving a server from SQLite to PostgreSQL (``scaiwave admin db migrate --to``), for real.

Two real daemons federate on SQLite; one is stopped, its data moved to a
fresh database on the run's PostgreSQL server, and started again on it: it
serves the same history, peers and keys, and goes on federating (the outbox's
ids continue). The refusals an admin meets are checked on the way: the daemon
still running, a URL that is not PostgreSQL, a target that is not empty.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from scaiwave_federation.shell.demo.testbed import Testbed, peered_dm, wait_until

def _bodies(server, room: str, token: str) -> list[str]:
    status, body = server.request("GET", f"/v1/rooms/{room}/messages", token=token)
    assert status == 200, body
    return [m["body"] for m in body["messages"]]


def _sqlite_counts(data_dir: Path) -> dict[str, int]:
    db = sqlite3.connect(data_dir / "scaiwave.db")
    try:  # closed before the move: an open connection is what "in use" detects
        names = [n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                 if n != "meta" and not n.startswith("sqlite_")]
        return {n: db.execute(f"SELECT count(*) FROM {n}").fetchone()[0] for n in names}
    finally:
        db.close()


@pytest.mark.e2e
def test_a_stopped_server_moves_to_postgresql_and_serves_the_same(tmp_path: Path, pg) -> None:
    bed = Testbed(tmp_path)
    a, b = bed.add("your-host.test"), bed.add("peer.test")
    try:
        a.start()
        b.start()
        room, alice, bob = peered_dm(a, b)
        for i in range(5):
            assert a.request("POST", f"/v1/rooms/{room}/messages", {"body": f"m{i}"},
                             token=alice["access_token"])[0] == 200
        wait_until(lambda: "m4" in _bodies(b, room, bob["access_token"]))
        assert b.request("POST", f"/v1/rooms/{room}/messages", {"body": "reply"}, token=bob["access_token"])[0] == 200
        wait_until(lambda: "reply" in _bodies(a, room, alice["access_token"]))
        history = _bodies(a, room, alice["access_token"])
        peers = a.admin("GET", "/v1/admin/federation/peers")[1]["peers"]
        key = a.admin("GET", "/v1/admin/federation/key")[1]
        url = pg.fresh()

        # The daemon still holds the file: refused, nothing copied.
        proc = a.cli("admin", "db", "migrate", "--to", url)
        assert proc.returncode == 1 and proc.stderr.startswith("error: conflict: "), proc.stderr
        assert "stop the daemon" in proc.stderr and "Traceback" not in proc.stderr
        proc = a.cli("admin", "db", "migrate", "--to", "mysql://db.example/scaiwave")
        assert proc.returncode == 1 and proc.stderr.startswith("error: bad_request: "), proc.stderr

        a.stop()
        expected = _sqlite_counts(Path(a.env["SCAIWAVE_DATA_DIR"]))
        assert expected["events"] >= 7 and expected["peers"] == 1 and expected["keys"] == 1
        moved = a.cli_json("admin", "db", "migrate", "--to", url)
        assert moved["tables"] == expected
        # Never merged: the same move again finds rows and refuses.
        proc = a.cli("admin", "db", "migrate", "--to", url)
        assert proc.returncode == 1 and proc.stderr.startswith("error: conflict: ") and "not empty" in proc.stderr

        a.env["SCAIWAVE_DATABASE_URL"] = url
        a.start()
        assert _bodies(a, room, alice["access_token"]) == history
        # (what is queued for the peer may have changed since: it is live state, moved as it was)
        kept = ("server_name", "state", "protocol_version", "key_id", "paused")
        assert [{k: p[k] for k in kept} for p in a.admin("GET", "/v1/admin/federation/peers")[1]["peers"]] == \
            [{k: p[k] for k in kept} for p in peers]
        assert a.admin("GET", "/v1/admin/federation/key")[1] == key
        # It goes on federating from PostgreSQL: both ways.
        assert a.request("POST", f"/v1/rooms/{room}/messages", {"body": "from postgres"},
                         token=alice["access_token"])[0] == 200
        wait_until(lambda: "from postgres" in _bodies(b, room, bob["access_token"]))
        assert b.request("POST", f"/v1/rooms/{room}/messages", {"body": "back"}, token=bob["access_token"])[0] == 200
        wait_until(lambda: "back" in _bodies(a, room, alice["access_token"]))
        check = json.loads(a.cli("admin", "federation", "check", "--json").stdout)
        storage = check["steps"][0]
        assert storage["step"] == "storage" and storage["ok"] is True, storage
        assert storage["detail"].startswith("postgresql at postgresql://")
        # An online backup is SQLite's; on PostgreSQL the admin is told what to use.
        status, answer = a.admin("POST", "/v1/admin/db/backup", {})
        assert status == 400 and "pg_dump" in answer["error"]["message"]
    finally:
        bed.stop()


def test_outbox_ids_go_on_after_the_highest_sqlite_ever_gave_out(tmp_path: Path, pg) -> None:
    """A delivered id is never reused (a late delivered(id) must not hit a newer
    request): after the move, PostgreSQL's identity continues past every id
    SQLite handed out, including those already delivered and deleted."""
    from scaiwave_federation.shell.store.move import move_to_postgres
    from scaiwave_federation.shell.store.store import Store

    with Store.open(tmp_path / "data") as s:
        s.create_tenant("acme")
        ids = s.enqueue_many([("peer.test", f"t{i}", "/x", b"body") for i in range(3)], 1)
        s.delivered_many(ids)
    url = pg.fresh()
    assert move_to_postgres(tmp_path / "data", url)["tables"]["outbox"] == 0
    with Store.open(url) as moved:
        assert moved.enqueue("peer.test", "t9", "/x", b"body", 2) == ids[-1] + 1
        assert moved.get_tenant("acme") == {"name": "acme", "federation_enabled": True}
