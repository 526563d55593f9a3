"""The in-process baseline of the backfill benchmark: verify and store a room's
events as the daemon would, without the network.

The same events (read from the host's SQLite file), served as the host
serves them (pages of :data:`~scaiwave_federation.core.PAGE_CAP`, newest
first), pulled by the core's :class:`BackfillPuller` with the daemon's
threaded verifier, each page stored with its cursor in a fresh SQLite file
with the daemon's durability (WAL, ``synchronous=FULL``).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scaiwave_federation.core import (
    BackfillDone, BackfillPuller, Event, Federation, KeyRing, Policy, SendRequest, StoreEvents, build_page,
    Refused, decode_event,
)
from scaiwave_federation.shell.store.store import Store
from scaiwave_federation.shell.runtime.verify_pool import threaded_verifier

LOCAL = "bench-local.test"


def _host_rows(db_path: Path, room: str) -> list[tuple[int, bytes]]:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT depth, envelope FROM events WHERE room_id = ? ORDER BY depth DESC",
                          (room,)).fetchall()
    finally:
        db.close()
    return [(d, bytes(e)) for d, e in rows]


def verify_and_store(db_path: Path, room: str, host: str, descriptor: bytes, limit: int, now: int) -> float:
    """Pull ``limit`` events of ``room`` below its newest event, in process;
    returns the seconds it took (verification and storage, no network)."""
    rows = _host_rows(db_path, room)
    by_depth = dict(rows)
    top_depth, top = rows[0]
    anchor_event = decode_event(top)
    assert isinstance(anchor_event, Event)
    pool = ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 2)))
    node = Federation(LOCAL, keyring=KeyRing().generate(bytes([7]) * 32, now - 1000), policy=Policy("open"),
                      verifier=threaded_verifier(pool))
    assert not isinstance(node.learn_descriptor(host, descriptor, now), Refused)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(tmp)
        store.create_room(room_id=room, room_type="group", host=host, creator="@x:" + host, created_at=now)
        started = time.perf_counter()
        puller = BackfillPuller(server_name=LOCAL, room_id=room, peer=host, key=node.keyring.current,
                                keys=node.keys, limit=limit, anchor=(anchor_event.depth, anchor_event.prev),
                                verifier=node.batch_verifier, lookup=node.lookup)
        effects = puller.start(now)
        while effects:
            effect = effects.pop(0)
            if isinstance(effect, SendRequest):
                query = dict(p.split("=") for p in effect.target.partition("?")[2].split("&"))
                before = int(query["before"]) if "before" in query else top_depth + 1
                depths = [d for d in range(before - 1, max(0, before - 1 - int(query.get("limit", 100))), -1)]
                effects += puller.page_received(200, build_page(room, before, [by_depth[d] for d in depths], depths),
                                                now)
            elif isinstance(effect, StoreEvents):
                store.store_events(room, [e.as_record() for e in effect.events],
                                   cursor={"peer": host, "cursor": effect.cursor, "stored": puller.stored,
                                           "updated_at": now})
            elif isinstance(effect, BackfillDone):
                if effect.stored != limit or effect.refusal is not None:
                    raise SystemExit(f"in-process pull stored {effect.stored}: {effect.refusal}")
        seconds = time.perf_counter() - started
        store.close()
    pool.shutdown()
    return seconds
