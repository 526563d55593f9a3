"""A peer that has been down for long: what does its backlog cost the sender?

``python -m bench.backlog [--big N] [--small N] [--rounds R] [--idle S]``

A real daemon (TLS, SQLite, its lease loop) starts with ``N`` posts queued
in its outbox for a peer that is down (its address refuses connections), as
after a week's outage in a busy room, or a restart during one. It takes the
peer, tries it, backs off, and sits idle. Measured, with ``--small`` (1,000)
and ``--big`` (100,000) queued posts, interleaved round by round (best
round of each):

(a) **memory**: the daemon's resident set size once it took the peer over;
(b) **idle CPU**: the CPU it uses over ``--idle`` (7) seconds, from 3 s
    after it took the peer (its first looks read the outbox's ids once, in
    chunks of 5,000: about 0.25 s of CPU for 100,000, once), which include
    two lease renewals and the resyncs they run.

Targets: (a) big / small <= 1.25 and (b) big / small <= 2.0: the backlog
waits in the outbox table, and the delivery machine holds a window of it
(``core.delivery.WINDOW_EVENTS``). Before the window, the big backlog cost
about 60 MB more and every resync read all 100,000 outbox ids again.
Prints PASS/FAIL per target; exits 1 on a miss.

The posts are written into the outbox table directly, while the daemon is
stopped (a queued post's row as the daemon writes it: one event's body),
so that 100,000 of them take a second, not the minutes of posting them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from scaiwave_federation.core import encode_events_body
from scaiwave_federation.shell.demo.testbed import Server, Testbed

from bench.federation import cpu_seconds

MEMORY_TARGET = 1.25
CPU_TARGET = 2.0
ENVELOPE = bytes(range(256)) + bytes(144)  # 400 bytes, as a short message's envelope
PEER = "gone.test"
NOW = 1_764_000_000_000


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def queue_backlog(server: Server, peer: str, posts: int) -> None:
    """``posts`` outbox rows for ``peer`` in the stopped daemon's database."""
    db = sqlite3.connect(server.root / "data" / "scaiwave.db")
    try:
        body = encode_events_body([ENVELOPE])
        path = "/_scaiwave/federation/v1/send"
        with db:
            db.executemany("INSERT INTO outbox (peer, txn_id, path, body, created_at, next_attempt_at)"
                           " VALUES (?, ?, ?, ?, ?, ?)",
                           ((peer, f"backlog-{n}", path, body, NOW, NOW) for n in range(posts)))
    finally:
        db.close()


def measure(tb: Testbed, name: str, posts: int, idle: float, settle: float = 3.0) -> tuple[int, float]:
    """Start a daemon with ``posts`` queued for a dead peer; (RSS once it took
    the peer, CPU seconds over ``idle`` seconds afterwards)."""
    server = tb.servers.get(name) or tb.add(name)
    server.start()  # creates the database
    server.stop()
    queue_backlog(server, tb.servers[PEER].server_name, posts)
    server.start()
    try:
        assert server.proc is not None
        deadline = time.monotonic() + 30
        while "delivering to gone.test" not in server.log_path.read_text():
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not take {PEER} in 30 s: {server.log_path}")
            time.sleep(0.05)
        time.sleep(settle)  # its first tries, its backoff, its first looks
        rss = rss_bytes(server.proc.pid)
        cpu = cpu_seconds(server.proc.pid)
        time.sleep(idle)
        return rss, cpu_seconds(server.proc.pid) - cpu
    finally:
        server.stop()
        shutil.rmtree(server.root / "data", ignore_errors=True)
        server.log_path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backlog", description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", type=int, default=100_000, help="posts queued, big backlog (default 100000)")
    parser.add_argument("--small", type=int, default=1_000, help="posts queued, small backlog (default 1000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    parser.add_argument("--idle", type=float, default=7.0, help="seconds of idle CPU measured (default 7)")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="scaiwave-backlog-"))
    tb = Testbed(root)
    tb.add(PEER)  # configured, never started: its address refuses connections
    try:
        runs: dict[str, list[tuple[int, float]]] = {"small": [], "big": []}
        for _ in range(args.rounds):
            runs["small"].append(measure(tb, "small.test", args.small, args.idle))
            runs["big"].append(measure(tb, "big.test", args.big, args.idle))
    finally:
        tb.stop()
        shutil.rmtree(root, ignore_errors=True)
    rss = {k: min(r for r, _ in v) for k, v in runs.items()}
    cpu = {k: min(c for _, c in v) for k, v in runs.items()}
    print(f"a dead peer's backlog, {os.cpu_count()} CPUs; {args.small:,} vs {args.big:,} posts queued, "
          f"best of {args.rounds} rounds")
    memory_ratio = rss["big"] / rss["small"]
    cpu_ratio = cpu["big"] / max(cpu["small"], 1e-3)
    ok_memory, ok_cpu = memory_ratio <= MEMORY_TARGET, cpu_ratio <= CPU_TARGET
    print(f"resident memory: {rss['small'] / 2**20:.0f} MB vs {rss['big'] / 2**20:.0f} MB: {memory_ratio:.2f}x "
          f"(target <= {MEMORY_TARGET}x) {'PASS' if ok_memory else 'FAIL'}")
    print(f"idle CPU over {args.idle:g} s: {cpu['small']:.2f} s vs {cpu['big']:.2f} s: {cpu_ratio:.2f}x "
          f"(target <= {CPU_TARGET}x) {'PASS' if ok_cpu else 'FAIL'}")
    return 0 if ok_memory and ok_cpu else 1


if __name__ == "__main__":
    sys.exit(main())
