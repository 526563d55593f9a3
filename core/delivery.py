"""Delivery to peers as a machine: what goes out, in which order, and what a reply means.

The host queues chained events for a peer (each queued *item* is one
durable outbox row holding one or more envelopes) and drives the machine the
quinn-proto way, with time passed in as integer milliseconds:

- :meth:`Delivery.handle_enqueue` -- an item was stored in the outbox;
- :meth:`Delivery.poll_transmit` ``(now)`` -- the next transaction to send
  (a :class:`SendTransaction`), or ``None``; call until ``None``;
- :meth:`Delivery.handle_result` ``(txn_id, result, now)`` -- the one answer
  method: the peer's ``(status, body)`` or the host's transport
  :class:`~.codes.Refused`;
- :meth:`Delivery.poll` -- what the host must carry out, one
  :class:`Delivered`, :class:`Dropped`, :class:`Deferred` or
  :class:`Rehandshake` at a time;
- :meth:`Delivery.poll_timeout` -- when to call :meth:`poll_transmit` next;
  :meth:`Delivery.due_now` -- whether one peer has a transaction to send now
  (after an enqueue for it: whether to wake the sender, without looking at
  every other peer);
- :meth:`Delivery.handle_inbound` -- a request from the peer verified: a
  peer in backoff is evidently up again, so its retry is brought forward
  (a 20 s outage no longer adds up to 5 minutes of backoff);
- :meth:`Delivery.retry_now` -- the admin's "retry now";
- :meth:`Delivery.full` and :meth:`Delivery.wants_more` -- whether a peer's
  queue in memory reached its window, and whether it drained to half of it
  (``core.handover`` leaves the rest of a peer's rows in the outbox table
  meanwhile, and reads them back when it drained).

Rules, all here:

- **Order.** One transaction in flight per peer; a peer's items go out in
  the order of their ids (the order the outbox stored them): an item handed
  over late with a lower id (a worker picking up rows other workers queued,
  ``core.handover``) goes before the higher ids still waiting, never before
  what is already in flight. Peers are independent: one that is down or
  slow holds up only its own queue.
- **Batching.** A transaction carries the items at the head of the queue,
  up to :data:`BATCH_EVENTS` events (all a receiver takes) and
  :data:`BATCH_BYTES` bytes, so a peer that is busy receiving gets everything that
  was queued meanwhile in one request: the next batch builds up while one is
  in flight. An item bigger than a batch goes alone.
- **Pace.** At most one transaction per peer every :data:`PACE_MS`
  unless a full batch waits; the first after a quiet spell goes at once,
  and so does the end of a burst: a batch of at least :data:`QUIET_EVENTS`
  goes once nothing was queued for :data:`QUIET_MS` (when the host passes
  ``now`` to :meth:`Delivery.handle_enqueue`).
- **Transaction ids** are the hash of the body, so a retry of the same items
  is the same transaction (the receiver answers it from its stored reply)
  and different contents never share an id, even after a restored backup
  reuses outbox ids.
- **Replies.** HTTP 200: every item is delivered (per-event refusals in the
  reply are the receiver's verdicts on the events; a gap is healed by its
  catch-up). A retryable refusal (:data:`~.codes.RETRYABLE`): the batch and
  everything behind it wait, with exponential backoff (:func:`backoff_ms`);
  ``not_peered`` also asks the host to handshake again first. A final
  refusal of a batch of several items: they are sent again one by one, so
  that only an item the peer refuses by itself is dropped. A final refusal
  of a single item drops it (:class:`Dropped`, to be logged).
- **Window.** The machine holds at most :data:`WINDOW_EVENTS` events and
  :data:`WINDOW_BYTES` bytes of a peer's queue (one item more when it
  arrives under the limit): a peer down for a week in a busy room costs the
  sender a window of memory, not the week's posts. The host asks
  :meth:`Delivery.full` before handing an item over; the rest waits in storage.
  A peer that failed :data:`SHED_FAILURES` times in a row is held to one
  batch (what its next retry sends): :meth:`Delivery.shed` lets the rest of
  its queue go from memory, so a server with many peers down holds a batch
  of each, not a window; the full window is back once a delivery succeeds.
- **Once.** Each item is reported :class:`Delivered` or :class:`Dropped`
  exactly once; nothing is dropped unless the peer finally refused it.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .codes import Code, LocalProtocolError, Refused
from .handshake import decode_refusal
from .rooms import MAX_TXN_EVENTS, encode_events_body

__all__ = [
    "BATCH_EVENTS",
    "BATCH_BYTES",
    "SEND_PREFIX",
    "PACE_MS",
    "QUIET_MS",
    "QUIET_EVENTS",
    "WINDOW_EVENTS",
    "WINDOW_BYTES",
    "SHED_FAILURES",
    "Delivery",
    "SendTransaction",
    "Delivered",
    "Dropped",
    "Deferred",
    "Rehandshake",
    "backoff_ms",
]

#: Events per transaction at most: as many as a receiver takes
#: (:data:`~.rooms.MAX_TXN_EVENTS`; Matrix sends up to 50 PDUs). At 50, a busy
#: DM's transactions were full (48 events each in bench.federation) and each
#: cost both sides a request, a signature and a durable commit; at 100 they
#: carry 65 to 70 and the receiver's CPU per message fell from 0.13 to 0.10 ms.
BATCH_EVENTS = MAX_TXN_EVENTS
#: Envelope bytes per transaction at most (well under the receiver's 2 MiB).
BATCH_BYTES = 1024 * 1024
#: Where transactions are PUT; the transaction id follows.
SEND_PREFIX = "/_scaiwave/federation/v1/send/"
#: At most one transaction per peer this often, unless a full batch waits: a
#: busy room's events then go in batches rather than one by one as fast as the
#: peer answers (a transaction costs the sender about 1 ms of CPU; an event in
#: a batch a few µs; at 20 ms a busy DM still cost its sender 0.3 ms a message). A lone
#: event after a quiet spell goes at once.
PACE_MS = 50
#: A batch of at least :data:`QUIET_EVENTS` events goes once nothing was
#: queued for the peer for this long, without waiting out the pace: the end
#: of a burst reaches the peer about ``PACE_MS / 2`` sooner. Below that size,
#: moderate traffic (an event every 20 ms, say) still goes in paced batches.
QUIET_MS = 10
QUIET_EVENTS = 10
#: A peer's queue held in memory at most (events, envelope bytes): ten full
#: batches. Beyond it a peer's rows wait in the outbox table, read back as
#: the window drains (``core.handover``): 100,000 posts queued for a peer that
#: was down held 60 MB of the sender's memory (about 600 bytes an item).
WINDOW_EVENTS = 10 * BATCH_EVENTS
WINDOW_BYTES = 4 * BATCH_BYTES
#: After this many failures in a row (1 + 2 + 4 s of backoff) a peer's queue
#: in memory is cut to one batch (:meth:`Delivery.shed`): 1,000 peers down
#: held a window each, about 600 MB; now a batch each.
SHED_FAILURES = 3
BACKOFF_BASE_MS = 1000
BACKOFF_CAP_MS = 300_000


def backoff_ms(
    failures: int, *, base_ms: int = BACKOFF_BASE_MS, cap_ms: int = BACKOFF_CAP_MS, jitter: float = 0.0
) -> int:
    """Delay in milliseconds before the next retry after ``failures`` failures.

    Exponential: ``base_ms * 2**(failures - 1)`` capped at ``cap_ms`` (1 s,
    2 s, 4 s, ... 5 min by default); 0 failures means no wait. Pure and
    deterministic: there is no randomness inside. A caller that wants jitter
    draws it itself and passes ``jitter`` in [0, 1]: that fraction of the
    delay is taken off (``jitter=0.25`` turns 4000 into 3000).
    Raises ValueError for negative ``failures`` or ``jitter`` outside [0, 1].
    """
    if failures < 0:
        raise ValueError(f"failures must be >= 0, got {failures}")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1], got {jitter}")
    if failures == 0:
        return 0
    # Compare exponents first so a huge failure count never builds a huge int.
    if base_ms <= 0 or (failures - 1) >= cap_ms.bit_length():
        delay = cap_ms if base_ms > 0 else 0
    else:
        delay = min(base_ms << (failures - 1), cap_ms)
    return delay - round(delay * jitter)


@dataclass(frozen=True, slots=True, kw_only=True)
class SendTransaction:
    """PUT ``body`` to ``peer`` at ``target`` (signed by the host), then answer
    :meth:`Delivery.handle_result` with ``txn_id``. ``item_ids``: the items it carries."""

    peer: str
    txn_id: str
    target: str
    body: bytes
    item_ids: tuple[int, ...]
    events: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivered:
    """The peer accepted these items: remove them from the outbox."""

    peer: str
    item_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Dropped:
    """The peer finally refused this item: remove it and report ``refusal``."""

    peer: str
    item_ids: tuple[int, ...]
    refusal: Refused


@dataclass(frozen=True, slots=True, kw_only=True)
class Deferred:
    """The peer's queue waits: record ``attempts`` and ``retry_at`` on the
    head item ``item_id`` (so that a restart resumes the same backoff)."""

    peer: str
    item_id: int
    attempts: int
    retry_at: int
    refusal: Refused


@dataclass(frozen=True, slots=True, kw_only=True)
class Rehandshake:
    """The peer lost our peering (``not_peered``): handshake again before the retry."""

    peer: str


DeliveryEvent = Delivered | Dropped | Deferred | Rehandshake


@dataclass(slots=True)
class _Item:
    id: int
    envelopes: tuple[bytes, ...]
    size: int


@dataclass(slots=True)
class _Peer:
    #: Queued items, oldest first; the first ``len(in_flight.item_ids)`` are in flight.
    queue: deque[_Item] = field(default_factory=deque)
    ids: set[int] = field(default_factory=set)  # queued (in flight included): an id is taken once
    in_flight: SendTransaction | None = None
    events: int = 0  # events queued (in flight included)
    size: int = 0  # their envelopes' bytes
    last_start: int | None = None  # when the last transaction went out
    last_enqueue: int | None = None  # when the last item was queued (None: not told)
    failures: int = 0
    retry_at: int = 0
    #: Items up to this id go one per transaction (after a final refusal of a batch).
    singles_until: int = -1
    #: The admin paused delivery to this peer: its queue is kept, nothing goes out.
    paused: bool = False
    #: Its one live entry in the machine's due-time heap (None: none), and that
    #: entry's time, never later than the peer's actual due time.
    entry: int | None = None
    entry_due: int = 0


class Delivery:
    """Per-peer ordered, batched delivery with backoff (see the module doc).

    ``batch_events`` and ``batch_bytes`` bound one transaction;
    ``window_events`` and ``window_bytes`` a peer's queue in memory.
    """

    def __init__(self, *, batch_events: int = BATCH_EVENTS, batch_bytes: int = BATCH_BYTES,
                 pace_ms: int = PACE_MS, quiet_ms: int = QUIET_MS, window_events: int = WINDOW_EVENTS,
                 window_bytes: int = WINDOW_BYTES) -> None:
        if batch_events < 1 or batch_bytes < 1 or pace_ms < 0 or quiet_ms < 0:
            raise LocalProtocolError("batches need room for at least one event and one byte; "
                                     "pace_ms and quiet_ms >= 0")
        if window_events < 1 or window_bytes < 1:
            raise LocalProtocolError("a window holds at least one event and one byte")
        self.window_events = window_events
        self.window_bytes = window_bytes
        self.batch_events = batch_events
        self.batch_bytes = batch_bytes
        self.pace_ms = pace_ms
        self.quiet_ms = quiet_ms
        self._peers: dict[str, _Peer] = {}
        self._events: deque[DeliveryEvent] = deque()
        self._forgotten: set[str] = set()  # peers forgotten with a transaction in flight
        self._queued: dict[int, str] = {}  # item id -> its peer, for every item queued
        #: (due, entry, peer): when each peer with something to send may send
        #: it, at the earliest (see _schedule); stale entries are skipped.
        self._heap: list[tuple[int, int, str]] = []
        self._entries = itertools.count(1)

    # -- inputs --------------------------------------------------------------------

    def handle_enqueue(self, peer: str, item_id: int, envelopes: list[bytes] | tuple[bytes, ...], *,
                       attempts: int = 0, retry_at: int = 0, now: int | None = None) -> bool:
        """Queue item ``item_id`` (its events' envelopes) behind ``peer``'s
        others. ``attempts``/``retry_at``: the backoff stored with the item
        (a restart); they apply when it is the first of the peer's queue.
        ``now``: when it was queued, for the quiet rule (a host that does
        not say gets the pace alone).
        Returns False, changing nothing, for an id already queued.
        Raises LocalProtocolError for an item without events, or one whose
        id is queued for another peer (item ids name one item for one peer)."""
        if not envelopes:
            raise LocalProtocolError("an outbox item carries at least one event")
        holder = self._queued.get(item_id)
        if holder is not None:
            if holder != peer:
                raise LocalProtocolError(f"item {item_id} is queued for {holder} already (an item is for one peer)")
            return False
        state = self._peers.get(peer)
        if state is None:
            state = self._peers[peer] = _Peer()
        if not state.queue:
            state.failures, state.retry_at = max(0, attempts), retry_at
        envelopes = tuple(envelopes)
        item = _Item(item_id, envelopes, sum(map(len, envelopes)))
        if state.queue and item_id < state.queue[-1].id:
            # Behind what is in flight, before the first higher id waiting.
            at = len(state.in_flight.item_ids) if state.in_flight is not None else 0
            while at < len(state.queue) and state.queue[at].id < item_id:
                at += 1
            state.queue.insert(at, item)
        else:
            state.queue.append(item)
        state.ids.add(item_id)
        self._queued[item_id] = peer
        if now is not None:
            state.last_enqueue = now
        state.events += len(envelopes)
        state.size += item.size
        self._schedule(peer, state)
        return True

    def handle_inbound(self, peer: str, now: int) -> bool:
        """A verified request from ``peer`` arrived: if its queue waits on a
        backoff, retry now. Returns whether a retry was brought forward."""
        state = self._peers.get(peer)
        if state is None or state.in_flight is not None or state.retry_at <= now:
            return False
        state.retry_at = now
        self._schedule(peer, state)
        return True

    def retry_now(self, peer: str, now: int) -> int:
        """The admin's "retry now": forget ``peer``'s backoff. Returns how many items wait."""
        state = self._peers.get(peer)
        if state is None:
            return 0
        state.failures, state.retry_at = 0, min(state.retry_at, now)
        self._schedule(peer, state)
        return len(state.queue)

    def pause(self, peer: str) -> None:
        """Stop sending to ``peer`` (an admin's ``peers pause``): its queue is
        kept, in order; a transaction already in flight still gets its answer."""
        self._peers.setdefault(peer, _Peer()).paused = True

    def resume(self, peer: str) -> None:
        """Send to ``peer`` again, its queue first, in order."""
        state = self._peers.get(peer)
        if state is not None:
            state.paused = False
            self._schedule(peer, state)

    def paused(self, peer: str) -> bool:
        state = self._peers.get(peer)
        return state is not None and state.paused

    def forget(self, peer: str) -> tuple[int, ...]:
        """Drop everything queued for ``peer`` (an admin's ``peers forget --force``);
        returns the item ids dropped. The answer to a transaction in flight is
        then ignored."""
        state = self._peers.pop(peer, None)
        if state is None:
            return ()
        if state.in_flight is not None:
            self._forgotten.add(peer)
        for item in state.queue:
            del self._queued[item.id]
        return tuple(item.id for item in state.queue)

    def handle_result(self, peer: str, txn_id: str, result: tuple[int, bytes] | Refused, now: int) -> None:
        self._handle_result(peer, txn_id, result, now)
        state = self._peers.get(peer)
        if state is not None:
            self._schedule(peer, state)

    def _handle_result(self, peer: str, txn_id: str, result: tuple[int, bytes] | Refused, now: int) -> None:
        """Answer the :class:`SendTransaction` ``txn_id`` to ``peer``: the
        peer's ``(status, body)``, or the refusal the host met sending it
        (transport failures: ``peer_unreachable``, ``tls_failure``, ...).
        Raises LocalProtocolError for a transaction not in flight."""
        state = self._peers.get(peer)
        txn = state.in_flight if state is not None else None
        if state is None and peer in self._forgotten:
            self._forgotten.discard(peer)  # the admin forgot the peer meanwhile
            return
        if state is None or txn is None or txn.txn_id != txn_id:
            raise LocalProtocolError(f"transaction {txn_id!r} to {peer} is not in flight")
        state.in_flight = None
        if isinstance(result, tuple) and result[0] == 200:
            state.failures, state.retry_at = 0, 0
            self._finish(peer, state, txn.item_ids)
            self._events.append(Delivered(peer=peer, item_ids=txn.item_ids))
            return
        refusal = result if isinstance(result, Refused) else decode_refusal(*result)
        if refusal.retryable:
            # A refusal of the moment: keep the batch, and everything after
            # it, and back off.
            state.failures += 1
            state.retry_at = now + backoff_ms(state.failures)
            if refusal.code is Code.NOT_PEERED:
                self._events.append(Rehandshake(peer=peer))
            self._events.append(Deferred(peer=peer, item_id=txn.item_ids[0], attempts=state.failures,
                                         retry_at=state.retry_at, refusal=refusal))
            return
        # A final refusal: the same bytes would get the same answer. The peer
        # answered, so it is up: no backoff.
        state.failures, state.retry_at = 0, 0
        if len(txn.item_ids) > 1:
            # Find the one it refuses: the batch again, one item at a time.
            state.singles_until = max(state.singles_until, txn.item_ids[-1])
            return
        self._finish(peer, state, txn.item_ids)
        self._events.append(Dropped(peer=peer, item_ids=txn.item_ids, refusal=refusal))

    # -- outputs -------------------------------------------------------------------

    def poll_transmit(self, now: int, *, may_send: Callable[[str], bool] | None = None) -> SendTransaction | None:
        """The next transaction to send, or None (nothing due). Each peer has
        at most one in flight; call again until None. ``may_send(peer)``:
        whether this host may send to ``peer`` now (a worker that does not
        hold the peer's lease, ``core.leases``, must not); its queue waits.
        The soonest due first: O(log n) in the peers waiting, not a scan."""
        aside: list[tuple[int, int, str]] = []
        txn = None
        while txn is None and (top := self._live_top()) is not None and top[0] <= now:
            entry = heapq.heappop(self._heap)
            peer = entry[2]
            if may_send is not None and not may_send(peer):
                aside.append(entry)  # not ours to send now: its entry stays
                continue
            state = self._peers[peer]
            state.entry = None
            state.last_start = now
            txn = self._build(peer, state)
        for entry in aside:
            heapq.heappush(self._heap, entry)
        return txn

    def poll(self) -> DeliveryEvent | None:
        """The next thing the host must carry out, or None."""
        return self._events.popleft() if self._events else None

    def poll_timeout(self, *, may_send: Callable[[str], bool] | None = None) -> int | None:
        """When (ms) a waiting queue becomes due; None if none waits on time.
        A time at or before now means :meth:`poll_transmit` has work.
        ``may_send``: as for :meth:`poll_transmit` (asked of the soonest
        peers first: usually the first answers, not every peer with a queue)."""
        aside: list[tuple[int, int, str]] = []
        due = None
        while (top := self._live_top()) is not None:
            if may_send is not None and not may_send(top[2]):
                aside.append(heapq.heappop(self._heap))
                continue
            due = top[0]
            break
        for entry in aside:
            heapq.heappush(self._heap, entry)
        return due

    def queued(self, item_id: int) -> bool:
        """Whether item ``item_id`` is queued (in flight included) for any peer."""
        return item_id in self._queued

    def due_now(self, peer: str, now: int, *, may_send: Callable[[str], bool] | None = None) -> bool:
        """Whether :meth:`poll_transmit` ``(now)`` has a transaction for ``peer``:
        after an enqueue, the host need wake its sender only if so (the other
        peers' times did not change)."""
        state = self._peers.get(peer)
        return (state is not None and state.in_flight is None and not state.paused and bool(state.queue)
                and self._due_at(state) <= now and (may_send is None or may_send(peer)))

    def _window(self, state: _Peer) -> tuple[int, int]:
        """(events, bytes) the peer's queue may hold in memory: a batch while
        it keeps failing, else the window."""
        if state.failures >= SHED_FAILURES:
            return min(self.batch_events, self.window_events), min(self.batch_bytes, self.window_bytes)
        return self.window_events, self.window_bytes

    def full(self, peer: str) -> bool:
        """Whether ``peer``'s queue in memory reached its window: an item the
        host has for it now waits in storage (see the module doc)."""
        state = self._peers.get(peer)
        if state is None:
            return False
        events, size = self._window(state)
        return state.events >= events or state.size >= size

    def room(self, peer: str) -> int:
        """How many more events ``peer``'s window holds (how many rows a read
        of what waits in storage for it should ask for at most)."""
        state = self._peers.get(peer)
        if state is None:
            return self.window_events
        return 0 if self.full(peer) else self._window(state)[0] - state.events

    def wants_more(self, peer: str) -> bool:
        """Whether ``peer``'s queue in memory is down to half its window: time
        to read what waits in storage for it."""
        state = self._peers.get(peer)
        if state is None:
            return True
        events, size = self._window(state)
        return state.events <= events // 2 and state.size <= size // 2

    def shed(self, peer: str) -> int | None:
        """A peer that failed :data:`SHED_FAILURES` times in a row keeps in
        memory only the batch its next retry sends: the items behind it are
        let go (they stay in storage; ``core.handover`` reads them back).
        Returns the last id kept, or None when nothing was let go (call it
        after each answer; ``Handover.shed`` does)."""
        state = self._peers.get(peer)
        if state is None or state.in_flight is not None or state.failures < SHED_FAILURES:
            return None
        most_events, most_bytes = self._window(state)
        events = size = kept = 0
        for item in state.queue:
            if kept and (events + len(item.envelopes) > most_events or size + item.size > most_bytes):
                break
            kept += 1
            events += len(item.envelopes)
            size += item.size
        if kept == len(state.queue):
            return None
        while len(state.queue) > kept:
            item = state.queue.pop()
            state.ids.discard(item.id)
            del self._queued[item.id]
            state.events -= len(item.envelopes)
            state.size -= item.size
        self._schedule(peer, state)
        return state.queue[-1].id

    def pending(self, peer: str | None = None) -> int:
        """Items queued for ``peer`` (or all peers), in flight included."""
        if peer is None:
            return sum(len(s.queue) for s in self._peers.values())
        state = self._peers.get(peer)
        return 0 if state is None else len(state.queue)

    def in_flight(self, peer: str) -> SendTransaction | None:
        """The transaction in flight to ``peer``, if any."""
        state = self._peers.get(peer)
        return None if state is None else state.in_flight

    def backoff(self, peer: str) -> tuple[int, int]:
        """``(failures, retry_at)`` of ``peer``'s queue."""
        state = self._peers.get(peer)
        return (0, 0) if state is None else (state.failures, state.retry_at)

    # -- inside --------------------------------------------------------------------

    def _due_at(self, state: _Peer) -> int:
        """When the peer's next transaction may go: after its backoff, and at
        most one per ``pace_ms`` unless a full batch waits, or a batch of
        :data:`QUIET_EVENTS` waits and nothing was queued for ``quiet_ms``."""
        if state.last_start is None or state.events >= self.batch_events:
            return state.retry_at
        due = state.last_start + self.pace_ms
        if self.quiet_ms and state.last_enqueue is not None and state.events >= QUIET_EVENTS:
            due = min(due, state.last_enqueue + self.quiet_ms)
        return max(state.retry_at, due)

    @staticmethod
    def _waits(state: _Peer) -> bool:
        """Whether the peer has something to send, once due."""
        return state.in_flight is None and not state.paused and bool(state.queue)

    def _schedule(self, peer: str, state: _Peer) -> None:
        """After a change to ``peer``'s queue or times: give it an entry in the
        heap if it waits and has none as early as its due time (an entry
        earlier than that is corrected when it reaches the top)."""
        if not self._waits(state):
            return
        due = self._due_at(state)
        if state.entry is None or due < state.entry_due:
            state.entry, state.entry_due = next(self._entries), due
            heapq.heappush(self._heap, (due, state.entry, peer))

    def _live_top(self) -> tuple[int, int, str] | None:
        """The heap's first entry once stale ones are dropped and an early one
        is moved to its peer's actual due time: the soonest peer that waits."""
        heap = self._heap
        while heap:
            due, entry, peer = heap[0]
            state = self._peers.get(peer)
            if state is None or state.entry != entry:
                heapq.heappop(heap)  # replaced by a newer entry, or the peer is gone
                continue
            if not self._waits(state):
                heapq.heappop(heap)  # in flight, paused or empty: rescheduled when that ends
                state.entry = None
                continue
            actual = self._due_at(state)
            if actual > due:  # its times moved on (a later enqueue, a backoff)
                heapq.heappop(heap)
                state.entry, state.entry_due = next(self._entries), actual
                heapq.heappush(heap, (actual, state.entry, peer))
                continue
            return heap[0]
        return None

    def _build(self, peer: str, state: _Peer) -> SendTransaction:
        first = state.queue[0]
        items, envelopes, size = [first.id], list(first.envelopes), first.size
        if first.id > state.singles_until:
            for nxt in itertools.islice(state.queue, 1, self.batch_events):
                if (nxt.id <= state.singles_until or len(envelopes) + len(nxt.envelopes) > self.batch_events
                        or size + nxt.size > self.batch_bytes):
                    break
                items.append(nxt.id)
                envelopes += nxt.envelopes
                size += nxt.size
        body = encode_events_body(envelopes)
        # The body's hash: the same items are the same transaction, other bytes another one.
        txn_id = hashlib.sha256(body).hexdigest()[:32]
        state.in_flight = SendTransaction(peer=peer, txn_id=txn_id, target=SEND_PREFIX + txn_id, body=body,
                                          item_ids=tuple(items), events=len(envelopes))
        return state.in_flight

    def _finish(self, peer: str, state: _Peer, item_ids: tuple[int, ...]) -> None:
        for item_id in item_ids:
            item = state.queue.popleft()
            assert item.id == item_id
            state.ids.discard(item_id)
            del self._queued[item_id]
            state.events -= len(item.envelopes)
            state.size -= item.size
        if not state.queue:
            del self._peers[peer]
