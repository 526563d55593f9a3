"""Federation end to end: two real daemons over TLS on loopback, each figure a
ratio against a baseline measured in the same run.

``python -m bench.federation [--messages N] [--clients C] [--rounds R] [--profile DIR]``

It starts your-host.test and peer.test (``scaiwave serve`` processes, one
trustme CA, SCAIWAVE_RESOLVE), peers them, opens a DM alice -> bob, and
measures:

1. **CPU per delivered DM message**, each side: C clients post N messages
   into the DM on your-host.test (the room's host), which delivers them to
   peer.test. The CPU time (user + system, from /proc) each daemon spent from
   the first post until peer.test stored the last message, divided by N.
   The sender's figure includes the client POSTs. Target: <= 1 ms each.
2. **Delivered messages/s vs local posts/s**: the same C clients post N
   messages into a room with no remote member (the local rate), then N into
   the DM; delivered/s is N over the time until peer.test stored the last one.
   R rounds, each a local phase then a DM phase; the best of each counts
   (row 1: the median round's CPU). Target: >= 0.9 (delivery keeps up with posting).
3. **``GET /.well-known/scaiwave`` through the daemon vs bare trio + h11 with
   TLS** (``bench.httpload``: the same body, the same certificate, the same
   load generator in its own process), best of R rounds each, interleaved.
   Target: >= 0.9.
4. **Admin backfill of 1,000 events over TLS vs verifying and storing them in
   process**: your-host.test hosts a group room with 1,000 messages; bob joins;
   peer.test's admin pulls 1,000 events (``wait``: the call returns when the
   job is done), best of R (peer.test forgets them in between). The baseline
   is the same pull in this process: the core's puller over the same pages,
   signatures on a thread pool as in the daemon, each page stored in a real
   SQLite file with the same durability; best of R too, the rounds
   interleaved with the pulls over TLS (a drift in the machine's load then
   falls on both alike).
   Target: <= 1.5x (aim 1.2x).

Prints PASS/FAIL per target; exits 1 if one is missed. ``--profile DIR`` runs
both daemons under cProfile and writes their profiles
there (the figures are then not comparable).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.backfill_local import verify_and_store
from bench.httpload import Conn
from scaiwave_federation.shell.demo.testbed import Server, Testbed, free_port, peered_dm, wait_until

CPU_TARGET_MS = 1.0
KEEP_UP_TARGET = 0.9
HTTP_TARGET = 0.9
BACKFILL_TARGET = 1.5
BACKFILL_AIM = 1.2
BACKFILL_EVENTS = 1000


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stored_messages(server: Server, room: str) -> int:
    """Messages of ``room`` in the server's SQLite file (read-only, not through the daemon)."""
    db = sqlite3.connect(f"file:{server.root / 'data' / 'scaiwave.db'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT count(*) FROM events WHERE room_id = ? AND type = 'm.message'", (room,)).fetchone()[0]
    finally:
        db.close()


def transactions(server: Server) -> int:
    """Transactions the server has stored a reply to (one per transaction received)."""
    db = sqlite3.connect(f"file:{server.root / 'data' / 'scaiwave.db'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT count(*) FROM txns").fetchone()[0]
    finally:
        db.close()


def post_all(server: Server, token: str, room: str, texts: list[str], clients: int) -> float:
    """Post ``texts`` into ``room`` from ``clients`` keep-alive connections; the seconds it took."""
    conns = [Conn(server.port, server.name, str(server.ca_path)) for _ in range(clients)]
    chunks = [texts[i::clients] for i in range(clients)]

    def run(conn: Conn, chunk: list[str]) -> None:
        for text in chunk:
            status, body = conn.request("POST", f"/v1/rooms/{room}/messages", {"body": text}, token=token)
            if status != 200:
                raise RuntimeError(f"post: HTTP {status} {body[:200]!r}")

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(run, c, chunk) for c, chunk in zip(conns, chunks)]:
            future.result()
    seconds = time.perf_counter() - started
    for conn in conns:
        conn.close()
    return seconds


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def measure_delivery(a: Server, b: Server, dm: str, alice: dict, messages: int, clients: int,
                     rounds: int) -> dict:
    """``rounds`` rounds, each a local phase then a DM phase of ``messages``
    posts: the best local rate against the best delivered rate (a round that
    another process slowed says nothing of the daemon; one round alone read
    1.00 once, with its local phase slowed); CPU per message, the median
    round's."""
    token = alice["access_token"]
    status, body = a.request("POST", "/v1/rooms", {"room_type": "group"}, token=token)
    assert status == 200, body
    alone = body["room_id"]
    post_all(a, token, alone, [f"warm-up {n}" for n in range(50)], clients)
    runs = [_delivery_round(a, b, dm, alone, token, messages, clients, n) for n in range(rounds)]
    best = max(runs, key=lambda r: r["delivered_rate"])
    median = sorted(runs, key=lambda r: r["cpu_sender_ms"])[len(runs) // 2]
    return {"local_rate": max(r["local_rate"] for r in runs), "post_rate": best["post_rate"],
            "delivered_rate": best["delivered_rate"], "cpu_local_ms": median["cpu_local_ms"],
            "cpu_sender_ms": median["cpu_sender_ms"], "cpu_receiver_ms": median["cpu_receiver_ms"],
            "transactions": median["transactions"]}


def _delivery_round(a: Server, b: Server, dm: str, alone: str, token: str, messages: int, clients: int,
                    n: int) -> dict:
    cpu_local = cpu_seconds(a.proc.pid)
    local_s = post_all(a, token, alone, [f"local {n}.{i}" for i in range(messages)], clients)
    cpu_local = cpu_seconds(a.proc.pid) - cpu_local
    before, txns = stored_messages(b, dm), transactions(b)
    cpu_a, cpu_b = cpu_seconds(a.proc.pid), cpu_seconds(b.proc.pid)
    started = time.perf_counter()
    post_s = post_all(a, token, dm, [f"dm {n}.{i}" for i in range(messages)], clients)
    # Only now is peer.test watched: the last message cannot be stored there
    # before it was posted. (Watching all along, a thread of this process
    # opened peer.test's database and counted its messages every 5 ms while
    # the clients posted, sharing their interpreter lock in the DM phase only:
    # that slowed the DM's posts against the local ones it is compared to.)
    deadline, arrived = started + 60, None
    while arrived is None and time.perf_counter() < deadline:
        if stored_messages(b, dm) >= before + messages:
            arrived = time.perf_counter()
        else:
            time.sleep(0.002)
    if arrived is None:
        raise SystemExit(f"peer.test stored {stored_messages(b, dm) - before} of {messages} messages in 60 s")
    delivered_s = arrived - started
    used_a, used_b = cpu_seconds(a.proc.pid) - cpu_a, cpu_seconds(b.proc.pid) - cpu_b
    return {"cpu_local_ms": cpu_local / messages * 1000, "transactions": transactions(b) - txns,
            "local_rate": messages / local_s, "post_rate": messages / post_s, "delivered_rate": messages / delivered_s,
            "cpu_sender_ms": used_a / messages * 1000, "cpu_receiver_ms": used_b / messages * 1000}


def measure_http(a: Server, rounds: int, requests: int, connections: int = 4) -> dict:
    """The daemon's descriptor against a bare trio + h11 server with the same bytes."""
    conn = Conn(a.port, a.name, str(a.ca_path))
    status, document = conn.request("GET", "/.well-known/scaiwave")
    conn.close()
    assert status == 200
    body_file = a.root / "bare-body.json"
    body_file.write_bytes(document)  # the same bytes
    port = free_port()
    bare = subprocess.Popen([sys.executable, "-m", "bench.httpload", "serve", str(a.root / "cert.pem"),
                             str(a.root / "key.pem"), str(port), str(body_file)])
    try:
        wait_until(lambda: _connects(port), timeout=10)

        def load(target_port: int) -> float:
            out = subprocess.run([sys.executable, "-m", "bench.httpload", "load", "127.0.0.1", str(target_port),
                                  a.name, "/.well-known/scaiwave", str(connections), str(requests),
                                  str(a.ca_path)], capture_output=True, text=True, check=True)
            return json.loads(out.stdout)["rps"]

        load(port), load(a.port)  # warm-up
        best_bare = best_daemon = 0.0
        for _ in range(rounds):
            best_bare = max(best_bare, load(port))
            best_daemon = max(best_daemon, load(a.port))
    finally:
        bare.terminate()
        bare.wait(10)
    return {"bare_rps": best_bare, "daemon_rps": best_daemon}


def _connects(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def forget_history(server: Server, room: str) -> None:
    """Delete the server's events of ``room`` below the one it joined with, and its
    backfill cursor (the daemon keeps no cache of either), so a pull can run again."""
    db = sqlite3.connect(server.root / "data" / "scaiwave.db", timeout=10)
    try:
        with db:
            lowest = db.execute("SELECT max(depth) FROM events WHERE room_id = ?", (room,)).fetchone()[0]
            db.execute("DELETE FROM events WHERE room_id = ? AND depth < ?", (room, lowest))
            db.execute("DELETE FROM proposals WHERE room_id = ? AND event_id NOT IN"
                       " (SELECT event_id FROM events WHERE room_id = ?)", (room, room))
            db.execute("DELETE FROM backfill_cursors WHERE room_id = ?", (room,))
    finally:
        db.close()


def measure_backfill(a: Server, b: Server, alice: dict, bob: dict, clients: int, rounds: int) -> dict:
    token = alice["access_token"]
    status, body = a.request("POST", "/v1/rooms", {"room_type": "group"}, token=token)
    room = body["room_id"]
    post_all(a, token, room, [f"history {n}" for n in range(BACKFILL_EVENTS)], clients)
    assert a.request("POST", f"/v1/rooms/{room}/invite", {"user": bob["user_id"]}, token=token)[0] == 200
    assert b.request("POST", f"/v1/invites/{room}/accept", token=bob["access_token"])[0] == 200
    conn = Conn(a.port, a.name, str(a.ca_path))
    descriptor = conn.request("GET", "/.well-known/scaiwave")[1]
    conn.close()
    over_tls = in_process = float("inf")
    # Best of R each, the rounds interleaved (one pull over TLS, then one in
    # process), as for the HTTP figure: when the machine's other jobs come
    # and go, R pulls over TLS and then R in process could each fall in a
    # busy or a quiet spell (runs ranged 0.95x to 2.09x with the rounds in
    # two blocks). peer.test forgets the pulled events in between.
    for _ in range(rounds):
        forget_history(b, room)
        started = time.perf_counter()
        status, job = b.admin("POST", f"/v1/admin/federation/rooms/{room}/backfill",
                              {"peer": a.server_name, "limit": BACKFILL_EVENTS, "wait": True})
        over_tls = min(over_tls, time.perf_counter() - started)
        if status != 200 or job.get("state") != "done" or job.get("stored") != BACKFILL_EVENTS:
            raise SystemExit(f"backfill: {status} {job}")
        now = time.time_ns() // 1_000_000
        in_process = min(in_process, verify_and_store(a.root / "data" / "scaiwave.db", room, a.server_name,
                                                      descriptor, BACKFILL_EVENTS, now))
    return {"over_tls_ms": over_tls * 1000, "in_process_ms": in_process * 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.federation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1500, help="DM messages (default 1500)")
    parser.add_argument("--clients", type=int, default=4, help="posting clients at once (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each measure (default 3)")
    parser.add_argument("--requests", type=int, default=3000, help="GETs per HTTP round (default 3000)")
    parser.add_argument("--profile", type=Path, help="run the daemons under cProfile, profiles into DIR")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="scaiwave-bench-"))
    tb = Testbed(root)
    # Default settings: access lines are written (held 100 ms, then written together), durability is
    # synchronous=FULL.
    a = tb.add("your-host.test")
    b = tb.add("peer.test")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        a.python_args = ["-m", "cProfile", "-o", str(args.profile.resolve() / "sender.prof")]
        b.python_args = ["-m", "cProfile", "-o", str(args.profile.resolve() / "receiver.prof")]
    failed = False
    try:
        a.start()
        b.start()
        dm, alice, bob = peered_dm(a, b)
        print(f"two daemons on loopback over TLS; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}")

        d = measure_delivery(a, b, dm, alice, args.messages, args.clients, args.rounds)
        ok_cpu = d["cpu_sender_ms"] <= CPU_TARGET_MS and d["cpu_receiver_ms"] <= CPU_TARGET_MS
        print(f"CPU per delivered DM message ({args.messages} messages, {args.clients} clients): "
              f"sender {d['cpu_sender_ms']:.2f} ms (client POST included), receiver {d['cpu_receiver_ms']:.2f} ms "
              f"(target <= {CPU_TARGET_MS:g} ms each) {verdict(ok_cpu)}")
        print(f"  in {d['transactions']} transactions ({args.messages / max(1, d['transactions']):.1f} events each); "
              f"a local post alone costs the sender {d['cpu_local_ms']:.2f} ms")
        keep_up = d["delivered_rate"] / d["local_rate"]
        print(f"delivered {d['delivered_rate']:.0f} msg/s (posted {d['post_rate']:.0f}/s) vs local posts "
              f"{d['local_rate']:.0f} msg/s: {keep_up:.2f} (target >= {KEEP_UP_TARGET}) "
              f"{verdict(keep_up >= KEEP_UP_TARGET)}")
        print(f"  of which: the same clients posted into the DM at {d['post_rate'] / d['local_rate']:.2f} of the local "
              f"rate (what queueing a post for a peer costs the sender), and peer.test had stored the last message "
              f"at {d['delivered_rate'] / d['post_rate']:.2f} of the DM's post rate (delivery behind posting)")
        failed = not ok_cpu or keep_up < KEEP_UP_TARGET

        h = measure_http(a, args.rounds, args.requests)
        http_ratio = h["daemon_rps"] / h["bare_rps"]
        print(f"GET /.well-known/scaiwave: daemon {h['daemon_rps']:.0f}/s vs bare trio+h11+TLS "
              f"{h['bare_rps']:.0f}/s: {http_ratio:.2f} (target >= {HTTP_TARGET}) {verdict(http_ratio >= HTTP_TARGET)}")
        failed = failed or http_ratio < HTTP_TARGET

        f = measure_backfill(a, b, alice, bob, args.clients, args.rounds)
        ratio = f["over_tls_ms"] / f["in_process_ms"]
        print(f"admin backfill of {BACKFILL_EVENTS} events over TLS {f['over_tls_ms']:.0f} ms vs verify-and-store "
              f"in process {f['in_process_ms']:.0f} ms: {ratio:.2f}x (target <= {BACKFILL_TARGET}x, aim "
              f"{BACKFILL_AIM}x) {verdict(ratio <= BACKFILL_TARGET)}")
        failed = failed or ratio > BACKFILL_TARGET
    finally:
        tb.stop()
        if not args.profile:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
