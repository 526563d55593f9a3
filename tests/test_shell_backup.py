"""``scaiwave admin db backup``: an online backup of a running daemon under
write load, and a restore from it that gives a working, federating daemon."""

from __future__ import annotations

import shutil
import stat
import threading
from pathlib import Path

from scaiwave_federation.shell.store.schema import SCHEMA_VERSION
from scaiwave_federation.shell.demo.testbed import Testbed, wait_until


def _peer_and_dm(a, b) -> tuple[str, str, str]:
    for server, other in ((a, b), (b, a)):
        server.cli("admin", "federation", "key", "generate", check=True)
        server.cli("admin", "federation", "policy", "set", "--allow", other.server_name, check=True)
        server.cli("admin", "tenant", "create", "acme", check=True)
    alice = a.cli_json("admin", "user", "create", "alice", "--tenant", "acme")
    bob = b.cli_json("admin", "user", "create", "bob", "--tenant", "acme")
    status, dm = a.request("POST", "/v1/dms", {"to": bob["user_id"]}, token=alice["access_token"])
    assert status == 200, dm
    assert b.request("POST", f"/v1/invites/{dm['room_id']}/accept", token=bob["access_token"])[0] == 200
    return dm["room_id"], alice["access_token"], bob["access_token"]


def _bodies(server, room: str, token: str) -> list[str]:
    status, data = server.request("GET", f"/v1/rooms/{room}/messages", token=token)
    assert status == 200, data
    return [m["body"] for m in data["messages"]]


def test_backup_while_writing_then_restore(tmp_path: Path) -> None:
    bed = Testbed(tmp_path / "bed")
    a, b = bed.add("your-host.test"), bed.add("peer.test")
    try:
        a.start()
        b.start()
        dm, alice, bob = _peer_and_dm(a, b)
        assert a.request("POST", f"/v1/rooms/{dm}/messages", {"body": "before the backup"}, token=alice)[0] == 200
        key_id = a.get("/.well-known/scaiwave")["key_id"]
        group = a.request("POST", "/v1/rooms", {"room_type": "group"}, token=alice)[1]["room_id"]
        # Writes keep coming while the backup is taken.
        stop, posted = threading.Event(), []

        def writer() -> None:
            from scaiwave_federation.shell.demo.testbed import Server

            me = Server(a.name, a.port, a.root, a.ca_path, a.admin_token)
            while not stop.is_set():
                n = len(posted)
                assert me.request("POST", f"/v1/rooms/{group}/messages", {"body": f"m{n}"}, token=alice)[0] == 200
                posted.append(n)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            wait_until(lambda: len(posted) >= 5)
            proc = a.cli("admin", "db", "backup", "before-restore.db")
        finally:
            stop.set()
            thread.join()
        assert proc.returncode == 0, proc.stderr
        backup = a.root / "data" / "backups" / "before-restore.db"
        assert proc.stdout.startswith(f"backup written: {backup} (")
        assert proc.stdout.rstrip().endswith(f"bytes, schema version {SCHEMA_VERSION}, integrity ok)")
        assert stat.S_IMODE(backup.stat().st_mode) == 0o600
        assert stat.S_IMODE(backup.parent.stat().st_mode) == 0o700
        # Never overwritten; a default name with the time.
        again = a.cli("admin", "db", "backup", "before-restore.db")
        assert again.returncode == 1
        assert again.stderr == f"error: conflict: {backup} exists: a backup never overwrites a file\n"
        default = a.cli_json("admin", "db", "backup")
        assert Path(default["path"]).parent == backup.parent
        assert Path(default["path"]).name.startswith("scaiwave-20")
        # A name, never a path: the daemon creates files in its backups directory only.
        outside = tmp_path / "outside.db"
        for name in (str(outside), "../outside.db", ".hidden", "a/b", "", "x" * 101, 7):
            status, body = a.admin("POST", "/v1/admin/db/backup", {"name": name})
            assert status == 400 and body["error"]["code"] == "bad_request", (name, body)
        assert not outside.exists() and not (a.root / "data" / "outside.db").exists()
        (backup.parent / "link.db").symlink_to(outside)
        status, body = a.admin("POST", "/v1/admin/db/backup", {"name": "link.db"})
        assert status == 409 and not outside.exists()
        saved = tmp_path / "saved.db"
        shutil.copyfile(backup, saved)
        # Restore: stop, put the backup in place of the database, start.
        a.stop()
        data = a.root / "data"
        shutil.move(data, tmp_path / "old-data")
        data.mkdir(mode=0o700)
        shutil.copyfile(saved, data / "scaiwave.db")
        (data / "scaiwave.db").chmod(0o600)
        a.start()
        assert a.get("/.well-known/scaiwave")["key_id"] == key_id  # the same signing key
        restored = _bodies(a, group, alice)
        assert restored == [f"m{i}" for i in range(len(restored))]  # one consistent moment
        assert 5 <= len(restored) <= len(posted)
        assert _bodies(a, dm, alice) == ["before the backup"]
        # The restored daemon federates: bob gets the next message.
        assert a.request("POST", f"/v1/rooms/{dm}/messages", {"body": "after the restore"}, token=alice)[0] == 200
        wait_until(lambda: _bodies(b, dm, bob) == ["before the backup", "after the restore"])
    finally:
        bed.stop()
