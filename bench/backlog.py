"""Peers that have been down for long: what do their backlogs cost the sender?

``python -m bench.backlog [--big N] [--small N] [--peers P] [--rounds R] [--idle S]``

A real daemon (TLS, SQLite, its lease loop) starts with posts queued in its
outbox for peers that are down (their addresses refuse connections), as
after a restart during a long outage in busy rooms: each peer's oldest post
has failed 4 times already. It takes the peers, tries them, backs off, and
sits idle. Three backlogs, interleaved round by round (best round of each):

- **small**: ``--small`` (1,000) posts for one peer, the baseline;
- **one**: ``--big`` (100,000) posts for one peer;
- **many**: ``--big`` posts spread over ``--peers`` (100) peers.

Measured for each: (a) the daemon's resident memory once it took the peers;
(b) the CPU it uses over ``--idle`` (7) seconds, from 3 s after that (its
first looks read the outbox's ids once, in chunks of 5,000: about 0.25 s of
CPU for 100,000, once), which include two lease renewals and their resyncs.

Then (c) **posting beside a backlog**: your-host.test has a DM with far.test
and one with near.test; both go down, and your-host.test restarts with
``--big`` posts queued for far.test and ``--small`` for near.test. The same
clients (``--clients``, 4) post ``--posts`` (1,500) messages into the DM
with near.test, then as many into the one with far.test, round by round
(best round of each): the same path, only the backlog differs.

Targets, one and many against small: (a) <= 1.25x, (b) <= 2.0x; (c) the
post rate beside the big backlog >= 0.9 of the rate beside the small one. The
backlogs wait in the outbox table; the delivery machine holds a window of
each peer's queue (``core.delivery.WINDOW_EVENTS``), one batch of a peer
that keeps failing (``SHED_FAILURES``). Before the window every queued post
was held in memory (221 MB against 74 for one peer's 100,000) and every
resync read all of their outbox ids; until the fix that (c) came with,
every post into a room shared with a peer behind its window read all of
that peer's queued ids (33 posts/s beside 100,000 queued, 1,850 into a
room of its own).
Prints PASS/FAIL per target; exits 1 on a miss.

The posts are written into the outbox table directly, while the daemon is
stopped (a queued post's row as the daemon writes it: one event's body),
so that 100,000 of them take a second, not the minutes of posting them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from scaiwave_federation.core import encode_events_body
from scaiwave_federation.shell.demo.testbed import Server, Testbed, free_port, peered_dms
from scaiwave_federation.shell.store.sqlite_store import SqliteStore

from bench.federation import cpu_seconds, post_all, verdict

MEMORY_TARGET = 1.25
CPU_TARGET = 2.0
POSTING_TARGET = 0.9
ENVELOPE = bytes(range(256)) + bytes(144)  # 400 bytes, as a short message's envelope
NOW = 1_764_000_000_000


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def queue_backlog(server: Server, peers: list[str], posts: int) -> None:
    """``posts`` outbox rows, spread over ``peers``, in the stopped daemon's
    database (through its store, as the daemon queues them); each peer's
    first has failed 4 times (a restart during an outage)."""
    body = encode_events_body([ENVELOPE])
    path = "/_scaiwave/federation/v1/send"
    with SqliteStore.open(server.root / "data") as store:
        ids = store.enqueue_many([(peers[n % len(peers)], f"backlog-{peers[n % len(peers)]}-{n}", path, body)
                                  for n in range(posts)], NOW)
        for head in ids[:len(peers)]:
            for _ in range(4):
                store.mark_attempt(head, NOW)


def start_taking(server: Server, peers: list[str], settle: float = 3.0) -> None:
    """Start ``server`` and wait until it took ``peers`` (its log says it
    delivers to each), then ``settle`` seconds more: its first tries, its
    backoff, and its first looks, which read the outbox's ids once."""
    offset = len(server.log_path.read_text()) if server.log_path.exists() else 0
    server.start()
    deadline = time.monotonic() + 60
    while True:
        log = server.log_path.read_text()[offset:]
        if all(f"delivering to {peer} from" in log for peer in peers):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{server.server_name} did not take its {len(peers)} peers in 60 s: {server.log_path}")
        time.sleep(0.05)
    time.sleep(settle)


def measure(tb: Testbed, name: str, peers: list[str], posts: int, idle: float,
            settle: float = 3.0) -> tuple[int, float]:
    """Start a daemon with ``posts`` queued for dead ``peers``; (RSS once it
    took them, CPU seconds over ``idle`` seconds ``settle`` seconds later)."""
    server = tb.servers[name]
    server.start()  # creates the database
    server.stop()
    queue_backlog(server, peers, posts)
    try:
        start_taking(server, peers, settle)
        assert server.proc is not None
        rss = rss_bytes(server.proc.pid)
        cpu = cpu_seconds(server.proc.pid)
        time.sleep(idle)
        return rss, cpu_seconds(server.proc.pid) - cpu
    finally:
        server.stop()
        shutil.rmtree(server.root / "data", ignore_errors=True)
        server.log_path.unlink(missing_ok=True)


def measure_posting(tb: Testbed, big: int, small: int, posts: int, clients: int,
                    rounds: int) -> tuple[float, float]:
    """(c): (best posts/s into the DM with far.test, down with ``big`` posts
    queued for it; the same into the DM with near.test, down with ``small``)."""
    host, far, near = tb.servers["your-host.test"], tb.servers["far.test"], tb.servers["near.test"]
    for server in (host, far, near):
        server.start()
    try:
        alice, [(far_dm, _), (near_dm, _)] = peered_dms(host, [far, near])
        for server in (far, near, host):
            server.stop()
        queue_backlog(host, [far.server_name], big)
        queue_backlog(host, [near.server_name], small)
        start_taking(host, [far.server_name, near.server_name])
        token = alice["access_token"]
        for dm in (near_dm, far_dm):
            post_all(host, token, dm, [f"warm-up {n}" for n in range(50)], clients)
        beside_big, beside_small = [], []
        for n in range(rounds):
            beside_small.append(posts / post_all(host, token, near_dm, [f"near {n}.{i}" for i in range(posts)],
                                                 clients))
            beside_big.append(posts / post_all(host, token, far_dm, [f"far {n}.{i}" for i in range(posts)], clients))
        return max(beside_big), max(beside_small)
    finally:
        for server in (host, far, near):
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backlog", description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", type=int, default=100_000, help="posts queued, big backlogs (default 100000)")
    parser.add_argument("--small", type=int, default=1_000, help="posts queued, the baseline (default 1000)")
    parser.add_argument("--peers", type=int, default=100, help="dead peers of the many backlog (default 100)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    parser.add_argument("--idle", type=float, default=7.0, help="seconds of idle CPU measured (default 7)")
    parser.add_argument("--posts", type=int, default=1_500, help="posts per room and round, (c) (default 1500)")
    parser.add_argument("--clients", type=int, default=4, help="posting clients at once, (c) (default 4)")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="scaiwave-backlog-"))
    tb = Testbed(root)
    for name in ("small.test", "one.test", "many.test", "your-host.test", "far.test", "near.test"):
        tb.add(name)
    # Dead peers: an address that refuses connections, given to the daemons like any pinned name.
    dead_port = free_port()
    gone = [f"gone{n}.test:{dead_port}" for n in range(max(1, args.peers))]
    for server in tb.servers.values():
        server.env["SCAIWAVE_RESOLVE"] += "," + ",".join(f"{g}:127.0.0.1" for g in gone)
    configs = {"small": ("small.test", gone[:1], args.small), "one": ("one.test", gone[:1], args.big),
               "many": ("many.test", gone, args.big)}
    try:
        runs: dict[str, list[tuple[int, float]]] = {k: [] for k in configs}
        for _ in range(args.rounds):
            for key, (name, peers, posts) in configs.items():
                runs[key].append(measure(tb, name, peers, posts, args.idle))
        big_rate, small_rate = measure_posting(tb, args.big, args.small, args.posts, args.clients, args.rounds)
    finally:
        tb.stop()
        shutil.rmtree(root, ignore_errors=True)
    rss = {k: min(r for r, _ in v) for k, v in runs.items()}
    cpu = {k: min(c for _, c in v) for k, v in runs.items()}
    print(f"dead peers' backlogs, {os.cpu_count()} CPUs, best of {args.rounds} rounds: small {args.small:,} posts "
          f"for 1 peer; one {args.big:,} for 1; many {args.big:,} for {len(gone)}")
    ok = True
    for key in ("one", "many"):
        memory_ratio = rss[key] / rss["small"]
        cpu_ratio = cpu[key] / max(cpu["small"], 1e-3)
        ok_memory, ok_cpu = memory_ratio <= MEMORY_TARGET, cpu_ratio <= CPU_TARGET
        ok = ok and ok_memory and ok_cpu
        print(f"{key}: resident memory {rss[key] / 2**20:.0f} MB vs {rss['small'] / 2**20:.0f} MB: "
              f"{memory_ratio:.2f}x (target <= {MEMORY_TARGET}x) {verdict(ok_memory)}; "
              f"idle CPU over {args.idle:g} s {cpu[key]:.2f} s vs {cpu['small']:.2f} s: {cpu_ratio:.2f}x "
              f"(target <= {CPU_TARGET}x) {verdict(ok_cpu)}")
    posting = big_rate / small_rate
    ok_posting = posting >= POSTING_TARGET
    print(f"posting beside a backlog: {big_rate:.0f} posts/s into a DM with a peer down with {args.big:,} queued "
          f"vs {small_rate:.0f}/s into one with a peer down with {args.small:,}: {posting:.2f} "
          f"(target >= {POSTING_TARGET}) {verdict(ok_posting)}")
    return 0 if ok and ok_posting else 1


if __name__ == "__main__":
    sys.exit(main())
