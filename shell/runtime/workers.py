"""Workers: several daemons with one name, key and database, side by side.

``core.leases`` decides who does what; this carries it out on the shared
lease table (``store/lease_rows.py``). Every worker runs :meth:`Workers.lease_loop`:

- every ``outbox_poll_ms`` (100 ms by default) it reads the outbox rows
  queued since its last look (one indexed read), hands those of the peers it
  delivers to to its delivery machine, and claims the peers nobody delivers
  to. A worker that takes a client's post for a peer another worker holds
  only queues it: the holder picks it up at its next look (polling, not a
  database notification: it is the same SQL on every backend, and a look
  that finds nothing costs one indexed read). Which rows go to the delivery
  machine, and when, is ``core.handover``'s: each peer's in id order; the
  holder's own rows go at once unless lower rows wait, and then a look runs
  at once (at most every ``LOOK_SOON_MS``);
- every third of a lease (``lease_ms``, 10 s by default) it renews its
  leases, reads the whole table (who else is alive, what they hold), stops
  delivering to the peers it lost, and re-reads the queues of its peers
  (a row committed late behind a newer one is found then), but for the
  peers behind their delivery window: those are read a window at a time
  as their deliveries drain (``refill``), as is a peer just taken;
- at every look it checks the shared-state generation (one read): when
  another worker changed the key ring, the policy or a peer's pause, it
  reloads them. The descriptor endpoint and the admin API check it before
  they answer, so a key rotated on one worker is served by every worker at once.

The singleton jobs (the yearly key rotation and the replay window's expiry in
the database) run on the holder of ``job:timers``; a rotation is written only
if the shared state did not change since the ring was read, so it happens
once even if two workers' timers fire together. A pull of a room (a catch-up,
an admin's backfill) holds ``pull:<room>`` while it runs, so a gap two
workers see is filled once. A worker that stops cleanly releases its leases
(the others take over at once); one that dies loses them when they expire.

A mixin of :class:`~.service.Service`.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Any

import trio

from scaiwave_federation.core import (
    TIMERS,
    Claim,
    LOOK_SOON_MS,
    Handover,
    KeyRing,
    LeaseRow,
    Leases,
    OldKey,
    Policy,
    SigningKey,
    peer_lease,
    pull_lease,
    worker_lease,
)

from ..store.lease_rows import briefly
from ..store.store import StorageError

log = logging.getLogger("scaiwave.workers")

__all__ = ["Workers", "new_worker_id"]

#: Finished outbox ids remembered until a later look cannot see them any more.
_PEER_PREFIX = "peer:"


def new_worker_id() -> str:
    """A unique id for this process: host, pid and 4 random bytes (a restarted
    worker is a new worker: its old leases expire, they are not resumed)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{os.urandom(4).hex()}"


class Workers:
    """Leases, shared-state refreshes and the outbox owner's look (see the module doc)."""

    store: Any
    node: Any
    config: Any
    delivery: Any
    _wake_outbox: trio.Event
    _descriptor: Any
    _timer_changed: trio.Event

    if TYPE_CHECKING:  # what its host, Service, provides
        def now(self) -> int: ...

    def _init_workers(self, worker_id: str) -> None:
        self.leases = Leases(worker_id, lease_ms=self.config.lease_ms)
        self._generation: int | None = None  # the shared state this worker last loaded
        #: Which outbox rows go to the delivery machine, and when (core.handover).
        self.handover = Handover()
        self._look_soon = trio.Event()
        self._claiming: set[str] = set()
        self._wanted: set[str] = set()  # peer leases with rows queued, as of the last looks
        self._paused: set[str] = set()
        self._refilling: set[str] = set()  # peers whose waiting rows are being read

    @property
    def worker_id(self) -> str:
        return self.leases.owner

    # -- leases ------------------------------------------------------------------------

    async def _claim(self, claim: Claim) -> bool:
        taken, row = await self.store.run(lambda store: briefly(
            store, lambda: store.claim_lease(claim.name, claim.owner, claim.expires_at, claim.now)))
        self.leases.handle_claim(claim, taken, _row(row))
        return taken

    async def start_worker(self) -> None:
        """Announce this worker (its ``worker:`` lease) and take the singleton
        jobs if nobody holds them; the peers follow at the first look."""
        now = self.now()
        self.leases.observe([_lease_row(r) for r in await self.store.lease_rows()])
        await self._claim(self.leases.claim(worker_lease(self.worker_id), now))
        for claim in self.leases.want([TIMERS], now, spread=False):
            await self._claim(claim)
        self._paused = set(await self.store.paused_peers())
        for peer in self._paused:
            self.delivery.pause(peer)
        self._generation = await self.store.shared_generation()

    async def stop_worker(self) -> None:
        """Release every lease (a clean stop: the others take over at once)."""
        for release in self.leases.release_all():
            try:
                await self.store.release_lease(release.name, release.owner)
            except StorageError as exc:  # they expire anyway
                log.warning("lease %s not released: %s", release.name, exc)

    def delivers_to(self, peer: str) -> bool:
        """Whether this worker sends to ``peer`` now (it holds its lease)."""
        return self.leases.holds(peer_lease(peer), self.now())

    def alone(self) -> bool:
        """No other worker is alive, as far as this one knows."""
        return self.leases.live_workers(self.now()) == 1

    def look_soon(self) -> None:
        """Rows this worker queued wait behind others' for a look: run one now."""
        self._look_soon.set()

    async def take_peer(self, peer: str) -> None:
        """A post queued for ``peer``, which this worker does not deliver to:
        claim it at once if no live worker holds it (the first post to a new
        peer goes without waiting for a look)."""
        name = peer_lease(peer)
        now = self.now()
        if name in self._claiming or self.leases.holder(name, now) is not None:
            return
        self._wanted.add(name)
        # This worker's share of the peers with queued rows (core.leases): a
        # peer past it is left to a worker with room, whose look finds it.
        try:
            for claim in self.leases.want(self._wanted, now):
                if claim.name not in self._claiming:
                    await self._take(claim)
        except StorageError as exc:
            # The post is stored: its answer must not fail for this. The next
            # look claims the peer.
            log.warning("delivery to %s not claimed now: %s", peer, exc)

    async def _take(self, claim: Claim) -> None:
        """Claim a peer and, if taken, read its queue into the delivery
        machine, a window at a time, before anything else is handed over for
        it (queue order is id order): the peer is behind (core.handover)
        from before it is ours, so rows queued for it meanwhile wait for
        these reads."""
        peer = claim.name[len(_PEER_PREFIX):]
        self._claiming.add(claim.name)
        try:
            taken, row = await self.store.run(lambda store: briefly(
                store, lambda: store.claim_lease(claim.name, claim.owner, claim.expires_at, claim.now)))
            if taken:
                if peer in self._paused:
                    self.delivery.pause(peer)
                self.handover.take(peer)
            self.leases.handle_claim(claim, taken, _row(row))
        finally:
            self._claiming.discard(claim.name)
        if taken:
            log.info("delivering to %s from this worker (%s)", peer, self.worker_id)
            try:
                await self.refill_due(peer)
            except StorageError as exc:  # the next resync reads it
                log.warning("queue of %s not read yet: %s", peer, exc)
            self._wake_outbox.set()

    async def _hand_over(self, rows: list[dict[str, Any]], peers: set[str], *,
                         refill: tuple[str, int] | None = None) -> int:
        """Give the delivery machine the rows of ``peers`` it does not have
        yet and has room for (core.handover decides); remove the unreadable."""
        handed, unreadable = self.handover.hand_over(self.delivery, rows, peers, refill=refill)
        for row in unreadable:
            log.warning("outbox entry %s for %s is unreadable, dropped", row["id"], row["peer"])
        if unreadable:
            await self.store.delivered_many([row["id"] for row in unreadable])
        return handed

    async def refill_due(self, peer: str) -> None:
        """After a delivery to ``peer``: if rows of it wait in the outbox and
        its window drained to half, read the next ones (one refill at a time)."""
        if self.handover.behind(peer) and self.delivery.wants_more(peer) and peer not in self._refilling:
            self._refilling.add(peer)
            try:
                await self.refill(peer)
            finally:
                self._refilling.discard(peer)

    async def refill(self, peer: str) -> None:
        """Hand ``peer``'s rows waiting in the outbox to the delivery machine,
        a window at a time, while it has room and the peer is behind."""
        while self.delivers_to(peer) and self.delivery.wants_more(peer):
            after = self.handover.refill_from(peer)
            if after is None:
                return
            limit = self.delivery.room(peer)
            rows = await self.store.outbox_from(peer, after, limit)
            if not self.delivers_to(peer):
                return
            if await self._hand_over(rows, {peer}, refill=(peer, limit)):
                self._wake_outbox.set()
            if len(rows) < limit and not self.handover.behind(peer):
                return  # level: its next rows go to the machine as they are queued

    def finished(self, ids: tuple[int, ...]) -> None:
        """The delivery machine is done with these outbox ids (their removal follows)."""
        self.handover.finished(ids)

    def removed(self, ids: tuple[int, ...]) -> None:
        """Their removal committed: a look that starts from now on cannot see them."""
        self.handover.removed(ids)

    async def take_pull(self, room_id: str) -> bool:
        """Claim the pull of ``room_id`` (a catch-up, a backfill); False if
        another live worker is pulling it."""
        name = pull_lease(room_id)
        now = self.now()
        if self.leases.holds(name, now):
            return False  # this worker pulls it already (an admin's and a catch-up)
        return await self._claim(self.leases.claim(name, now))

    async def end_pull(self, room_id: str) -> None:
        """Release the pull of ``room_id``."""
        release = self.leases.release(pull_lease(room_id))
        if release is not None:
            with trio.CancelScope(shield=True):
                try:
                    await self.store.release_lease(release.name, release.owner)
                except StorageError as exc:  # it expires anyway
                    log.warning("lease %s not released: %s", release.name, exc)

    # -- the loop ----------------------------------------------------------------------

    async def lease_loop(self) -> None:
        """Look at the outbox and the shared state every ``outbox_poll_ms``;
        renew leases when due; look at the outbox at once when rows this
        worker queued wait behind others' (see the module doc)."""
        while True:
            last = trio.current_time()
            await self.look()
            while True:
                delay = self.config.outbox_poll_ms
                renew = self.leases.poll_timeout()
                if renew is not None:  # never late for a renewal, whatever the poll interval
                    delay = min(delay, max(0, renew - self.now()))
                with trio.move_on_after(delay / 1000):
                    await self._look_soon.wait()
                if not self._look_soon.is_set():
                    break  # the full look is due
                await trio.sleep_until(last + LOOK_SOON_MS / 1000)
                self._look_soon = trio.Event()
                last = trio.current_time()
                await self.look_outbox()

    async def look(self) -> None:
        """One look: the shared state, due renewals, new outbox rows, claims."""
        now = self.now()
        await self.refresh_shared()
        renew = self.leases.handle_timeout(now)
        resync = False
        if renew is not None:
            rows = await self.store.run(lambda store: briefly(
                store, lambda: store.renew_leases(renew.owner, list(renew.names), renew.expires_at)))
            for name in self.leases.handle_renewed(renew, [_lease_row(r) for r in rows], now):
                if name.startswith(_PEER_PREFIX):
                    peer = name[len(_PEER_PREFIX):]
                    log.warning("no longer delivering to %s: its lease went to another worker", peer)
                    self._stop_delivering(peer)
            resync = True
            # A peer whose lease had come within its margin (a renewal late under
            # load) may be sent to again: its queue must not wait for a post to it.
            self._wake_outbox.set()
        if not self.leases.holds(TIMERS, now):
            for claim in self.leases.want([TIMERS], now, spread=False):
                if await self._claim(claim):
                    self._timer_changed.set()
        await self.look_outbox(resync=resync)
        if resync:
            await self._spread(now)
        for claim in self.leases.want(self._wanted, now):
            if claim.name not in self._claiming:
                await self._take(claim)

    async def look_outbox(self, *, resync: bool = False) -> None:
        """The outbox part of a look: hand the delivery machine the rows
        queued since the last look for the peers this worker delivers to
        (core.handover decides which); with ``resync``, every row of them."""
        look = self.handover.look_started()
        try:
            new = await self.store.outbox_after(self.handover.seen)
            ids = self.handover.handle_look([(r["id"], r["peer"]) for r in new], self.delivers_to,
                                            self.delivery.queued)
            handed = 0
            if ids:
                rows = await self.store.outbox_rows(ids)
                handed += await self._hand_over(rows, {r["peer"] for r in rows if self.delivers_to(r["peer"])})
            self._wanted |= {peer_lease(r["peer"]) for r in new}
            if resync:
                # Now and then, everything: peers queued for before this look's
                # window, and rows of ours committed behind a newer id.
                self._wanted = {peer_lease(p) for p in await self.store.queued_peers()}
                held = self.handover.resync_peers(
                    n[len(_PEER_PREFIX):] for n in self.leases.held() if n.startswith(_PEER_PREFIX))
                ids = self.handover.handle_resync(await self.store.outbox_ids(held), self.delivery.queued)
                if ids:
                    rows = await self.store.outbox_rows(ids)
                    handed += await self._hand_over(rows, {p for p in held if self.delivers_to(p)})
                for name in self.leases.held():
                    # A peer behind whose refill failed (a storage error) is read again here.
                    if name.startswith(_PEER_PREFIX):
                        await self.refill_due(name[len(_PEER_PREFIX):])
        finally:
            self.handover.look_done(look)
        if handed:
            self._wake_outbox.set()

    def _stop_delivering(self, peer: str) -> None:
        self.delivery.forget(peer)
        self.handover.forget(peer)

    async def _spread(self, now: int) -> None:
        """Give up the peers past this worker's share while another worker has
        room (core.leases decides which), each once nothing is in flight to it:
        the other worker takes its queue over from the outbox."""
        for name in self.leases.surplus(self._wanted, now):
            peer = name[len(_PEER_PREFIX):]
            if not name.startswith(_PEER_PREFIX) or self.delivery.in_flight(peer) is not None:
                continue
            release = self.leases.release(name)
            if release is None:
                continue
            self._stop_delivering(peer)
            await self.store.run(lambda store, name=release.name, owner=release.owner: briefly(
                store, lambda: store.release_lease(name, owner)))
            log.info("delivery to %s left to another worker (peers spread over %s workers)", peer,
                     self.leases.live_workers(now))

    # -- shared state ------------------------------------------------------------------

    async def refresh_shared(self) -> None:
        """Reload the key ring, policy and peers' pauses if another worker
        changed them (one read when nothing changed)."""
        generation = await self.store.shared_generation()
        if generation == self._generation:
            return
        current, old = await self.store.load_keyring()
        ring = KeyRing(
            current=SigningKey.from_seed(current["seed"], current["created_at"]) if current else None,
            old=tuple(OldKey(o["key_id"], o["public_key"], o["expired_at"]) for o in old),
        )
        if _ring_ids(ring) != _ring_ids(self.node.keyring):
            self.node.keyring = ring
            self._descriptor = None
            self._timer_changed.set()
            log.info("key ring changed by another worker: now %s", ring.current.key_id if ring.current else None)
        policy = Policy.from_dict(await self.store.get_policy())
        if policy.as_dict() != self.node.policy.as_dict():
            self.node.policy = policy
        peers = {p["server_name"]: p for p in await self.store.list_peers()}
        paused = {name for name, p in peers.items() if p.get("paused")}
        for peer in paused - self._paused:
            self.delivery.pause(peer)
        for peer in self._paused - paused:
            self.delivery.resume(peer)
            self._wake_outbox.set()
        self._paused = paused
        now = self.now()
        for name in self.leases.held():
            peer = name[len(_PEER_PREFIX):]
            if not name.startswith(_PEER_PREFIX):
                continue
            if peer not in peers and self.delivery.pending(peer):
                # Forgotten by an admin on another worker: its queue went with it.
                self._stop_delivering(peer)
                self.node.keys.forget(peer)
            elif self.delivery.backoff(peer)[1] > now:
                head = await self.store.outbox_from(peer, 0, 1)
                if head and head[0]["next_attempt_at"] <= now:  # an admin's "retry now" on another worker
                    self.delivery.retry_now(peer, now)
                    self._wake_outbox.set()
        self._generation = generation

    async def shared_change(self, change: Any, *, expect: int | None = None) -> Any:
        """Run ``change(store)`` and bump the shared generation in one
        transaction (see ``Store.shared_change``); return its result."""
        result, generation = await self.store.run(
            lambda store: store.shared_change(lambda: change(store), expect=expect))
        if self._generation is not None and generation == self._generation + 1:
            self._generation = generation  # only our own change: nothing to reload
        return result


def _row(row: dict[str, Any] | None) -> LeaseRow | None:
    return None if row is None else _lease_row(row)


def _lease_row(row: dict[str, Any]) -> LeaseRow:
    return LeaseRow(row["name"], row["owner"], int(row["expires_at"]))


def _ring_ids(ring: KeyRing) -> tuple[Any, ...]:
    return (ring.current.key_id if ring.current else None, tuple((o.key_id, o.expired_at) for o in ring.old))
