"""Workers: delivered messages per second with one worker vs two on one database.

``python -m bench.workers [--messages N] [--clients C] [--rounds R] [--backend postgresql|sqlite] [--postgres-url URL]``

your-host.test is served by ``scaiwave serve`` workers sharing one database
(by default a PostgreSQL 16 database on a private pgserver the bench starts;
``--backend sqlite``: one SQLite file in a shared data directory) behind a TCP pass-through that
spreads connections over them (``Testbed.add_workers``; TLS end to end);
peer-b.test and peer-c.test are one daemon each. alice0 and alice1 on
your-host.test each have a DM with a user of one peer; C clients post N
messages, half into each DM, through the pass-through. The figure is
delivered messages per second: N over the time from the first post until
both peers stored the last message.

1. **One worker** (the second is not running: the pass-through sends every
   connection to the first), then
2. **two workers** (both running: each delivers to one peer, ``core.leases``
   spreads them, and each takes half the posts),

``--rounds`` times (3), interleaved, the second worker stopped cleanly and
started again between them; the best round of each counts (the machine is
shared: a round that another process slowed down says nothing about the
workers).

Target, on PostgreSQL (the backend workers are for): two workers deliver
>= 1.0x what one does (never less). Why this target: a post is mostly
Python on one core (TLS, HTTP, signing, the event chain; one process holds
the GIL), so a second worker can use the second core; but on this 2-core
machine the two peers, PostgreSQL and the load generator share those cores,
so the figure swings with the machine's load. What must hold on any machine
is that the sharing (leases, the outbox look, the shared writer lock, the
rows handed over by a look, peers handed over when the second worker
starts) costs less than the second worker brings. With ``--backend sqlite``
the ratio is printed, not held to the target: two processes writing one
SQLite file wait for its lock by sleeping and polling (SQLite's busy
handler: 1, 2, 5, 10 ms...), so two workers on one file deliver less than
one (0.65 to 0.77 measured); on one machine, one worker on SQLite is the
faster choice, and workers are for PostgreSQL.
And per-peer order must hold throughout: the peers refuse no event as
``chain_broken`` (read in the transaction replies they stored).
Prints the figures, the ratio and PASS/FAIL; exits 1 on a miss.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.federation import cpu_seconds, stored_messages
from bench.httpload import Conn
from scaiwave_federation.shell.demo.testbed import Server, Testbed, wait_until
from scaiwave_federation.shell.store.store import Store

TARGET = 1.0


def holders(front: Server, database: str | Path) -> dict[str, str]:
    """Who delivers to which peer, read in the workers' shared database."""
    with Store.open(database) as store:
        return {r["name"]: r["owner"] for r in store.lease_rows() if r["name"].startswith("peer:")}


def order_breaks(peer: Server) -> int:
    """Events the peer refused as ``chain_broken`` (sent ahead of an earlier
    one of their room). Per-peer order holds when this stays 0 (a peer heals
    a break by catching up, so the message count alone would not show it)."""
    return peer.refused_events("chain_broken")


def setup(front: Server, peers: list[Server]) -> list[tuple[str, dict, Server]]:
    """Keys, policies, peering, and a DM from aliceN on the front to a user of each peer."""
    def ok(server: Server, method: str, path: str, body=None, token: str | None = None) -> dict:
        status, answer = server.request(method, path, body, token=token or server.admin_token)
        if status != 200:
            raise SystemExit(f"{server.server_name}: {method} {path}: {status} {answer}")
        return answer

    ok(front, "POST", "/v1/admin/federation/key/generate")
    ok(front, "PUT", "/v1/admin/federation/policy",
       {"default_mode": "invite_only", "allowed_peers": [p.server_name for p in peers], "blocked_peers": []})
    ok(front, "POST", "/v1/admin/tenants", {"name": "acme"})
    dms = []
    for n, peer in enumerate(peers):
        ok(peer, "POST", "/v1/admin/federation/key/generate")
        ok(peer, "PUT", "/v1/admin/federation/policy",
           {"default_mode": "invite_only", "allowed_peers": [front.server_name], "blocked_peers": []})
        ok(peer, "POST", "/v1/admin/tenants", {"name": "acme"})
        ok(front, "POST", f"/v1/admin/federation/peers/{peer.server_name}/handshake")
        alice = ok(front, "POST", "/v1/admin/users", {"name": f"alice{n}", "tenant": "acme"})
        bob = ok(peer, "POST", "/v1/admin/users", {"name": f"bob{n}", "tenant": "acme"})
        dm = ok(front, "POST", "/v1/dms", {"to": bob["user_id"]}, alice["access_token"])
        ok(peer, "POST", f"/v1/invites/{dm['room_id']}/accept", token=bob["access_token"])
        dms.append((dm["room_id"], alice, peer))
    return dms


def deliver(front: Server, dms: list[tuple[str, dict, Server]], messages: int, clients: int, tag: str,
            workers: list[Server] | None = None) -> tuple[float, float]:
    """Post ``messages`` (half into each DM) from ``clients`` connections through
    the pass-through; delivered messages per second, and the CPU the running
    ``workers`` spent per message (ms, all of them together)."""
    running = [w.proc.pid for w in workers or [] if w.proc is not None]
    cpu_before = sum(cpu_seconds(pid) for pid in running)
    before = {room: stored_messages(peer, room) for room, _alice, peer in dms}
    jobs = [(dms[n % len(dms)], f"{tag} {n}") for n in range(messages)]
    chunks = [jobs[i::clients] for i in range(clients)]

    def run(chunk) -> None:
        conn = Conn(front.port, front.name, str(front.ca_path))
        try:
            for (room, alice, _peer), text in chunk:
                status, body = conn.request("POST", f"/v1/rooms/{room}/messages", {"body": text},
                                            token=alice["access_token"])
                if status != 200:
                    raise RuntimeError(f"post: HTTP {status} {body[:200]!r}")
        finally:
            conn.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(run, chunk) for chunk in chunks]:
            future.result()
    share = {room: len([j for j in jobs if j[0][0] == room]) for room, _a, _p in dms}
    wait_until(lambda: all(stored_messages(peer, room) >= before[room] + share[room] for room, _a, peer in dms),
               timeout=120, interval=0.005)
    rate = messages / (time.perf_counter() - started)
    return rate, (sum(cpu_seconds(pid) for pid in running) - cpu_before) * 1000 / messages


def settle(front: Server, dms: list[tuple[str, dict, Server]], database: str | Path, clients: int, *,
           owners: int) -> dict[str, str]:
    """Post until the peers' deliveries are held by ``owners`` workers: leases
    follow traffic (a peer with nothing queued is nobody's business), and a
    worker that starts takes its share within a few lease renewals."""
    spread: dict[str, str] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        deliver(front, dms, 50, clients, "warm-up")
        spread = holders(front, database)
        if len(spread) == len(dms) and len(set(spread.values())) == owners:
            return spread
    raise SystemExit(f"the peers' deliveries were not held by {owners} worker(s) in 60 s: {spread}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each, interleaved; the best of each counts")
    parser.add_argument("--backend", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--postgres-url", help="an empty PostgreSQL database (default: a private pgserver)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="scaiwave-bench-workers-", dir="/tmp"))
    server = None
    url = args.postgres_url
    if args.backend == "postgresql" and url is None:
        import pgserver  # the test extra: PostgreSQL 16 in a wheel

        server = pgserver.get_server(root / "pg", cleanup_mode="stop")
        server.psql("CREATE DATABASE workers;")
        url = server.get_uri("workers")
    bed = Testbed(root)
    front, workers = bed.add_workers("your-host.test", 2,
                                     database={"SCAIWAVE_DATABASE_URL": url} if args.backend == "postgresql" else None)
    database: str | Path = url if args.backend == "postgresql" and url else front.root / "data"
    peers = [bed.add("peer-b.test"), bed.add("peer-c.test")]
    ones: list[tuple[float, float]] = []
    twos: list[tuple[float, float]] = []
    try:
        for peer in peers:
            peer.start()
        workers[0].start()
        front.passthrough.start()
        dms = setup(front, peers)
        deliver(front, dms, 100, args.clients, "warm-up")
        breaks_one = breaks = 0
        for n in range(args.rounds):
            # One worker: the second stopped (cleanly: its peers go back to the first).
            if n:
                workers[1].stop()
                spread = settle(front, dms, database, args.clients, owners=1)
            before = sum(order_breaks(peer) for peer in peers)
            ones.append(deliver(front, dms, args.messages, args.clients, f"one {n}", workers))
            breaks_one += sum(order_breaks(peer) for peer in peers) - before
            # Two workers: both running, each delivering to one peer.
            workers[1].start()
            spread = settle(front, dms, database, args.clients, owners=2)
            before = sum(order_breaks(peer) for peer in peers)
            twos.append(deliver(front, dms, args.messages, args.clients, f"two {n}", workers))
            breaks += sum(order_breaks(peer) for peer in peers) - before
    finally:
        bed.stop()
        if server is not None:
            server.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    (one, cpu_one), (two, cpu_two) = max(ones), max(twos)
    print("rounds, one worker / two workers: "
          + ", ".join(f"{o:.0f}/s ({co:.2f} ms) / {t:.0f}/s ({ct:.2f} ms)" for (o, co), (t, ct) in zip(ones, twos)))
    ratio = two / one
    print(f"delivered messages/s, {args.messages} messages, {args.clients} clients, 2 peers, {args.backend}:")
    print(f"  one worker  {one:8.0f}/s   CPU {cpu_one:.2f} ms per message")
    print(f"  two workers {two:8.0f}/s   CPU {cpu_two:.2f} ms per message, both together"
          f" (delivery: {', '.join(sorted(k[5:] for k in spread))} on two workers)")
    print(f"  CPU per message, two workers together vs one: {cpu_two / cpu_one:.2f}x (what the sharing costs in"
          " work; not a target: it swings with the machine's load too)")
    if args.backend == "postgresql":
        ok = ratio >= TARGET
        print(f"  two / one = {ratio:.2f} (target >= {TARGET}): {'PASS' if ok else 'FAIL'}")
    else:
        ok = True
        print(f"  two / one = {ratio:.2f} (no target on SQLite: its lock is polled by sleeping; see the module doc)")
    in_order = breaks == breaks_one == 0
    print(f"  events the peers refused as chain_broken: {breaks_one} with one worker, {breaks} with two"
          f" (target 0: per-peer order): {'PASS' if in_order else 'FAIL'}")
    ok = ok and in_order
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
