"""A full or failing disk never stops the daemon (issue 11, item 7).

The daemon's data directory sits on a tiny tmpfs (a real full disk) when the
test may mount one (root); otherwise the fault is injected below the store:
the SQLite connection's writes fail with SQLITE_FULL, exactly what SQLite
raises on a full disk. Either way the test does what an admin meets: users
keep writing until the disk is full, get a retryable ``storage_unavailable``
(503), the daemon keeps answering, and once space returns every acknowledged
message is there and delivered to the peer.

On PostgreSQL the same fault is a server that drops the connection (a restart,
a failover): the tests at the end kill the daemon's real backend on the run's
server and check the same promises.
"""

from __future__ import annotations

import sqlite3
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import cbor2
import pytest
import trustme

from scaiwave_federation.shell.store import store as storage_module
from scaiwave_federation.shell.store.async_store import storage_fault

from shellhelpers import FED, InMemory, error_code, peered_dm, two_daemons, wait_for


class _FullDisk:
    """A switch that makes the disk full (``fill``) and frees it (``free``)."""

    def __init__(self, root: Path, mounted: bool) -> None:
        self.root, self.mounted, self.full = root, mounted, False

    def fill(self) -> None:
        self.full = True
        if self.mounted:
            with open(self.root / "filler", "wb") as out:
                try:
                    while True:
                        out.write(b"\0" * 65536)
                        out.flush()
                except OSError:
                    pass

    def free(self) -> None:
        self.full = False
        if self.mounted:
            (self.root / "filler").unlink()


class _FaultyConnection:
    """An sqlite3 connection whose writes fail like a full disk while ``disk.full``."""

    def __init__(self, conn: sqlite3.Connection, disk: _FullDisk) -> None:
        self._conn, self._disk = conn, disk

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self._disk.full and sql.lstrip().upper().startswith(("BEGIN", "INSERT", "UPDATE", "DELETE")):
            exc = sqlite3.OperationalError("database or disk is full")
            exc.sqlite_errorcode = sqlite3.SQLITE_FULL  # what the sqlite3 module sets
            raise exc
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@contextmanager
def _small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_FullDisk]:
    root = tmp_path / "disk"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(root)],
                             capture_output=True).returncode == 0
    disk = _FullDisk(root, mounted)
    if not mounted:  # no tmpfs: the same fault, injected below the store
        opened = storage_module.Store.open.__func__

        def open_faulty(cls, data_dir):
            store = opened(cls, data_dir)
            if Path(data_dir).is_relative_to(root):
                store.db.conn = _FaultyConnection(store.db.conn, disk)
            return store

        monkeypatch.setattr(storage_module.Store, "open", classmethod(open_faulty))
    try:
        yield disk
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(root)], check=False)


async def test_a_full_disk_refuses_writes_retryably_and_loses_nothing(
        tmp_path: Path, ca: tuple[trustme.CA, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    with _small_disk(tmp_path, monkeypatch) as disk:
        async with two_daemons(tmp_path, ca, SCAIWAVE_DATA_DIR=str(disk.root / "data")) as (a, b):
            room, alice, bob = await peered_dm(a, b)
            path = f"/v1/rooms/{room}/messages"
            assert (await a.request("POST", path, {"body": "before"}, token=alice))[0] == 200
            disk.fill()
            # Users keep writing; each write is acknowledged (200) or refused
            # retryably, and the disk fills up for good within a few hundred.
            acknowledged, refused = ["before"], None
            for i in range(400):
                answer = await a.request("POST", path, {"body": f"m{i} " + "x" * 2000}, token=alice)
                if answer[0] == 200:
                    acknowledged.append(f"m{i} " + "x" * 2000)
                    continue
                refused = answer
                break
            assert refused is not None, "the full disk never refused a write"
            assert refused[0] == 503 and error_code(refused) == "storage_unavailable"
            # The daemon is still up: it answers reads, admin calls and peers.
            assert (await a.request("GET", "/healthz"))[0] == 200
            assert (await a.admin("GET", "/v1/admin/federation/peers"))[0] == 200
            # A federation path refuses in CBOR (peers read CBOR only), retryably.
            resp = await a.client.put(f"https://127.0.0.1:{a.port}{FED}/send/x", content=b"\xa0",
                                      headers={"host": a.server_name, "content-type": "application/cbor"},
                                      extensions={"sni_hostname": a.host})
            assert resp.headers["content-type"] == "application/cbor"
            assert resp.status_code >= 400 and cbor2.loads(resp.content)["error"]["code"]
            # Space returns: writes work again, the outbox catches up, nothing acknowledged is lost.
            disk.free()
            assert (await wait_for(lambda: _post(a, path, alice, "after")))[0] == 200
            acknowledged.append("after")

            async def all_there(server, token):
                status, body = await server.request("GET", path, token=token)
                bodies = [m["body"] for m in body["messages"]]
                return status == 200 and all(text in bodies for text in acknowledged)

            assert await all_there(a, alice)
            await wait_for(lambda: all_there(b, bob), timeout=20)


async def _post(server, path: str, token: str, text: str):
    answer = await server.request("POST", path, {"body": text}, token=token)
    return answer if answer[0] == 200 else None


def test_storage_faults_are_told_apart_from_other_sqlite_errors() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    assert storage_fault(full).code == "unavailable"
    assert storage_fault(OSError(28, "No space left on device")).code == "unavailable"
    syntax = sqlite3.OperationalError("near x: syntax error")
    syntax.sqlite_errorcode = sqlite3.SQLITE_ERROR
    assert storage_fault(syntax) is None
    assert storage_fault(ValueError("x")) is None


async def test_federation_paths_answer_every_failure_in_cbor(daemon, nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer reads CBOR only: a 500 (a bug) or a 503 (a full disk) on a
    federation path is CBOR too, so the peer sees the real code (not an
    unreadable body it would report as handshake_failed). Client paths stay JSON."""
    from scaiwave_federation.shell.runtime import daemon as daemon_module
    from scaiwave_federation.shell.store.schema import StorageError

    failures = iter([RuntimeError("a bug"), StorageError("unavailable", "disk full")])

    async def failing(service, request):
        raise next(failures)

    monkeypatch.setattr(daemon_module, "handle_federation", failing)
    fresh = InMemory(daemon.service, nursery)  # its handler reads the patched module
    for status, code in ((500, "internal_error"), (503, "storage_unavailable")):
        got, headers, body = await fresh.exchange("PUT", f"{FED}/send/t1", body=b"\xa0")
        assert got == status and headers["content-type"] == "application/cbor"
        assert cbor2.loads(body)["error"]["code"] == code
    # The HTTP layer's own 500 (the handler itself failing) on a federation path is CBOR as well.
    from scaiwave_federation.shell.http.server import Response

    answer = Response.error(500, "internal_error", "internal error", path=f"{FED}/send/x")
    assert answer.content_type == "application/cbor" and cbor2.loads(answer.body)["error"]["code"] == "internal_error"
    assert Response.error(500, "internal_error", "x", path="/v1/rooms").content_type == "application/json"


async def test_background_loops_start_over_after_a_storage_fault(daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """The outbox and the timers run through Service.keep_running: a full disk
    pauses the loop and starts it again; any other failure still surfaces."""
    from scaiwave_federation.shell.runtime import service as service_module
    from scaiwave_federation.shell.store.schema import StorageError

    monkeypatch.setattr(service_module, "STORAGE_RETRY_S", 0.01)
    runs = []

    async def loop() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise StorageError("unavailable", "disk full")
        if len(runs) == 2:  # the outbox's row was forgotten under it
            raise StorageError("not_found", "no outbox entry 7")

    await daemon.service.keep_running(loop)
    assert runs == [0, 1, 2]

    async def broken() -> None:
        raise StorageError("conflict", "a bug, not the disk")

    with pytest.raises(StorageError, match="a bug"):
        await daemon.service.keep_running(broken)


async def test_a_postgresql_server_gone_is_unavailable_then_reconnected(pg) -> None:
    """PostgreSQL's "full disk": the server drops our connection (a restart, a
    failover, an admin's pg_terminate_backend). The call in flight is refused
    retryably (``unavailable``: nothing of it was stored), and the next call
    connects again by itself, with everything acknowledged before still there."""
    import psycopg

    from scaiwave_federation.shell.store.async_store import AsyncStore
    from scaiwave_federation.shell.store.schema import StorageError

    url = pg.migrated()
    async with await AsyncStore.open(url) as astore:
        await astore.create_tenant("acme")
        pid = await astore.run(lambda s: s.db.execute("SELECT pg_backend_pid()").fetchone()[0])
        with psycopg.connect(url, autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0] is True
        with pytest.raises(StorageError) as info:
            await astore.create_tenant("globex")
        assert info.value.code == "unavailable"
        assert await astore.get_tenant("acme") == {"name": "acme", "federation_enabled": True}
        assert await astore.get_tenant("globex") is None
        assert await astore.run(lambda s: s.db.execute("SELECT pg_backend_pid()").fetchone()[0]) != pid
        assert await astore.probe_write(1) == "ok"


def test_postgresql_errors_are_told_apart() -> None:
    import psycopg

    assert storage_fault(psycopg.OperationalError("server closed the connection unexpectedly")).code == "unavailable"
    assert storage_fault(psycopg.errors.UniqueViolation("duplicate key")) is None
    assert storage_fault(psycopg.errors.SyntaxError("syntax error")) is None


async def test_a_daemon_on_postgresql_rides_out_a_dropped_connection(
        tmp_path: Path, ca: tuple[trustme.CA, Path], pg) -> None:
    """The daemon on PostgreSQL when the server drops its connection (a restart,
    a failover): a write in flight is refused retryably, the daemon reconnects
    by itself, and everything acknowledged reaches the peer."""
    import psycopg

    url = pg.fresh()
    async with two_daemons(tmp_path, ca, SCAIWAVE_DATABASE_URL=url) as (a, b):
        room, alice, bob = await peered_dm(a, b)
        path = f"/v1/rooms/{room}/messages"
        assert (await a.request("POST", path, {"body": "before"}, token=alice))[0] == 200
        database = url.split("?")[0].rsplit("/", 1)[1]
        with psycopg.connect(pg.url("postgres"), autocommit=True) as admin:
            killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                   " WHERE datname = %s", (database,)).fetchone()[0]
        assert killed == 1  # the daemon's one connection
        acknowledged = ["before"]
        for i in range(3):
            answer = await a.request("POST", path, {"body": f"after {i}"}, token=alice)
            assert answer[0] == 200 or (answer[0] == 503 and error_code(answer) == "storage_unavailable"), answer
            if answer[0] == 200:
                acknowledged.append(f"after {i}")
        assert acknowledged[-1] == "after 2"  # connected again by then

        async def delivered():
            status, body = await b.request("GET", path, token=bob)
            return status == 200 and all(text in [m["body"] for m in body["messages"]] for text in acknowledged)

        await wait_for(delivered, timeout=20)


async def test_a_local_invite_the_disk_refused_leaves_nothing_and_can_be_sent_again(
        daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local user's invite is one write: its event, the invitee's
    membership and the invite row. When the invite row cannot be written (a
    full disk), the inviter gets a retryable ``storage_unavailable`` and
    nothing of it stays; sent again, it reaches bob, who accepts. (The row
    was a write of its own: the event and the membership stayed, and bob was
    "invited" with no invite to accept.)"""
    from scaiwave_federation.shell.store.schema import StorageError
    from scaiwave_federation.shell.store.store import Store

    assert (await daemon.admin("POST", "/v1/admin/tenants", {"name": "acme"}))[0] == 200
    alice = (await daemon.admin("POST", "/v1/admin/users", {"name": "alice", "tenant": "acme"}))[1]["access_token"]
    bob = (await daemon.admin("POST", "/v1/admin/users", {"name": "bob", "tenant": "acme"}))[1]["access_token"]
    await daemon.admin("POST", "/v1/admin/federation/key/generate")
    room = (await daemon.request("POST", "/v1/rooms", {"room_type": "group"}, token=alice))[1]["room_id"]
    store = daemon.service.store

    async def state() -> tuple[int, list]:
        return (await store.head(room))["depth"], [m["user_id"] for m in await store.members(room)]

    before = await state()
    real = Store.save_invite

    def disk_full(self, *args, **kwargs):
        raise StorageError("unavailable", "disk full")

    monkeypatch.setattr(Store, "save_invite", disk_full)
    invite = ("POST", f"/v1/rooms/{room}/invite", {"user": "@bob:your-host.test"})
    status, body = await daemon.request(*invite, token=alice)
    assert status == 503 and body["error"]["code"] == "storage_unavailable", body
    assert await state() == before  # no event, no membership
    monkeypatch.setattr(Store, "save_invite", real)
    assert (await daemon.request(*invite, token=alice))[0] == 200
    notes = (await daemon.request("GET", "/v1/notifications", token=bob))[1]["notifications"]
    assert [(n["type"], n["room_id"]) for n in notes] == [("invite", room)]
    assert (await daemon.request("POST", f"/v1/invites/{room}/accept", token=bob))[0] == 200
