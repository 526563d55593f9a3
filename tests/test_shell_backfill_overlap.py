"""Backfill with fetching, verifying and storing overlapped (Service._pull):
a page the store refuses still ends the pull there, with what was stored
before it kept and nothing after it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import trustme

from shellhelpers import peered_dm, two_daemons, wait_for


async def test_a_page_the_store_refuses_ends_the_pull_keeping_the_pages_before(
        tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    async with two_daemons(tmp_path, ca) as (a, b):
        room, at, bt = await peered_dm(a, b)
        for n in range(650):
            assert (await a.request("POST", f"/v1/rooms/{room}/messages", {"body": f"m{n}"}, token=at))[0] == 200

        async def delivered():
            return len((await b.request("GET", f"/v1/rooms/{room}/messages", token=bt))[1]["messages"]) == 650

        await wait_for(delivered, timeout=30)
        # peer.test forgets everything below depth 620 and holds a forged event at depth 10.
        db = sqlite3.connect(tmp_path / "b" / "data" / "scaiwave.db")
        with db:
            top = db.execute("SELECT sender, origin, type, ts, envelope FROM events WHERE room_id = ? AND depth = 620",
                             (room,)).fetchone()
            db.execute("DELETE FROM events WHERE room_id = ? AND depth < 620", (room,))
            db.execute("INSERT INTO events (event_id, room_id, depth, sender, origin, type, ts, envelope)"
                       " VALUES (?, ?, 10, ?, ?, ?, ?, ?)", (b"\x01" * 32, room, *top))
        db.close()
        status, job = await b.admin("POST", f"/v1/admin/federation/rooms/{room}/backfill",
                                    {"peer": a.server_name, "limit": 1000, "wait": True})
        assert status == 200 and job["state"] == "failed" and job["error"]["code"] == "conflict", job
        assert job["stored"] == 500  # the first page (619 down to 120); the second page held the fork
        db = sqlite3.connect(tmp_path / "b" / "data" / "scaiwave.db")
        depths = [d for (d,) in db.execute("SELECT depth FROM events WHERE room_id = ? ORDER BY depth", (room,))]
        cursor = db.execute("SELECT stored FROM backfill_cursors WHERE room_id = ?", (room,)).fetchone()
        db.close()
        assert depths[0] == 10 and depths[1:] == list(range(120, depths[-1] + 1))
        assert cursor == (500,)  # resumable where the stored pages end
