"""Backfill: pulling a room's history from its host, page by page, verifying every link.

Serving side: :func:`parse_query` reads ``before`` and ``limit`` (capped at
:data:`PAGE_CAP`), storage hands back the events strictly below ``before``
in descending depth (at most :data:`PAGE_BYTES` of them, which it may do
itself so as not to read more), and :func:`build_page` encodes the page,
cut at :data:`PAGE_BYTES`::

    {"room_id": str, "before": int | null, "events": [envelope, ...], "next": int | null}

``before`` echoes the request (``null``: from the room's newest event), and
``next`` is the cursor for the following page (``null`` at the room's start).
Cursors are opaque to clients; today they are depths.

Pulling side: :class:`BackfillPuller` asks for pages, checks each event's
hash, signature and chain link, and emits :class:`~.effects.StoreEvents` with
only verified events, each depth once, together with a resume cursor.

- The chain is walked downward from an *anchor*: the oldest event we already
  hold (its depth and ``prev``), or the newest event of the head page.
- Pages may arrive split anyhow, duplicated or reordered: verified events
  wait in a bounded buffer until the chain reaches them, so the stored set is
  the same whatever the order.
- It stops at ``limit`` (at most :data:`MAX_PULL`), at the room's first event,
  or when the host has nothing older.
- *Bounded*: a pull makes at most :func:`request_budget` requests (the pages
  its ``limit`` needs at :data:`BUDGET_PAGE` events a page, plus
  :data:`BUDGET_SLACK`), and every page must make
  progress: link an event, or bring a verified event the chain can still
  reach that was not buffered yet. A page for our own cursor that brings
  nothing means the host has nothing older; any other page that moves
  nothing, or running out of budget, ends the pull with ``no_progress``. A
  host answering with moved cursors and no events, or one event a page,
  cannot keep a pull going. What was stored stays, and the cursor resumes it. A bad event is refused with its code;
  everything verified before it stays stored, and the pull stops there
  (storing past it would leave a hole in the chain). The saved cursor lets a
  later pull resume exactly there, storing nothing twice.
- *Catching up* (``until``, our own head of the room): the pull walks down
  from the host's newest event to our head and must link to it exactly.
  Nothing is stored until it does; then the whole run is stored at once, so
  a receiver that missed events fills the gap above its head without ever
  holding a hole. A host whose chain does not contain our head, a gap of
  more than ``limit`` events or a bad event ends the pull with a refusal and
  nothing stored; its cursor restarts it from the top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .codes import Code, LocalProtocolError, Refused
from .effects import BackfillDone, Effect, Failed, SendRequest, StoreEvents
from .events import MAX_EVENT_BYTES, Event, KeyLookup, NeedKeys, verify_events
from .keycache import KeyCache
from .keys import BatchVerifier, SigningKey, verify_batch
from .layouts import read_page
from .requests import sign_request
from .wire import decode, encode

__all__ = [
    "PAGE_CAP",
    "MAX_PULL",
    "MAX_PAGE_BYTES",
    "PAGE_BYTES",
    "BUDGET_PAGE",
    "page_bytes",
    "PAGE_ENVELOPE_HEAD",
    "BUDGET_SLACK",
    "PAGE_RETRIES",
    "PAGE_RETRY_MS",
    "PAGE_RETRY_CODES",
    "request_budget",
    "backfill_target",
    "parse_query",
    "build_page",
    "decode_page",
    "Page",
    "BackfillPuller",
    "BackfillDone",
]

#: Events in a page at most: what a host serves and a puller asks for. It was
#: 100; at 500 an admin's pull of 1,000 events over TLS is two pages, not ten,
#: and took 47-51 ms instead of 59-63 (``bench.federation``: the host's and the
#: puller's cost per page, a request, its signature check, storage calls and a
#: durable write each, was a third of the pull). A host of before serves at
#: most 100 whatever it is asked: the budget counts on no more (BUDGET_PAGE).
PAGE_CAP = 500
MAX_PULL = 1000
#: A page's body at most: what a puller reads.
MAX_PAGE_BYTES = 8 * 1024 * 1024
#: A page's events at most, in bytes as encoded: a host cuts the page there
#: (:func:`build_page`), short of :data:`MAX_PAGE_BYTES` by the page's own
#: fields. 100 events of the largest size always fit, so a cut page still
#: holds at least :data:`BUDGET_PAGE` events.
PAGE_BYTES = MAX_PAGE_BYTES - 64 * 1024
#: The page size a pull's request budget assumes: what every honest host
#: serves at least (hosts before PAGE_CAP was 500 served 100; a page cut by
#: bytes holds 100 events of the largest size).
BUDGET_PAGE = 100
#: Requests a pull may make beyond the pages its limit needs: the last page (which
#: may find nothing older) and one more, so an honest host is never cut short.
BUDGET_SLACK = 2
#: A page the host refused with one of these codes (it said "not now": it is
#: limiting our rate, its disk is failing, it ran out of time) is asked again
#: after PAGE_RETRY_MS, then twice as long each time, at most PAGE_RETRIES
#: times in a row; then the pull ends with that refusal, resumable from its
#: cursor. A retry is not counted against the budget (the same page, asked
#: again), and a page that arrives resets the count. (A pull used to end at
#: the first ``rate_limited``: an admin pulling from a host busy with our
#: traffic got a failed job.) Any other refusal, and a transport failure
#: (the host is not there), ends the pull at once, as before.
PAGE_RETRIES = 4
PAGE_RETRY_MS = 1000
PAGE_RETRY_CODES = frozenset({Code.RATE_LIMITED, Code.STORAGE_UNAVAILABLE, Code.TIMEOUT})


def request_budget(events: int, page_size: int) -> int:
    """How many page requests a pull of ``events`` events in pages of
    ``page_size`` may make (pages larger than :data:`BUDGET_PAGE` count as
    that: the host may serve no more)."""
    return -(-max(events, 0) // min(page_size, BUDGET_PAGE)) + BUDGET_SLACK


#: Encoded size of an envelope in a page at most, beyond its bytes (a byte string's head).
PAGE_ENVELOPE_HEAD = 5
assert BUDGET_PAGE * (MAX_EVENT_BYTES + PAGE_ENVELOPE_HEAD) <= PAGE_BYTES


def page_bytes(envelope: bytes) -> int:
    """What one envelope adds to a page, as :func:`build_page` counts it
    against :data:`PAGE_BYTES`."""
    return len(envelope) + PAGE_ENVELOPE_HEAD


_MAX_CURSOR = (1 << 63) - 1  # depths are below 2**63 (events.py)


def backfill_target(room_id: str, before: int | None, limit: int) -> str:
    """The request target of one page."""
    query = f"limit={limit}" if before is None else f"before={before}&limit={limit}"
    return f"/_scaiwave/federation/v1/rooms/{room_id}/backfill?{query}"


def parse_query(query: Mapping[str, str]) -> tuple[int | None, int] | Refused:
    """``before`` and ``limit`` from a backfill request; the page is capped at :data:`PAGE_CAP`.

    Each is 1 to 19 ASCII digits and at most 2**63 - 1, a depth's range: no
    sign, space, ``_`` or other script's digits (which ``int()`` would take),
    and no number too large for storage (``before=10**20`` is ``malformed``).
    """
    values: list[int | None] = []
    for name, default in (("before", None), ("limit", str(PAGE_CAP))):
        text = query.get(name, default)
        if text is None:
            values.append(None)
            continue
        if not (0 < len(text) <= 19 and text.isascii() and text.isdigit()) or not 0 < int(text) <= _MAX_CURSOR:
            return Refused(Code.MALFORMED, f"{name} is an integer from 1 to {_MAX_CURSOR}")
        values.append(int(text))
    before, limit = values
    assert limit is not None  # it has a default
    return before, min(limit, PAGE_CAP)


def build_page(room_id: str, before: int | None, envelopes: list[bytes], depths: list[int]) -> bytes:
    """Encode one page; ``envelopes`` in descending depth (as storage returns
    them), as many as fit in :data:`PAGE_BYTES` (the first always does: an
    event is at most :data:`~.events.MAX_EVENT_BYTES`). ``next`` follows the
    last one in the page."""
    total, fit = 0, 0
    for envelope in envelopes:
        total += page_bytes(envelope)
        if total > PAGE_BYTES and fit:
            break
        fit += 1
    envelopes, depths = envelopes[:fit], depths[:fit]
    oldest = depths[-1] if depths else None
    next_cursor = oldest if oldest is not None and oldest > 1 else None
    return encode({"room_id": room_id, "before": before, "events": envelopes, "next": next_cursor})


@dataclass(frozen=True, slots=True)
class Page:
    """A decoded page (events still unverified)."""

    room_id: str
    before: int | None
    events: tuple[bytes, ...]
    next: int | None


def _opt_int(value: object) -> bool:
    return value is None or (type(value) is int and 0 < value < 1 << 63)


def decode_page(body: bytes) -> Page | Refused:
    """Strictly decode a page body."""
    if type(body) is bytes and len(body) <= MAX_PAGE_BYTES:
        fields = read_page(body, PAGE_CAP)  # the common layout, read fast
        if fields is not None:
            room_id, before, envelopes, next_cursor = fields
            return Page(room_id, before, tuple(envelopes), next_cursor)
    value = decode(body, max_size=MAX_PAGE_BYTES, max_depth=3)
    if isinstance(value, Refused):
        return value
    if not (isinstance(value, dict) and value.keys() == {"room_id", "before", "events", "next"}):
        return Refused(Code.MALFORMED, "a backfill page is {room_id, before, events, next}")
    events = value["events"]
    if not (type(value["room_id"]) is str and _opt_int(value["before"]) and _opt_int(value["next"])
            and type(events) is list and len(events) <= PAGE_CAP
            and all(type(e) is bytes for e in events)):
        return Refused(Code.MALFORMED, "backfill page fields have the wrong types")
    return Page(value["room_id"], value["before"], tuple(events), value["next"])


@dataclass
class _Progress:
    next_depth: int | None  # the depth the chain needs next (None: not anchored yet)
    expected_id: bytes | None  # the id that event must have
    stored: int = 0
    refusals: list[tuple[int, Refused]] = field(default_factory=list)


class BackfillPuller:
    """Pulls up to ``limit`` events of ``room_id`` from ``peer``.

    Drive it: ``start(now)``, then for each :class:`SendRequest` answer
    ``page_received(status, body, now)``. ``keys_updated(now)`` after a
    :class:`NeedKeys` was satisfied (or could not be). The pull is over when
    a :class:`BackfillDone` comes out.
    """

    def __init__(self, *, server_name: str, room_id: str, peer: str, key: SigningKey, keys: KeyCache,
                 limit: int = MAX_PULL, page_size: int = PAGE_CAP, anchor: tuple[int, bytes | None] | None = None,
                 until: tuple[int, bytes] | None = None, verifier: BatchVerifier = verify_batch,
                 lookup: KeyLookup | None = None) -> None:
        if not 0 < limit <= MAX_PULL:
            raise LocalProtocolError(f"a pull takes 1 to {MAX_PULL} events")
        if not 0 < page_size <= PAGE_CAP:
            raise LocalProtocolError(f"page_size is 1 to {PAGE_CAP}")
        self.server_name, self.room_id, self.peer = server_name, room_id, peer
        self.key, self.keys, self.limit, self.page_size, self.verifier = key, keys, limit, page_size, verifier
        # Whose keys verify the pages: the cache by default; a host passes one that
        # also knows its own keys (a page can hold proposals our own users made).
        self.lookup: KeyLookup = lookup or keys.keys
        if anchor is None:
            self._p = _Progress(None, None)
        else:
            depth, prev = anchor
            self._p = _Progress(depth - 1, prev)
        if until is not None and (anchor is not None or until[0] < 1 or len(until[1]) != 32):
            raise LocalProtocolError("until is our head (depth >= 1, 32-byte id), without an anchor")
        self.until = None if until is None else (until[0], bytes(until[1]))
        self._held: list[Event] = []  # catching up: linked events, stored once the chain reaches `until`
        self._joined = False  # catching up: the chain reached `until`
        self._buffer: dict[int, Event] = {}
        self._pending: list[Page] = []
        self._fresh = 0  # events the page being processed added to the buffer
        self.done: BackfillDone | None = None
        self.requests = 0  # page requests made so far (retries of the same page not counted)
        self.retries = 0  # the current page asked again in a row (see PAGE_RETRIES)
        self._prefetched: SendRequest | None = None  # asked for ahead (see prefetch)
        self._decoded: tuple[bytes, Page | Refused] | None = None  # the page prefetch decoded
        self.budget = request_budget(limit, page_size)
        if anchor is not None and (anchor[0] <= 1 or anchor[1] is None):
            self.done = BackfillDone(room_id, peer, 0, True)

    # -- resume cursors -------------------------------------------------------------

    def cursor(self) -> bytes:
        """Opaque resume state, saved with each stored page."""
        fields: dict[str, object] = {"room_id": self.room_id, "peer": self.peer, "next_depth": self._p.next_depth,
                                     "expected_id": self._p.expected_id, "stored": self._p.stored, "limit": self.limit}
        if self.until is not None:
            # Catching up stores all or nothing, so it resumes from the top.
            fields.update(next_depth=None, expected_id=None, stored=0, until=list(self.until))
        return encode(fields)

    @classmethod
    def resume(cls, cursor: bytes, *, server_name: str, key: SigningKey, keys: KeyCache,
               page_size: int = PAGE_CAP, verifier: BatchVerifier = verify_batch,
               lookup: KeyLookup | None = None) -> "BackfillPuller":
        """Continue a pull from a saved :meth:`cursor` (our own bytes, from storage)."""
        c = decode(cursor, max_size=4096)
        plain = {"room_id", "peer", "next_depth", "expected_id", "stored", "limit"}
        if not isinstance(c, dict) or set(c) not in (plain, plain | {"until"}):
            raise LocalProtocolError("not a backfill cursor")
        until = c.get("until")
        puller = cls(server_name=server_name, room_id=c["room_id"], peer=c["peer"], key=key, keys=keys,
                     limit=c["limit"], page_size=page_size, until=tuple(until) if until else None, verifier=verifier,
                     lookup=lookup)
        if until is None:
            puller._p = _Progress(c["next_depth"], c["expected_id"], c["stored"])
            puller.budget = request_budget(c["limit"] - c["stored"], page_size)
        if c["next_depth"] is not None and c["next_depth"] < 1 or c["stored"] >= c["limit"]:
            puller.done = BackfillDone(puller.room_id, puller.peer, c["stored"], c["next_depth"] == 0)
        return puller

    @property
    def stored(self) -> int:
        """Events stored by this pull so far (resumed pulls count earlier pages)."""
        return self._p.stored

    @property
    def refusals(self) -> list[tuple[int, Refused]]:
        """Events refused so far, as ``(position, refusal)``."""
        return list(self._p.refusals)

    # -- driving ------------------------------------------------------------------

    def start(self, now: int) -> list[Effect]:
        """The first page request (or the end, if there is nothing to pull)."""
        if self.done is not None:
            return [self.done]
        return [self._request(now)]

    def _next(self, now: int, answered: bool, moved: bool) -> list[Effect]:
        """After a page: the next request, or the end when the page moved nothing
        (linked no event and brought no new one the chain can reach) or the
        budget is spent (see the module doc)."""
        if not moved:
            if answered:
                # The page for our own cursor brought nothing the chain needs:
                # the host has nothing older to give.
                return self._finish(None)
            return self._finish(Refused(Code.NO_PROGRESS, f"{self.peer} answered page {self.requests} "
                                                          f"with nothing that moves the chain"))
        ahead, self._prefetched = self._prefetched, None
        wanted = backfill_target(self.room_id, self._current_before(), min(self.page_size, self.limit - self._p.stored))
        if ahead is not None and ahead.target == wanted:
            return [ahead]  # asked for already (counted then)
        if self.requests >= self.budget:
            return self._finish(Refused(Code.NO_PROGRESS, f"{self.peer} needed more than {self.budget} pages "
                                                          f"for {self.limit} events"))
        return [self._request(now)]

    def _request(self, now: int) -> SendRequest:
        return self._request_for(self._current_before(), self.limit - self._p.stored, now)

    def _request_for(self, before: int | None, remaining: int, now: int, *, retry: bool = False) -> SendRequest:
        if not retry:
            self.requests += 1
        target = backfill_target(self.room_id, before, min(self.page_size, remaining))
        auth = sign_request(self.key, origin=self.server_name, destination=self.peer, method="GET",
                            target=target, body=b"", now=now)
        return SendRequest(self.peer, "GET", target, b"", auth, now if retry else 0)

    def prefetch(self, status: int, body: bytes, now: int) -> SendRequest | None:
        """Ask for the next page while this one is verified: call with a page
        that just arrived, *before* :meth:`page_received`.

        Returns the request for the page that follows ``body`` if the chain
        links all of it (what an honest host's page does), or None: an error,
        a page of nothing, the last page the pull needs, a catch-up (it stops
        at our head), the budget spent, or a request already ahead. The
        request counts against the budget. Send it at once; when the
        :class:`SendRequest` that comes out next *is* this object, answer
        with its reply (it was the right guess). When another request or the
        end comes out instead, drop its reply: the page did not link as it
        said, and the pull asks again for what it needs, within its budget.
        """
        if self.done is not None or self.until is not None or status != 200 or self._prefetched is not None:
            return None
        page = decode_page(body)
        self._decoded = (body, page)
        if isinstance(page, Refused) or page.room_id != self.room_id or not page.events or page.next is None:
            return None
        remaining = self.limit - self._p.stored - len(page.events)
        if remaining <= 0 or self.requests >= self.budget:
            return None
        self._prefetched = self._request_for(page.next, remaining, now)
        return self._prefetched

    def page_received(self, status: int, body: bytes, now: int) -> list[Effect]:
        """A page (or an error reply) arrived. Returns what to store and what next."""
        if self.done is not None:
            return [self.done]
        if status != 200:
            from .handshake import decode_refusal

            self._decoded = None
            refusal = decode_refusal(status, body)
            if refusal.code in PAGE_RETRY_CODES and self.retries < PAGE_RETRIES:
                # The page we need now (an answer to a page asked ahead is for it too),
                # signed for the time it may go.
                self._prefetched = None
                at = now + PAGE_RETRY_MS * 2 ** self.retries
                self.retries += 1
                return [self._request_for(self._current_before(), self.limit - self._p.stored, at, retry=True)]
            return self._finish(refusal)
        self.retries = 0
        decoded, self._decoded = self._decoded, None
        page = decoded[1] if decoded is not None and decoded[0] is body else decode_page(body)
        if isinstance(page, Refused):
            return self._finish(page)
        if page.room_id != self.room_id:
            return self._finish(Refused(Code.WRONG_ROOM, f"asked for {self.room_id}, page is of {page.room_id[:100]}"))
        self._pending.append(page)
        return self._process(now)

    def keys_updated(self, now: int) -> list[Effect]:
        """Call after the descriptor asked for by :class:`NeedKeys` was fed to the cache."""
        if self.done is not None:
            return [self.done]
        return self._process(now, retry=True)

    def fail(self, refusal: Refused) -> list[Effect]:
        """The host cannot carry on (transport failure); ends the pull, resumable."""
        return self._finish(refusal)

    # -- internals ---------------------------------------------------------------------

    def _finish(self, refusal: Refused | None) -> list[Effect]:
        self._prefetched = None  # a page asked for ahead is not needed any more
        if self.until is not None and not self._joined:
            # Catching up ends here without reaching our head: nothing was stored.
            if refusal is None:
                refusal = Refused(Code.CHAIN_BROKEN, f"the host's history did not reach our head at depth "
                                                     f"{self.until[0]} within {self.limit} events")
            self._p.stored, self._held = 0, []
        self.done = BackfillDone(self.room_id, self.peer, self._p.stored, self._p.next_depth == 0, refusal)
        out: list[Effect] = []
        if refusal is not None:
            out.append(Failed(self.peer, refusal))
        out.append(self.done)
        return out

    def _current_before(self) -> int | None:
        return None if self._p.next_depth is None else self._p.next_depth + 1

    def _process(self, now: int, retry: bool = False) -> list[Effect]:
        pages, self._pending = self._pending, []
        current = self._current_before()
        answered = False
        self._fresh = 0
        for page in pages:
            results = verify_events(page.events, self.lookup, verifier=self.verifier)
            need = next((r for r in results if isinstance(r, NeedKeys)), None)
            if need is not None:
                if retry or not self.keys.may_fetch(need.server, now, need.key_id):
                    return self._finish(Refused(Code.UNKNOWN_KEY, f"{need.server} has no key {need.key_id}"))
                self._pending = [page] + self._pending
                return [need]
            answered = answered or page.before == current
            if page.before is None and self._p.next_depth is None:
                self._anchor_at_head(results)
            for position, result in enumerate(results):
                self._take(result, position)
        return self._link(now, answered)

    def _anchor_at_head(self, results: list[Event | Refused | NeedKeys]) -> None:
        heads = [r for r in results if isinstance(r, Event) and r.depth > 0]
        if heads:
            top = max(heads, key=lambda e: e.depth)
            self._p.next_depth, self._p.expected_id = top.depth, top.event_id

    def _take(self, result: Event | Refused | NeedKeys, position: int) -> None:
        next_depth = self._p.next_depth
        if isinstance(result, Refused):
            self._p.refusals.append((position, result))
            return
        if not isinstance(result, Event):
            return
        if result.room_id != self.room_id or result.depth == 0:
            self._p.refusals.append((position, Refused(
                Code.WRONG_ROOM, f"event {result.id_text} is not a chained event of {self.room_id}")))
            return
        remaining = self.limit - self._p.stored
        # Buffer only what the chain can still reach: bounded by the pull's limit.
        if next_depth is None or next_depth - remaining < result.depth <= next_depth:
            if result.depth not in self._buffer:
                self._buffer[result.depth] = result
                self._fresh += 1

    def _link(self, now: int, answered: bool) -> list[Effect]:
        linked: list[Event] = []
        p = self._p
        floor = 1 if self.until is None else self.until[0] + 1  # the lowest depth this pull stores
        while p.next_depth is not None and p.next_depth >= floor and p.stored < self.limit:
            event = self._buffer.pop(p.next_depth, None)
            if event is None:
                break
            if p.expected_id is not None and event.event_id != p.expected_id:
                refusal = Refused(Code.CHAIN_BROKEN, f"event at depth {event.depth} is not the one the chain links to")
                p.refusals.append((event.depth, refusal))
                continue
            linked.append(event)
            p.stored += 1
            p.expected_id = event.prev
            p.next_depth = event.depth - 1
        if p.next_depth is None:
            # Not anchored yet: pages that came before the head page wait for it.
            # The chain can only ever use the newest ``limit`` of them.
            newest = sorted(self._buffer, reverse=True)[: self.limit]
            self._buffer = {d: self._buffer[d] for d in newest}
        else:
            # Anything left above the chain is stale (duplicates, or below a gap we wait for).
            self._buffer = {d: e for d, e in self._buffer.items() if d <= p.next_depth}
        if self.until is not None:
            return self._caught_up(linked, now, answered)
        out: list[Effect] = []
        if linked:
            out.append(StoreEvents(self.room_id, tuple(linked), self.cursor()))
        reached_start = p.next_depth == 0
        if reached_start or p.stored >= self.limit:
            return out + self._finish(None)
        if p.refusals and p.next_depth is not None and p.next_depth not in self._buffer:
            # The chain cannot pass the refused event: stop, resumable here.
            return out + self._finish(p.refusals[-1][1])
        return out + self._next(now, answered, bool(linked or self._fresh))

    def _caught_up(self, linked: list[Event], now: int, answered: bool) -> list[Effect]:
        """:meth:`_link`'s ending when catching up: store all or nothing."""
        p, (depth, event_id) = self._p, self.until  # type: ignore[misc]
        self._held += linked
        if p.next_depth is not None and p.next_depth <= depth:
            if p.next_depth == depth and p.expected_id == event_id:
                held, self._held, self._joined = tuple(self._held), [], True
                out: list[Effect] = [StoreEvents(self.room_id, held, self.cursor())] if held else []
                return out + self._finish(None)
            return self._finish(Refused(Code.CHAIN_BROKEN,
                                        f"the host's chain does not hold our event at depth {depth}"))
        if p.stored >= self.limit:
            return self._finish(None)
        if p.refusals and p.next_depth is not None and p.next_depth not in self._buffer:
            return self._finish(p.refusals[-1][1])
        return self._next(now, answered, bool(linked or self._fresh))
