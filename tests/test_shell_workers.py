"""Two workers in one process on one real SQLite file (shell/runtime/workers.py):
what one changes, the other sees at its next look; one holds a peer's
delivery and the timers; a peer whose holder stops renewing goes to the
other once its lease expires. (tests/test_workers.py does it with real
processes, TLS and a peer daemon.)"""

from __future__ import annotations

from pathlib import Path

import trio

from scaiwave_federation.core import TIMERS, Policy, encode_events_body, peer_lease
from scaiwave_federation.shell.config import load_config
from scaiwave_federation.shell.runtime.service import BackfillJob, Service

from shellhelpers import make_env

PEER = "peer.test"


async def _two(tmp_path: Path, ca) -> tuple[Service, Service]:
    authority, ca_path = ca
    env = make_env(tmp_path / "a", ca_path, authority, "your-host.test", SCAIWAVE_LEASE="300ms")
    first = await Service.open(load_config(env))
    second = await Service.open(load_config(env))
    return first, second


async def test_two_workers_share_state_and_split_the_work(tmp_path: Path, ca) -> None:
    one, two = await _two(tmp_path, ca)
    try:
        assert one.worker_id != two.worker_id
        # The first to start runs the timers; the second knows it is not alone.
        now = one.now()
        assert one.leases.holds(TIMERS, now) and not two.leases.holds(TIMERS, now)
        assert not two.alone()

        # A key generated and rotated on one is the other's at its next look.
        await one.generate_key()
        await two.look()
        assert two.node.keyring.current.key_id == one.node.keyring.current.key_id
        await two.rotate_key()
        await one.look()
        assert one.node.keyring.current.key_id == two.node.keyring.current.key_id
        # A policy too.
        policy = Policy.from_dict({"default_mode": "open", "allowed_peers": [], "blocked_peers": []})
        await two.set_policy(policy)
        await one.look()
        assert one.node.policy.as_dict() == policy.as_dict()

        # A backfill job one worker runs is answered for by the other.
        job = BackfillJob(id=0, room_id="!r:peer.test", peer=PEER, limit=10)
        await one._new_job(job)
        job.stored, job.state = 7, "done"
        await one.store.save_job(job.id, job.view(), one.now())
        assert await two.job_view(job.id) == job.view() == await one.job_view(job.id)
        assert await two.job_view(job.id + 1) is None

        # Rows queued for a peer: one worker takes its delivery, the other does not.
        body = encode_events_body([b"\x83\x41a\x41b\x41c"])
        ids = await two.store.enqueue_many([(PEER, "t1", "/x", body), (PEER, "t2", "/x", body)], one.now())
        await one.look()
        await two.look()
        holders = [s for s in (one, two) if s.delivers_to(PEER)]
        assert len(holders) == 1
        holder, other = holders[0], (two if holders[0] is one else one)
        assert holder.delivery.pending(PEER) == 2 and other.delivery.pending(PEER) == 0

        # Paused on the other worker: the holder's queue waits.
        await other.set_paused(PEER, True)
        await holder.look()
        assert holder.delivery.paused(PEER)
        await other.set_paused(PEER, False)
        await holder.look()
        assert not holder.delivery.paused(PEER)

        # The holder stops renewing (hung, or dead): once its lease expires,
        # the other takes the peer and its queue over from the database.
        await trio.sleep(0.35)
        await other.look()  # its renewal reads the table: the holder's lease is stale
        await other.look()
        assert other.delivers_to(PEER) and other.delivery.pending(PEER) == len(ids)
        assert not holder.delivers_to(PEER)
        await holder.look()  # back: its renewal tells it the peer is lost
        assert holder.delivery.pending(PEER) == 0
        assert (await one.store.lease_rows())  # (the table is shared)
        names = {r["name"]: r["owner"] for r in await one.store.lease_rows()}
        assert names[peer_lease(PEER)] == other.worker_id
    finally:
        await one.aclose()
        await two.aclose()
    # A clean stop gave every lease up.
    from scaiwave_federation.shell.store.store import Store

    with Store.open(tmp_path / "a" / "data") as store:
        assert store.lease_rows() == []


async def test_a_peers_queue_past_its_window_is_read_back_a_window_at_a_time(tmp_path: Path, ca) -> None:
    """A peer with more queued than its delivery window (5 events here): the
    machine holds a window, the rest waits in the SQLite outbox and is read
    back as deliveries drain it, every row once and in id order."""
    from scaiwave_federation.core import Delivered, Delivery

    authority, ca_path = ca
    service = await Service.open(load_config(make_env(tmp_path / "a", ca_path, authority, "your-host.test")))
    try:
        service.delivery = Delivery(window_events=5)
        body = encode_events_body([b"\x83\x41a\x41b\x41c"])
        ids = await service.store.enqueue_many([(PEER, f"t{n}", "/x", body) for n in range(12)], service.now())
        await service.look()  # takes the peer: its queue is read a window at a time
        assert service.delivers_to(PEER)
        assert service.delivery.pending(PEER) == 5 and service.handover.behind(PEER)
        await service.look_outbox(resync=True)  # a resync does not read the rows behind the window
        assert service.delivery.pending(PEER) == 5
        # Posts queued meanwhile wait in the outbox too.
        ids += await service.store.enqueue_many([(PEER, "t12", "/x", body)], service.now())
        await service.look()
        assert service.delivery.pending(PEER) == 5

        sent: list[int] = []
        now = service.now() + 60_000
        while (txn := service.delivery.poll_transmit(now)) is not None:
            sent += txn.item_ids
            service.delivery.handle_result(PEER, txn.txn_id, (200, b""), now)
            event = service.delivery.poll()
            assert isinstance(event, Delivered)
            service.finished(event.item_ids)
            await service.store.delivered_many(list(event.item_ids))
            service.removed(event.item_ids)
            await service.refill_due(PEER)
            assert service.delivery.pending(PEER) <= 5
            now += 1000
        assert sent == ids
        assert not service.handover.behind(PEER)
        assert await service.store.pending_count(PEER) == 0
    finally:
        await service.aclose()
