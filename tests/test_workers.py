"""Workers with real processes: two ``scaiwave serve`` behind one name, one peer.

``a.test`` is two worker processes on one database behind a TCP pass-through
(TLS end to end; the pass-through spreads connections over both), ``b.test``
one daemon. While alice (on a) and bob (on b) each send their messages into
one room hosted on a, the worker that delivers to b is killed (SIGKILL)
mid-stream: every message ends up on both servers exactly once, each
sender's in the order sent, and b is never sent an event of a room ahead of
an earlier one (it refuses none as ``chain_broken``). Then, with the killed worker restarted: a signed
request replayed to the other worker is refused as on one worker, and a key
rotated on one worker is served by the other at once.

The test runs on each backend (the ``backend`` fixture): the workers share
one PostgreSQL database (the test run's real server, ``SCAIWAVE_DATABASE_URL``
given to both), and one SQLite file in a shared data directory.
"""

from __future__ import annotations

import signal
import ssl
import threading
import time
from pathlib import Path

import cbor2
import httpx

from scaiwave_federation.core import sign_request
from scaiwave_federation.core.keys import SigningKey
from scaiwave_federation.shell.demo.testbed import Server, Testbed, peered_dm, wait_until
from scaiwave_federation.shell.store.store import Store

#: Messages in all: 1,000 each way, from PAIRS senders on each side (each
#: pair in a DM hosted on a), so the test is not bound by one sender's round trips.
MESSAGES = 2000
PAIRS = 8
PER_SENDER = MESSAGES // (2 * PAIRS)
#: Short leases so that the killed worker's peer is taken over quickly.
LEASE = "1500ms"


def _database(backend: str, request) -> dict[str, str] | None:
    """What the workers share: a fresh PostgreSQL database, or (None) one SQLite file."""
    return {"SCAIWAVE_DATABASE_URL": request.getfixturevalue("pg").fresh()} if backend == "postgresql" else None


def _send_all(servers: list[Server], token: str, room_id: str, sender: str, failures: list[str]) -> None:
    """Send PER_SENDER messages in order, alternating between ``servers``
    (connections), each retried with the same txn id until answered: a worker
    killed under a request costs a retry, never a message."""
    for n in range(PER_SENDER):
        server = servers[n % len(servers)]
        last: object = None
        for attempt in range(50):
            if attempt:
                time.sleep(min(0.02 * attempt, 0.5))  # back off, as a client should (a loaded machine)
            try:
                status, answer = server.request("PUT", f"/v1/rooms/{room_id}/send/{sender}-{n}",
                                                {"body": f"{sender} {n}"}, token=token)
            except httpx.HTTPError as exc:
                last = exc
                server._http = None  # a fresh connection: the pass-through picks a live worker
                continue
            last = (status, answer)
            if status == 200:
                break
            if status == 429:  # rate_limited: retry later, as a client should
                continue
            if status not in (409, 500, 502, 503, 504):
                failures.append(f"{sender} {n}: {status} {answer}")
                return
        else:
            failures.append(f"{sender} {n}: no answer in 50 tries, the last: {last!r:.300}")
            return


def _dm(a: Server, b: Server, n: int) -> tuple[str, dict, dict]:
    """Another pair of users (on ``a`` and ``b``, already peered) and their DM."""
    alice = a.admin("POST", "/v1/admin/users", {"name": f"alice{n}", "tenant": "acme"})[1]
    bob = b.admin("POST", "/v1/admin/users", {"name": f"bob{n}", "tenant": "acme"})[1]
    status, dm = a.request("POST", "/v1/dms", {"to": bob["user_id"]}, token=alice["access_token"])
    assert status == 200, dm
    status, answer = b.request("POST", f"/v1/invites/{dm['room_id']}/accept", token=bob["access_token"])
    assert status == 200, answer
    return dm["room_id"], alice, bob


def _connection(front: Server) -> Server:
    """Another keep-alive connection to ``front`` (the pass-through gives it a worker)."""
    return Server(name=front.name, port=front.port, root=front.root, ca_path=front.ca_path,
                  admin_token=front.admin_token)


def _bodies(server: Server, token: str, room_id: str) -> list[str]:
    status, answer = server.request("GET", f"/v1/rooms/{room_id}/messages", token=token)
    assert status == 200, answer
    return [m["body"] for m in answer["messages"]]


def _deliverer(front: Server, workers: list[Server], peer: str, database: dict[str, str] | None) -> Server:
    """The worker holding the lease of delivery to ``peer`` (read in the shared database)."""
    def holder():
        with Store.open((database or {}).get("SCAIWAVE_DATABASE_URL") or front.root / "data") as store:
            rows = [r for r in store.lease_rows() if r["name"] == f"peer:{peer}"]
        return rows[0]["owner"] if rows else None
    owner = wait_until(holder, timeout=20)
    pid = int(owner.split(":")[1])
    return next(w for w in workers if w.proc is not None and w.proc.pid == pid)


def _direct(worker: Server, ca: Path, method: str, target: str, headers: dict[str, str]) -> httpx.Response:
    ctx = ssl.create_default_context(cafile=str(ca))
    with httpx.Client(verify=ctx, trust_env=False, timeout=30) as client:
        return client.request(method, f"https://127.0.0.1:{worker.port}{target}",
                              headers={"host": worker.server_name, **headers},
                              extensions={"sni_hostname": worker.name})


def test_two_workers_one_name(tmp_path: Path, backend: str, request) -> None:
    database = _database(backend, request)
    bed = Testbed(tmp_path)
    # bob's eight senders make b send proposals faster than the default
    # per-origin rate (50 a second): not what this test is about.
    env = {"SCAIWAVE_LEASE": LEASE, "SCAIWAVE_FEDERATION_RATE": "1000", "SCAIWAVE_FEDERATION_BURST": "2000"}
    front, workers = bed.add_workers("a.test", 2, database=database, extra=env)
    b = bed.add("b.test", extra=env)
    try:
        b.start()
        for worker in workers:
            worker.start()
        front.passthrough.start()
        pairs = [peered_dm(front, b)] + [_dm(front, b, n) for n in range(1, PAIRS)]
        failures: list[str] = []
        threads = []
        for n, (room_id, alice, bob) in enumerate(pairs):
            # alice on two connections (so on both workers), bob on b.
            threads.append(threading.Thread(target=_send_all, args=(
                [_connection(front), _connection(front)], alice["access_token"], room_id, f"alice{n}", failures)))
            threads.append(threading.Thread(target=_send_all, args=(
                [_connection(b)], bob["access_token"], room_id, f"bob{n}", failures)))
        victim = _deliverer(front, workers, b.server_name, database)
        for thread in threads:
            thread.start()
        # Mid-stream: kill the worker that delivers to b.
        room_id, alice, bob = pairs[0]
        wait_until(lambda: len(_bodies(b, bob["access_token"], room_id)) >= PER_SENDER, timeout=60, interval=0.05)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        victim.proc = None
        at_kill = sum(len(_bodies(b, bob["access_token"], room_id)) for room_id, _alice, bob in pairs)
        assert at_kill < MESSAGES  # killed mid-stream, not after
        for thread in threads:
            thread.join(timeout=120)
        assert failures == []
        survivor = next(w for w in workers if w is not victim)
        for n, (room_id, alice, bob) in enumerate(pairs):
            for server, token in ((survivor, alice["access_token"]), (b, bob["access_token"])):
                bodies = wait_until(lambda server=server, token=token, room_id=room_id: (
                    lambda got: got if len(got) >= 2 * PER_SENDER else None)(_bodies(server, token, room_id)),
                    timeout=60)
                # 0 lost, 0 duplicated, each sender's order kept.
                for sender in (f"alice{n}", f"bob{n}"):
                    sent = [f"{sender} {k}" for k in range(PER_SENDER)]
                    assert [x for x in bodies if x.startswith(sender + " ")] == sent, (server.server_name, sender)
                assert len(bodies) == 2 * PER_SENDER
        # ... and b was sent each room's events in order, across both
        # workers and the failover: none refused as sent ahead of an earlier one.
        assert b.refused_events("chain_broken") == 0
        # The survivor took b over once the killed worker's lease expired.
        assert _deliverer(front, workers, b.server_name, database) is survivor

        # The killed worker comes back (a new worker): the replay window is shared.
        victim.start()
        key = _b_key(b)
        target = f"/_scaiwave/federation/v1/rooms/{room_id}/backfill?limit=1"
        auth = sign_request(key, origin=b.server_name, destination=front.server_name, method="GET",
                            target=target, body=b"", now=_now())
        first = _direct(victim, front.ca_path, "GET", target, {"authorization": auth})
        assert first.status_code == 200, first.content
        again = _direct(survivor, front.ca_path, "GET", target, {"authorization": auth})
        assert again.status_code == 409 and cbor2.loads(again.content)["error"]["code"] == "replayed_request"
        same = _direct(victim, front.ca_path, "GET", target, {"authorization": auth})  # as on one worker
        assert same.status_code == 409 and cbor2.loads(same.content)["error"]["code"] == "replayed_request"

        # A key rotated on one worker is served by the other at once.
        status, rotated = survivor.admin("POST", "/v1/admin/federation/key/rotate")
        assert status == 200, rotated
        assert victim.get("/.well-known/scaiwave")["key_id"] == rotated["key_id"]
        assert victim.admin("GET", "/v1/admin/federation/key")[1]["key_id"] == rotated["key_id"]
    finally:
        bed.stop()


def _b_key(b: Server) -> SigningKey:
    with Store.open(b.root / "data") as store:
        current, _old = store.load_keyring()
    return SigningKey.from_seed(current["seed"], current["created_at"])


def _now() -> int:
    return time.time_ns() // 1_000_000
