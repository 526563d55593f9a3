"""Scale benchmark: does a room's size slow the store down? On SQLite and on PostgreSQL.

``python -m bench.scale [--big N] [--small N] [--rounds R] [--postgres-url URL] [--seed S]``

One database per backend holds two rooms: a big one (1,000,000 events by
default) and a small one (1,000). In the same run, interleaved round by round
so that machine drift hits both alike, it measures on each room what the
daemon asks of its store for:

(a) serving a backfill page (``GET /backfill``): the room's row and members,
    a page of 500 events (``PAGE_CAP``) below a random depth (``page_before``), and the page's CBOR
    (``core.backfill.build_page``);
(b) ingesting a transaction (``PUT /send``): the replay check
    (``get_txn_response``), the room's row and head, then ``store_txn`` of 20
    new events at the head in one durable transaction (SQLite
    ``synchronous=FULL``; PostgreSQL ``synchronous_commit=on``). Both rooms
    grow by what is ingested (the small one to about 1,900 events by the end).

Target: for each backend and operation, median time in the big room / median
in the small room <= 2.0. Prints PASS/FAIL per target; exits 1 on a miss.

What is and is not measured, honestly: the 1,000,000 events are inserted
directly, in bulk (SQLite ``executemany`` in one transaction, PostgreSQL
``COPY``), not through the federation path: their ids are distinct 32-byte
hashes and each row carries one pre-made 220-byte envelope, not a signed
event of its own (the measured operations never decode or verify stored
envelopes: a page is served as stored, and the receiver checks signatures
before the store is involved, at a cost independent of the room's size;
``bench.ingest`` measures that part). The PostgreSQL server is a private
``pgserver`` instance on this machine (Unix socket), started by the bench,
unless ``--postgres-url`` names another (an empty database; it is filled).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from scaiwave_federation.core.backfill import PAGE_BYTES, PAGE_CAP, build_page
from scaiwave_federation.shell.store.store import Store

TARGET = 2.0
NOW = 1_764_000_000_000
PAGE = PAGE_CAP
TXN_EVENTS = 20
ENVELOPE = bytes(range(220)) * 1  # one pre-made envelope-sized blob, reused (never decoded here)
HOST = "big.test"


def _event_id(room: str, depth: int) -> bytes:
    return hashlib.sha256(f"{room}|{depth}".encode()).digest()


def _row(room: str, depth: int) -> tuple[Any, ...]:
    return (_event_id(room, depth), room, depth, "@alice:big.test", HOST, "m.message", NOW + depth, ENVELOPE)


COLUMNS = "event_id, room_id, depth, sender, origin, type, ts, envelope"


def fill(store: Store, room: str, n: int) -> None:
    """``n`` events of ``room`` (depths 1..n) and its rooms/members rows, in bulk."""
    store.create_tenant("acme") if store.get_tenant("acme") is None else None
    store.create_room(room, "group", HOST, "@alice:big.test", NOW, tenant="acme")
    store.set_membership(room, "@alice:big.test", "join")
    store.set_membership(room, "@bob:peer.test", "join")
    rows = (_row(room, d) for d in range(1, n + 1))
    if store.backend == "sqlite":
        db = store.db
        db.execute("PRAGMA synchronous=OFF")  # the bulk load only; measured writes are FULL again
        db.execute("BEGIN")
        db.conn.executemany(f"INSERT INTO events ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        db.execute("COMMIT")
        db.execute("PRAGMA synchronous=FULL")
    else:
        with store.db.conn.cursor().copy(f"COPY events ({COLUMNS}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        store.db.execute("ANALYZE events")


class Room:
    """One room under test: its size, and the next transaction to ingest."""

    def __init__(self, room_id: str, size: int) -> None:
        self.room_id, self.size, self.txns = room_id, size, 0


def serve_page(store: Store, room: Room, rng: random.Random) -> None:
    store.get_room(room.room_id)
    store.members(room.room_id)
    before = rng.randint(PAGE + 1, room.size)
    depths, envelopes = store.page_before(room.room_id, before, PAGE, PAGE_BYTES)
    assert len(depths) == PAGE, len(depths)
    build_page(room.room_id, before, envelopes, depths)


def ingest(store: Store, room: Room, rng: random.Random) -> None:
    room.txns += 1
    txn_id = f"{room.room_id}-t{room.txns}"
    assert store.get_txn_response("peer.test", txn_id) is None
    store.get_room(room.room_id)
    head = store.head(room.room_id)["depth"]
    events = [dict(zip(("event_id", "room_id", "depth", "sender", "origin", "type", "ts", "envelope"),
                       _row(room.room_id, head + i))) for i in range(1, TXN_EVENTS + 1)]
    outcome = store.store_txn("peer.test", txn_id, b"\xa0", NOW, None, events)
    assert outcome.new_events == TXN_EVENTS
    room.size = head + TXN_EVENTS


def measure(store: Store, big: Room, small: Room, rounds: int, seed: int) -> dict[str, tuple[float, float]]:
    """Median seconds per operation, ``{op: (big, small)}``."""
    rng = random.Random(seed)
    ops: dict[str, tuple[Callable[..., None], int]] = {"backfill page": (serve_page, 40), "ingest txn": (ingest, 8)}
    samples: dict[tuple[str, str], list[float]] = {}
    for fn, _count in ops.values():  # warm up: the first reads of each room
        for room in (big, small):
            fn(store, room, rng)
    for _ in range(rounds):
        for op, (fn, count) in ops.items():
            for room in (big, small):
                for _ in range(count):
                    start = time.perf_counter()
                    fn(store, room, rng)
                    samples.setdefault((op, room.room_id), []).append(time.perf_counter() - start)
    return {op: (statistics.median(samples[(op, big.room_id)]), statistics.median(samples[(op, small.room_id)]))
            for op in ops}


def run_backend(name: str, store: Store, big_n: int, small_n: int, rounds: int, seed: int) -> list[bool]:
    big, small = Room("!big:big.test", big_n), Room("!small:big.test", small_n)
    started = time.perf_counter()
    fill(store, big.room_id, big_n)
    fill(store, small.room_id, small_n)
    print(f"{name}: filled {big_n:,} + {small_n:,} events in {time.perf_counter() - started:.1f} s")
    results = measure(store, big, small, rounds, seed)
    verdicts = []
    for op, (t_big, t_small) in results.items():
        ratio = t_big / t_small
        ok = ratio <= TARGET
        verdicts.append(ok)
        print(f"  {name} {op}: {big_n:,}-event room {t_big * 1000:.3f} ms, {small_n:,}-event room "
              f"{t_small * 1000:.3f} ms, ratio {ratio:.2f} (target <= {TARGET}) {'PASS' if ok else 'FAIL'}")
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--postgres-url", help="an empty PostgreSQL database (default: a private pgserver)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="scaiwave-scale-", dir="/tmp"))
    verdicts: list[bool] = []
    server = None
    try:
        with Store.open(root / "sqlite") as store:
            verdicts += run_backend("sqlite", store, args.big, args.small, args.rounds, args.seed)
        url = args.postgres_url
        if url is None:
            import pgserver  # the test extra: PostgreSQL 16 in a wheel

            server = pgserver.get_server(root / "pg", cleanup_mode="stop")
            server.psql("CREATE DATABASE scale;")
            url = server.get_uri("scale")
        with Store.open(url) as store:
            verdicts += run_backend("postgresql", store, args.big, args.small, args.rounds, args.seed)
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    print("all targets met" if all(verdicts) else "FAIL: a target was missed")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
