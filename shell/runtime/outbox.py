"""The outbox: the daemon's half of delivery (``core.delivery`` decides).

Queued events are stored durably (the ``outbox`` table), handed to the
delivery machine, and sent as it says: one transaction in flight per peer,
peers side by side. Each answer goes back to the machine; the outbox table
follows what it reports (delivered, dropped, deferred). A mixin of
:class:`~.service.Service`: it uses the service's storage, node, clock and
``signed_request``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import trio

from scaiwave_federation.core import Code, Event, Refused, RoomFacts
from scaiwave_federation.core import push_targets
from scaiwave_federation.core import Deferred, Delivered, Dropped, Rehandshake, SendTransaction
from scaiwave_federation.core import encode_events_body

from ..store.store import StorageError

log = logging.getLogger("scaiwave.service")

__all__ = ["Outbox", "OUTBOX_IDLE_S"]

#: How long the outbox sleeps when nothing wakes it (every change does).
OUTBOX_IDLE_S = 5.0


class Outbox:
    """Queueing and delivering chained events to member servers (see the module doc)."""

    store: Any
    delivery: Any
    config: Any
    node: Any
    _wake_outbox: trio.Event

    # -- pushing events to member servers -------------------------------------------------

    async def push_events(self, room_id: str, events: list[Event], *, exclude: str | None = None,
                          facts: RoomFacts | None = None, store: bool = False,
                          client_txn: dict[str, Any] | None = None) -> None:
        """Queue chained events for every other server with joined members:
        durably, in one write (with ``store``, the events themselves go in
        that same write), then handed to the delivery machine, which the
        outbox worker drives. ``facts``: the room's, when the caller has them."""
        if facts is None:
            room = await self.store.get_room(room_id)
            if room is None:
                return
            facts = await self.room_facts(room)
        servers = [s for s in push_targets(facts, self.config.server_name) if s != exclude]
        now = self.now()
        envelopes = [e.envelope for e in events]
        body = encode_events_body(envelopes)
        # Outbox rows keep a unique name of their own; what goes on the wire is
        # named by the delivery machine (the hash of each transaction's body).
        tag = os.urandom(6).hex()
        items = [(server, f"{now}-{tag}-{n}", "/_scaiwave/federation/v1/send", body) for n, server in enumerate(servers)]
        if store:
            records = [e.as_record() for e in events]
            ids = await self.store.store_events_and_enqueue(room_id, records, items, now, client_txn=client_txn)
        elif items:
            ids = await self.store.enqueue_many(items, now)
        else:
            return
        for server, item_id in zip(servers, ids):
            if self.delivers_to(server):
                if self.alone():
                    self.delivery.handle_enqueue(server, item_id, envelopes)
                # else: the next look hands it over, in id order with the
                # rows other workers queued meanwhile.
            else:
                await self.take_peer(server)  # a peer nobody delivers to: ours, now
        due = self.delivery.poll_timeout(may_send=self.delivers_to)
        if due is not None and due <= now:
            # Only when something can go now: a peer with a transaction in flight,
            # in backoff or paced is woken for by its answer or its time.
            self._wake_outbox.set()

    def peer_inbound(self, server: str) -> None:
        """A request from ``server`` verified: it is up, so a delivery waiting
        on its backoff goes now (the core decides)."""
        if self.delivery.handle_inbound(server, self.now()):
            self._wake_outbox.set()

    async def outbox_worker(self) -> None:
        """Send what the delivery machine says, when it says: one transaction
        in flight per peer, peers side by side. Each answer goes back to the
        machine, and the next batch goes out at once while the outbox rows
        of the last one are removed."""
        async with trio.open_nursery() as nursery:
            while True:
                now = self.now()
                while (txn := self.delivery.poll_transmit(now, may_send=self.delivers_to)) is not None:
                    nursery.start_soon(self._transmit, txn, nursery)
                due = self.delivery.poll_timeout(may_send=self.delivers_to)
                delay = OUTBOX_IDLE_S if due is None else min(OUTBOX_IDLE_S, max(0.0, (due - now) / 1000))
                with trio.move_on_after(delay):
                    await self._wake_outbox.wait()
                self._wake_outbox = trio.Event()

    async def _transmit(self, txn: SendTransaction, nursery: trio.Nursery) -> None:
        try:
            result = await self.signed_request(txn.peer, "PUT", txn.target, txn.body)
        except Exception as exc:  # a storage failure recording the outcome, say
            # The machine must hear an answer, or the peer's queue waits for ever:
            # an internal error is one of the moment, so the batch is retried.
            log.exception("delivery to %s failed", txn.peer)
            result = Refused(Code.INTERNAL_ERROR, f"delivery failed here: {type(exc).__name__}")
        self.delivery.handle_result(txn.peer, txn.txn_id, result, self.now())
        self._wake_outbox.set()  # the peer's next batch goes now, while we update the outbox
        while (event := self.delivery.poll()) is not None:
            try:
                if isinstance(event, (Delivered, Dropped)):
                    if isinstance(event, Dropped):
                        # send() has already put the refusal in the peer's last_error.
                        log.warning("transaction to %s refused, dropped: %s", event.peer, event.refusal)
                    # Finished here: a look must not hand these rows over again
                    # between now and their removal.
                    self.finished(event.item_ids)
                    await self.store.delivered_many(event.item_ids)
                    self.removed(event.item_ids)
                elif isinstance(event, Deferred):
                    await self.store.mark_attempt(event.item_id, event.retry_at)
                elif isinstance(event, Rehandshake):
                    nursery.start_soon(self._rehandshake, event.peer)
            except StorageError as exc:
                # The machine has moved on; the outbox row catches up at the next
                # start (a delivered item sent again is a duplicate the peer skips).
                log.warning("outbox of %s not updated: %s", event.peer, exc)

    async def _rehandshake(self, peer: str) -> None:
        """The peer lost our peering (a restored backup, say): peer again, then retry at once."""
        if not isinstance(await self.handshake(peer), Refused):
            self.peer_inbound(peer)

    async def set_paused(self, peer: str, paused: bool) -> dict[str, Any]:
        """Pause or resume delivery to ``peer`` (its queue is kept, and goes out
        in order on resume: the delivery machine holds it). Raises StorageError
        ``not_found`` for a peer we never dealt with."""
        row = await self.shared_change(lambda store: store.set_paused(peer, paused))
        if paused:
            self.delivery.pause(peer)
            self._paused.add(peer)
        else:
            self.delivery.resume(peer)
            self._paused.discard(peer)
        self._wake_outbox.set()
        return row

    async def forget_peer(self, peer: str, *, force: bool) -> int:
        """Delete ``peer``'s row, cached keys and (with ``force``) queued
        transactions; return how many were dropped. See Store.forget_peer."""
        dropped = await self.shared_change(lambda store: store.forget_peer(peer, drop_queued=force))
        self.node.keys.forget(peer)
        self.delivery.forget(peer)
        return dropped

    async def retry_now(self, peer: str) -> int:
        count = await self.shared_change(lambda store: store.reset_retry(peer, self.now()))
        self.delivery.retry_now(peer, self.now())
        self._wake_outbox.set()
        return count
