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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from scaiwave_federation.core import Code, Event, Head, PeerAgreed, Refused, RoomFacts
from scaiwave_federation.core import push_targets
from scaiwave_federation.core import Deferred, Delivered, Dropped, Rehandshake, SendTransaction
from scaiwave_federation.core import Handover, encode_events_body
from scaiwave_federation.core import TxnDecision

from ..store.store import StorageError, TxnOutcome

log = logging.getLogger("scaiwave.service")

__all__ = ["Outbox", "OUTBOX_IDLE_S"]

#: How long the outbox sleeps when nothing wakes it (every change does).
OUTBOX_IDLE_S = 5.0


class Outbox:
    """Queueing and delivering chained events to member servers (see the module doc)."""

    # What its host, Service, provides (declared so that types are checked).
    store: Any
    delivery: Any
    config: Any
    node: Any
    _wake_outbox: trio.Event

    if TYPE_CHECKING:
        def now(self) -> int: ...
        async def room_facts(self, room: dict[str, Any]) -> RoomFacts: ...
        async def signed_request(self, peer: str, method: str, target: str,
                                 body: bytes) -> tuple[int, bytes] | Refused: ...
        async def handshake(self, peer: str) -> PeerAgreed | Refused: ...
        def delivers_to(self, peer: str) -> bool: ...
        def look_soon(self) -> None: ...
        async def take_peer(self, peer: str) -> None: ...
        def finished(self, ids: tuple[int, ...]) -> None: ...
        async def refill_due(self, peer: str) -> None: ...
        def removed(self, ids: tuple[int, ...]) -> None: ...
        async def shared_change(self, change: Any, *, expect: int | None = None) -> Any: ...
        _paused: set[str]
        handover: Handover

    # -- pushing events to member servers -------------------------------------------------

    async def push_events(self, room_id: str, events: list[Event], *, facts: RoomFacts | None = None,
                          client_txn: dict[str, Any] | None = None,
                          memberships: dict[str, str] | None = None,
                          invite: dict[str, Any] | None = None) -> None:
        """Store events chained onto a room we host and queue them for every
        other server with joined members, in one write, then hand them to the
        delivery machine, which the outbox worker drives. ``facts``: the
        room's, when the caller has them; ``client_txn``: the user's send
        answer, and ``memberships``: the moves the events make (user id ->
        membership), and ``invite`` (a local invitee's invite row), stored in that write."""
        if facts is None:
            room = await self.store.get_room(room_id)
            if room is None:
                return
            facts = await self.room_facts(room)
        now = self.now()
        servers, items, envelopes = self._items([(push_targets(facts, self.config.server_name), events)], now)
        records = [e.as_record() for e in events]
        floors = self._floors(servers)

        def write(db: Any) -> tuple[list[int], list[list[int] | None]]:
            ids = db.store_events_and_enqueue(room_id, records, items, now, client_txn=client_txn,
                                              memberships=memberships, invite=invite)
            return ids, self._rows_below(db, servers, ids, floors)

        def queued(result: tuple[list[int], list[list[int] | None]]) -> None:
            # In the Trio thread, before any later storage call's answer (a
            # look's read) is handed back: see core.handover.
            self._queued(servers, *result, envelopes)

        await self.store.submit(write, then=queued).wait()
        await self._take_peers(servers)

    async def store_txn_and_push(self, origin: str, txn_id: str, decision: TxnDecision,
                                 records: list[dict[str, Any]]) -> TxnOutcome:
        """Carry out a received transaction's decision in one write: its events
        (``records``) and reply, the memberships its proposals moved, and the
        events it chained queued for the servers the core named
        (``decision.pushes``, the proposer included): queued in the order
        they were chained (another worker may chain in the room next), never
        stored unqueued. The copy in the reply is only a head start. Returns
        what the store did."""
        now = self.now()
        rooms = [(list(servers), [e for e in decision.chained if e.room_id == room_id])
                 for room_id, servers in decision.pushes]
        servers, items, envelopes = self._items(rooms, now)
        floors = self._floors(servers)

        def write(db: Any) -> tuple[TxnOutcome, list[list[int] | None]]:
            outcome = db.store_txn(origin, txn_id, decision.reply, now, None, records, items,
                                   list(decision.memberships))
            return outcome, self._rows_below(db, servers, list(outcome.outbox_ids), floors)

        def queued(result: tuple[TxnOutcome, list[list[int] | None]]) -> TxnOutcome:
            outcome, below = result
            if outcome.outbox_ids:
                self._queued(servers, list(outcome.outbox_ids), below, envelopes)
            return outcome

        outcome: TxnOutcome = await self.store.submit(write, then=queued).wait()
        await self._take_peers(servers)
        return outcome

    @staticmethod
    def _items(rooms: list[tuple[list[str], list[Event]]],
               now: int) -> tuple[list[str], list[tuple[str, str, str, bytes]], list[list[bytes]]]:
        """Outbox rows for ``(servers, events)`` of each room: one per server
        and room, with its server and its events' envelopes, in that order."""
        # Outbox rows keep a unique name of their own; what goes on the wire is
        # named by the delivery machine (the hash of each transaction's body).
        tag = os.urandom(6).hex()
        servers: list[str] = []
        items: list[tuple[str, str, str, bytes]] = []
        envelopes: list[list[bytes]] = []
        for targets, events in rooms:
            room_envelopes = [e.envelope for e in events]
            body = encode_events_body(room_envelopes)
            for server in targets:
                items.append((server, f"{now}-{tag}-{len(items)}", "/_scaiwave/federation/v1/send", body))
                servers.append(server)
                envelopes.append(room_envelopes)
        return servers, items, envelopes

    async def _take_peers(self, servers: list[str]) -> None:
        for server in dict.fromkeys(servers):
            if not self.delivers_to(server):
                await self.take_peer(server)  # a peer nobody delivers to: ours, now

    async def chain_and_push(self, room_id: str, chain: Callable[[Head | None], list[Event]], facts: RoomFacts,
                             client_txn: Callable[[Event], dict[str, Any]] | None = None, *,
                             lock: trio.Lock, memberships: dict[str, str] | None = None,
                             invite: Callable[[Event], dict[str, Any]] | None = None) -> list[Event]:
        """Chain events onto the head of a room we host (``chain(head)``), store
        them and queue them for every other server with joined members, all in
        one storage call: one round trip and one durable write for a client's
        post, a write that shares its commit with the posts queued next to it
        (group commit, see ``AsyncStore.submit``). ``client_txn``: the user's
        send answer for the last event, ``memberships`` (the moves the
        events make) and ``invite`` (a local invitee's invite row for the
        last event), stored in that write. Returns the events once stored,
        handed to the delivery machine in storage order.

        ``lock`` (the room's) is held only while the call is queued: calls run
        in order, so the next post reads this one's head, and whoever holds
        the lock across several calls (reading the head, then storing) is
        not overtaken."""
        targets = push_targets(facts, self.config.server_name)
        now = self.now()
        floors = self._floors(targets)

        def write(store: Any) -> tuple[list[Event], list[int], list[list[int] | None]]:
            row = store.head(room_id)
            events = chain(Head(row["depth"], row["event_id"]) if row else None)
            servers, items, _envelopes = self._items([(targets, events)], now)
            ids = store.store_events_and_enqueue(room_id, [e.as_record() for e in events], items, now,
                                                 client_txn=client_txn(events[-1]) if client_txn else None,
                                                 memberships=memberships,
                                                 invite=invite(events[-1]) if invite else None)
            return events, ids, self._rows_below(store, servers, ids, floors)

        def queued(result: tuple[list[Event], list[int], list[list[int] | None]]) -> list[Event]:
            # In the Trio thread, in storage order: the delivery machine sees
            # each peer's events in the order they were chained.
            events, ids, below = result
            if ids:
                envelopes = [e.envelope for e in events]
                self._queued(targets, ids, below, [envelopes] * len(ids))
            return events

        await lock.acquire()
        try:
            job = self.store.submit(write, group=True, then=queued)
        finally:
            lock.release()
        events = await job.wait()
        await self._take_peers(targets)
        return events

    def _floors(self, servers: list[str]) -> dict[str, int]:
        """For the peers this worker delivers to: above which id the storage
        call that queues rows for them reads their other rows (core.handover;
        none for a peer behind its window, whose new rows stay in the outbox)."""
        floors = {}
        for server in servers:
            if self.delivers_to(server) and (floor := self.handover.floor(server)) is not None:
                floors[server] = floor
        return floors

    @staticmethod
    def _rows_below(store: Any, servers: list[str], ids: list[int],
                    floors: dict[str, int]) -> list[list[int] | None]:
        """In the storage call that queued ``ids`` (one per server), after they
        were written: each delivered-to peer's other rows below ours (None for
        the others). Writes are one at a time, so every lower id has committed by now."""
        return [store.outbox_between(server, floors[server], item_id) if server in floors else None
                for server, item_id in zip(servers, ids)]

    def _queued(self, servers: list[str], ids: list[int], below: list[list[int] | None],
                envelopes: list[list[bytes]]) -> None:
        """Rows this worker just queued (each with its server and its events'
        envelopes), in id order: hand them to the delivery machine now where
        core.handover allows it; the others wait for a look, which runs at once."""
        now = self.now()
        wake = False
        for server, item_id, lower, item_envelopes in zip(servers, ids, below, envelopes):
            if self.handover.stays(server, self.delivery.full(server)) or not self.delivers_to(server):
                continue  # waiting in the outbox for a refill (one may be reading), or another worker's
            if self.handover.handle_queued(server, (item_id,), lower, self.delivery.queued):
                self.delivery.handle_enqueue(server, item_id, item_envelopes, now=now)
                # Only when something can go now: a peer with a transaction in flight,
                # in backoff or paced is woken for by its answer or its time.
                wake = wake or self.delivery.due_now(server, now)
            else:
                self.look_soon()
        if wake:
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
        if self.handover.shed(self.delivery, txn.peer):
            log.info("delivery to %s keeps failing: its queue past the next batch waits in the outbox", txn.peer)
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
                    # Grouped with the posts queued around it: it does not split their commit.
                    ids = event.item_ids
                    await self.store.submit(lambda store, ids=ids: store.delivered_many(ids), group=True).wait()
                    self.removed(event.item_ids)
                    await self.refill_due(event.peer)
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
        self.handover.forget(peer)
        return dropped

    async def retry_now(self, peer: str) -> int:
        count = await self.shared_change(lambda store: store.reset_retry(peer, self.now()))
        self.delivery.retry_now(peer, self.now())
        self._wake_outbox.set()
        return count
