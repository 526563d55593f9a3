"""Delivery between two real daemons (separate processes, real TLS, real
SQLite): what piled up while a peer was down goes out as one transaction, in
order, and a request from the peer ends the backoff at once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cbor2
import pytest

from scaiwave_federation.shell.recorder import read_recording
from scaiwave_federation.shell.demo.testbed import Server, Testbed, peered_dm, wait_until

pytestmark = pytest.mark.e2e


def _outbox(server: Server) -> list[tuple[int, int]]:
    db = sqlite3.connect(f"file:{server.root / 'data' / 'scaiwave.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT attempts, next_attempt_at FROM outbox ORDER BY id").fetchall()
    finally:
        db.close()


@contextmanager
def _posts_while_the_peer_is_down(tmp_path: Path, count: int) -> Iterator[tuple[Server, Server, str, str, list[str]]]:
    """your-host.test (recording its traffic) and peer.test share a DM;
    peer.test stops and ``count`` messages are posted. Yields (host, peer,
    room, the peer user's token, the texts); stops both at the end."""
    tb = Testbed(tmp_path)
    a = tb.add("your-host.test", extra={"SCAIWAVE_RECORD": str(tmp_path / "a.cbor")})
    b = tb.add("peer.test")
    try:
        a.start()
        b.start()
        room, alice, bob = peered_dm(a, b)
        b.stop()
        texts = [f"while down {n}" for n in range(count)]
        for text in texts:
            assert a.request("POST", f"/v1/rooms/{room}/messages", {"body": text}, token=alice["access_token"])[0] == 200
        yield a, b, room, bob["access_token"], texts
    finally:
        tb.stop()


def _all_arrive(b: Server, room: str, token: str, texts: list[str]) -> None:
    """peer.test is back: a post of its user's ends the host's backoff; every
    text arrives, then that post, in order; the host's outbox empties."""
    assert b.request("POST", f"/v1/rooms/{room}/messages", {"body": "back"}, token=token)[0] == 200

    def sees_all():
        messages = b.get(f"/v1/rooms/{room}/messages", token=token)["messages"]
        return messages if len(messages) >= len(texts) + 1 else None

    messages = wait_until(sees_all, timeout=30)
    assert [m["body"] for m in messages] == texts + ["back"]


def test_a_backlog_goes_as_one_transaction_when_the_peer_is_back(tmp_path: Path) -> None:
    with _posts_while_the_peer_is_down(tmp_path, 20) as (a, b, room, bt, texts):
        # The outbox backs off: wait until its next try is 8 s away.
        backlog = wait_until(lambda: (rows := _outbox(a)) and rows[0][0] >= 4 and rows, timeout=30)
        retry_at = backlog[0][1]
        b.start()
        # bob writes (a proposal to the host): the host hears from peer.test and
        # retries at once instead of waiting out its backoff.
        _all_arrive(b, room, bt, texts)
        wait_until(lambda: _outbox(a) == [], timeout=10)  # the chained "back" too
    _header, records, _torn = read_recording(tmp_path / "a.cbor")
    sends = [r for r in records if r["kind"] == "outbound" and "/send/" in r["target"]]
    delivered = [r for r in sends if r.get("status") == 200]
    backlog_txn = next(r for r in delivered if r["now"] > backlog[0][1] - 60_000 and
                       len(cbor2.loads(r["body"])["events"]) > 1)
    # The whole backlog in one transaction, sent before the backoff ran out.
    assert len(cbor2.loads(backlog_txn["body"])["events"]) == len(texts)
    assert backlog_txn["now"] < retry_at, (backlog_txn["now"], retry_at)
    # The last tries while peer.test was down carried the very same transaction (content-named).
    failed = [r["target"] for r in sends if r.get("error")]
    assert len(failed) >= 4 and failed[-1] == failed[-2] == backlog_txn["target"]


async def test_a_failure_while_sending_is_a_retry_not_a_stuck_queue(daemon, nursery) -> None:
    """Whatever goes wrong in the shell while a transaction is out (here: the
    storage refusing to record the peer's error, as a full disk does), the
    machine hears an answer (``internal_error``, retried after a backoff), so
    the peer's queue does not wait for ever and nothing is dropped."""
    from scaiwave_federation.shell.store.store import StorageError

    service = daemon.service
    item = await service.store.enqueue("peer.test:8449", "t1", "/send", b"body", service.now())
    service.delivery.handle_enqueue("peer.test:8449", item, [b"envelope"])

    async def full_disk(*_args, **_kwargs):
        raise StorageError("io", "database or disk is full")

    service.signed_request = full_disk
    txn = service.delivery.poll_transmit(service.now())
    await service._transmit(txn, nursery)
    assert service.delivery.in_flight("peer.test:8449") is None
    failures, retry_at = service.delivery.backoff("peer.test:8449")
    assert failures == 1 and retry_at > service.now()
    assert [(r["id"], r["attempts"]) for r in await service.store.due(now=1 << 62)] == [(item, 1)]


def test_a_backlog_past_what_a_failing_peer_keeps_in_memory_arrives_whole_and_in_order(tmp_path: Path) -> None:
    """150 posts while peer.test is down: after three failures in a row the
    sender keeps only the next batch (100 events) in memory and the rest
    waits in its outbox table (core.delivery SHED_FAILURES, core.handover
    refills). When peer.test is back, all of it arrives, in order, once."""
    with _posts_while_the_peer_is_down(tmp_path, 150) as (a, b, room, bt, texts):
        wait_until(lambda: (rows := _outbox(a)) and rows[0][0] >= 3, timeout=30)  # shed: three failures
        shed = [line for line in a.log_path.read_text().splitlines() if "keeps failing" in line]
        assert shed and f"delivery to {b.server_name} keeps failing" in shed[0], shed
        b.start()
        _all_arrive(b, room, bt, texts)
        wait_until(lambda: _outbox(a) == [], timeout=10)
    _header, records, _torn = read_recording(tmp_path / "a.cbor")
    delivered = [r for r in records if r["kind"] == "outbound" and "/send/" in r["target"] and r.get("status") == 200]
    bodies = [body for r in delivered for body in cbor2.loads(r["body"])["events"]]
    assert len(bodies) == len(set(bodies)), "an event was delivered twice"
