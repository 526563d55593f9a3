"""Handover: which outbox rows a worker gives its delivery machine, and when.

Several workers queue rows for one peer; one of them, the holder of the
peer's lease, delivers them, and must give its :class:`~.delivery.Delivery`
machine each peer's rows in id order (ids are the order events were
chained: a peer refuses an event sent ahead of an earlier one of its room
as ``chain_broken``). The machine places a late lower id before the higher
ones still waiting, but not before what is already in flight; so a row may
be handed over only when every lower row of its peer already has been.

Rows reach the holder two ways:

- **its own**, the moment its storage call queued them: the same call
  reads the peer's other rows below them (:meth:`Handover.floor` says from
  which id, or that nothing need be read: the peer is behind), and
  :meth:`Handover.handle_queued` hands them over only if every one of
  those is in the machine already or finished. Writes are one
  at a time on every backend, so when a row commits every lower id has
  committed, and no lower id can appear later: the check is exact, whoever
  queued the lower rows and whether or not that worker is still alive.
  Otherwise the rows wait for the next look (which the host should run
  soon: :meth:`handle_queued` returning False says so).
- **everyone's, at a look**: the host reads the ids queued since the last
  look (:attr:`Handover.seen`), :meth:`handle_look` picks those to read
  (peers this worker delivers to, not in the machine, not finished), and
  :meth:`handle_rows` says which of the rows read to hand over, once the
  host has them, in id order. A look now and then reads every row of its
  peers (:meth:`handle_resync`): a peer taken over, a row missed.

- **a peer's rows beyond its window, by refills**: the delivery machine
  holds a window of each peer's queue (``Delivery.full``); a row that finds
  it full stays in the outbox table, and so do the peer's later rows (the
  peer is *behind*: :meth:`Handover.stays`; looks and resyncs skip it, and
  nothing reads all its rows). Once the window drained to half
  (``Delivery.wants_more``) the host reads the peer's next rows above
  :meth:`Handover.floor` (:meth:`Handover.refill_from`) and hands them over
  (:meth:`Handover.hand_over` with ``refill``); a read that found fewer rows
  than it asked for, all taken, brings the peer level again. A peer taken
  over starts behind (:meth:`Handover.take`): its queue is read a window at
  a time, not whole.

A row the machine finished (delivered or dropped) stays in the outbox
until its removal commits; :meth:`finished` and :meth:`removed` keep it out
of the machine until no look can see it any more.

Sans-IO like the rest of the core: the host does the reads and passes the
answers in; nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .codes import Refused
from .rooms import decode_events_body

if TYPE_CHECKING:
    from .delivery import Delivery

__all__ = ["LOOK_SOON_MS", "Handover"]

#: A look asked for at once (:meth:`Handover.handle_queued` returned False)
#: runs this long after the last one at the earliest: the rows waiting for it
#: gather, and a worker under load looks about as often as its delivery
#: machine paces a peer's transactions (``delivery.PACE_MS``), not once per post.
LOOK_SOON_MS = 10

R = TypeVar("R", bound=Mapping[str, Any])


class Handover:
    """One worker's side of the outbox (see the module doc)."""

    def __init__(self) -> None:
        #: The highest outbox id a look read.
        self.seen = 0
        #: peer -> every row of it up to this id is in the machine or finished here.
        self._known: dict[str, int] = {}
        #: Peers whose rows above their floor may wait in the outbox only (behind their window).
        self._behind: set[str] = set()
        #: Behind peers that had a row queued since their last refill began (see hand_over).
        self._stayed: set[str] = set()
        #: id -> the look count when its removal committed (None: not yet).
        self._finished: dict[int, int | None] = {}
        self._looks = 0

    # -- rows this worker queued ---------------------------------------------------

    def floor(self, peer: str) -> int | None:
        """The storage call that queues rows for ``peer`` reads the peer's rows
        with ids above this and below its own first (every row at or below it
        is accounted for here). None: read nothing, the peer is behind and its
        new rows stay in the outbox whatever is below them (:meth:`stays`);
        its backlog, however long, is read by refills only, a window at a
        time, not by every post. (If a refill brings the peer level before the
        call's rows are handed over, :meth:`handle_queued` gets no rows below
        and leaves them to a look, as for a peer not delivered to.)"""
        if peer in self._behind:
            return None
        return self._known.get(peer, 0)

    def stays(self, peer: str, full: bool) -> bool:
        """Whether the rows this worker just queued for ``peer`` stay in the
        outbox for a refill rather than going to the machine: the peer is
        behind already, or ``full`` (``Delivery.full``: its window is), and
        then it is behind from now on. No look is needed for them."""
        if full:
            self._behind.add(peer)
        if peer in self._behind:
            self._stayed.add(peer)  # a refill under way may have read past it: not level yet
            return True
        return False

    def behind(self, peer: str) -> bool:
        """Whether rows of ``peer`` wait in the outbox for a refill."""
        return peer in self._behind

    def take(self, peer: str) -> None:
        """This worker now delivers to ``peer``: its queue is read from the
        start by refills, a window at a time (see the module doc)."""
        self._behind.add(peer)

    def shed(self, delivery: Delivery, peer: str) -> bool:
        """After an answer from ``peer``: if the delivery machine let the
        items behind its next batch go (a peer that keeps failing,
        ``Delivery.shed``), their rows wait in the outbox from now on and the
        peer is behind, its floor the last id kept. Call it in the same step
        as the answer (no await between). Returns whether anything was let go."""
        kept = delivery.shed(peer)
        if kept is None:
            return False
        self._known[peer] = kept
        self._behind.add(peer)
        return True

    def refill_from(self, peer: str) -> int | None:
        """A refill of ``peer`` begins: above which id to read its next rows
        (None: it is not behind, nothing to read)."""
        if peer not in self._behind:
            return None
        self._stayed.discard(peer)
        return self._known.get(peer, 0)

    def handle_queued(self, peer: str, ids: Sequence[int], below: Iterable[int] | None,
                      queued: Callable[[int], bool]) -> bool:
        """This worker queued ``ids`` for ``peer``, which it delivers to;
        ``below``: the peer's rows between :meth:`floor` and ``min(ids)``,
        read in that same storage call (None: not read, because the worker
        did not deliver to the peer when the call began); ``queued``: whether
        an id is in the delivery machine. Returns whether to hand ``ids``
        over now; if not, a look hands them over, after the rows below them
        (run one soon)."""
        if not ids or below is None:
            return False
        finished = self._finished
        for i in ids:
            if i in finished:
                return False
        for i in below:
            if i not in finished and not queued(i):
                return False
        top = max(ids)
        if top > self._known.get(peer, 0):
            self._known[peer] = top
        return True

    # -- looks ---------------------------------------------------------------------

    def look_started(self) -> int:
        """A look begins; returns its number (for :meth:`look_done`)."""
        self._looks += 1
        return self._looks

    def handle_look(self, rows: Sequence[tuple[int, str]], holds: Callable[[str], bool],
                    queued: Callable[[int], bool]) -> list[int]:
        """``rows``: ``(id, peer)`` of the rows queued after :attr:`seen`, by
        id. Returns the ids to read and hand over: those of the peers this
        worker delivers to (``holds``) and that are not behind, not in the
        machine, not finished."""
        if rows:
            self.seen = max(self.seen, rows[-1][0])
        behind = self._behind
        ids = []
        for i, peer in rows:
            if peer in behind:  # held or being taken: its refill finds it, even one that read before it committed
                self._stayed.add(peer)
            elif holds(peer) and i not in self._finished and not queued(i):
                ids.append(i)
        return ids

    def resync_peers(self, held: Iterable[str]) -> list[str]:
        """Of the peers this worker delivers to, those a resync reads every
        row of: not the peers behind (a refill reads theirs, a window at a time)."""
        return [p for p in held if p not in self._behind]

    def handle_resync(self, rows: Sequence[tuple[int, str]], queued: Callable[[int], bool]) -> list[int]:
        """``rows``: ``(id, peer)`` of every row of the peers a resync reads
        (:meth:`resync_peers`). Returns the ids to read and hand over."""
        behind = self._behind
        return [i for i, peer in rows if peer not in behind and i not in self._finished and not queued(i)]

    def handle_rows(self, rows: Iterable[R], peers: Collection[str], *, refill: str | None = None) -> list[R]:
        """The rows read for a look, a resync or a refill of ``refill`` (``id``
        and ``peer`` keys): those to hand over now, by id, in one step with
        nothing between (a row may have finished, a peer fallen behind,
        while they were read)."""
        behind = self._behind
        # A peer's rows go over by a look or resync while it is level, by its
        # refill while it is behind (not once it was forgotten meanwhile).
        return sorted((r for r in rows if r["peer"] in peers and r["id"] not in self._finished
                       and (r["peer"] in behind) == (r["peer"] == refill)),
                      key=lambda r: r["id"])

    def hand_over(self, delivery: Delivery, rows: Sequence[R], peers: Collection[str], *,
                  refill: tuple[str, int] | None = None) -> tuple[int, list[R]]:
        """Give ``delivery`` the rows read for a look or a resync (or, with
        ``refill`` = ``(peer, rows asked for)``, for a refill of that peer),
        as :meth:`handle_rows` picks them, until a peer's window is full (the
        peer is behind from then on: its other rows wait in the outbox).
        Rows carry ``body`` (the events' body), ``attempts`` and
        ``next_attempt_at``. Returns how many were handed over and the rows
        whose body is unreadable (to remove and report: nobody can send them)."""
        refilled = refill[0] if refill is not None else None
        handed, unreadable = 0, []
        filled: set[str] = set()
        for row in self.handle_rows(rows, peers, refill=refilled):
            peer, item_id = row["peer"], row["id"]
            if peer in filled:
                continue
            if delivery.full(peer):
                self._behind.add(peer)
                filled.add(peer)
                continue
            decoded = decode_events_body(bytes(row["body"]))
            if isinstance(decoded, Refused):
                unreadable.append(row)
            elif delivery.handle_enqueue(peer, item_id, decoded[0], attempts=row.get("attempts") or 0,
                                         retry_at=row["next_attempt_at"]):
                handed += 1
            if item_id > self._known.get(peer, 0):
                self._known[peer] = item_id
        if refill is not None and len(rows) < refill[1] and refilled not in filled and refilled not in self._stayed:
            # Every row it has is in the machine now (none was queued for it
            # since the read began, by us or by a look's finding).
            self._behind.discard(refilled)
        return handed, unreadable

    def look_done(self, look: int) -> None:
        """Look ``look`` ended: forget finished ids whose removal committed
        before it began (no look from now on can see them)."""
        for item_id in [i for i, at in self._finished.items() if at is not None and at < look]:
            del self._finished[item_id]

    # -- the machine's results -----------------------------------------------------

    def finished(self, ids: Iterable[int]) -> None:
        """The delivery machine is done with these ids (delivered or dropped);
        their removal from the outbox follows."""
        for item_id in ids:
            self._finished[item_id] = None

    def removed(self, ids: Iterable[int]) -> None:
        """Their removal committed: a look that starts from now on cannot see them."""
        for item_id in ids:
            if item_id in self._finished:
                self._finished[item_id] = self._looks

    def is_finished(self, item_id: int) -> bool:
        return item_id in self._finished

    def forget(self, peer: str) -> None:
        """This worker no longer delivers to ``peer``: what it knew of the
        peer's rows is no longer kept up to date."""
        self._known.pop(peer, None)
        self._behind.discard(peer)
        self._stayed.discard(peer)
