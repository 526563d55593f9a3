"""Backfill jobs: admin pulls and catch-ups, the daemon's half of ``core.backfill``.

The puller decides what to ask for and what to store; this drives it with
fetching, verifying and storing overlapped (see ``BackfillJobs._pull``). A
mixin of :class:`~.service.Service`: it uses the service's storage, node,
clock, ``send`` and descriptor fetching.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from scaiwave_federation.core import (
    MAX_PULL,
    BackfillDone,
    BackfillPuller,
    Code,
    Event,
    Failed,
    Head,
    NeedKeys,
    Refused,
    SendRequest,
    StoreEvents,
)

from ..http.limits import Gate, fetch_cause
from ..store.async_store import AsyncStore
from ..store.store import StorageError
from .timings import PageTimer, VerifyClock, Work

log = logging.getLogger("scaiwave.service")

__all__ = ["BackfillJob", "BackfillJobs"]


@dataclass
class BackfillJob:
    """A running or finished backfill, as the admin API shows it."""

    id: int
    room_id: str
    peer: str
    limit: int
    stored: int = 0
    state: str = "running"
    error: dict | None = None
    refused: list[dict] = field(default_factory=list)
    reached_start: bool = False
    #: How many events this pull will store in all, once a page has shown how
    #: deep the room goes (None before): the progress bar's total.
    expected: int | None = None
    #: Catching up: our head of the room when the gap was seen (see BackfillPuller's ``until``).
    until: tuple[int, bytes] | None = None
    done: trio.Event = field(default_factory=trio.Event, repr=False)

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "room_id": self.room_id, "peer": self.peer, "limit": self.limit,
                "stored": self.stored, "state": self.state, "error": self.error, "refused": self.refused,
                "reached_start": self.reached_start, "catch_up": self.until is not None, "expected": self.expected}


class BackfillJobs:
    """Admin backfills and catch-ups (see the module doc)."""

    # What its host, Service, provides (declared so that types are checked).
    store: Any
    node: Any
    config: Any
    jobs: dict[int, BackfillJob]
    limits: Gate
    _catch_ups: dict[str, BackfillJob]
    _wake_catch_up: trio.Event
    _catch_up_slots: dict[str, trio.CapacityLimiter]

    if TYPE_CHECKING:
        @property
        def verify_clock(self) -> VerifyClock | None: ...
        def now(self) -> int: ...
        def record(self, kind: str, **fields: Any) -> None: ...
        def node_event(self, envelope: bytes) -> Event: ...
        def room_lock(self, room_id: str) -> trio.Lock: ...
        async def ensure_peered(self, peer: str) -> Refused | None: ...
        async def send(self, effect: SendRequest) -> tuple[int, bytes] | Refused: ...
        async def head_of(self, room_id: str) -> Head | None: ...
        async def learn_descriptor(self, server: str, *, force: bool = False,
                                   key_id: str | None = None) -> Refused | None: ...
        async def peer_error(self, server: str, refusal: Refused) -> None: ...
        async def take_pull(self, room_id: str) -> bool: ...
        async def end_pull(self, room_id: str) -> None: ...

    # -- catching up: a member server that missed events fills the gap -----------------

    async def request_catch_up(self, room_id: str, host: str, head: Head) -> None:
        """A chained event arrived above a gap over our ``head``: pull the
        missing events from the room's host (once per room at a time)."""
        if room_id in self._catch_ups:
            return
        job = BackfillJob(id=0, room_id=room_id, peer=host, limit=MAX_PULL, until=(head.depth, head.event_id))
        self._catch_ups[room_id] = job  # taken before the id is: one catch-up per room
        try:
            await self._new_job(job)
        except StorageError as exc:  # the next event above the gap asks again
            self._catch_ups.pop(room_id, None)
            log.warning("%s: catch-up not started: %s", room_id, exc)
            return
        except BaseException:
            self._catch_ups.pop(room_id, None)
            raise
        log.info("%s: events missing above depth %s; catching up from %s (job %s)", room_id, head.depth, host, job.id)
        self._wake_catch_up.set()

    async def catch_up_worker(self) -> None:
        """Run requested catch-ups side by side, at most ``catch_ups_per_peer``
        from one host at once (the daemon starts this): a host that trickles
        its pages holds up only its own rooms, never another host's."""
        started: set[int] = set()
        async with trio.open_nursery() as nursery:
            while True:
                await self._wake_catch_up.wait()
                self._wake_catch_up = trio.Event()
                for job in list(self._catch_ups.values()):
                    if job.id and job.id not in started:  # (0: its id is being assigned)
                        started.add(job.id)
                        nursery.start_soon(self._catch_up, job, started)

    async def _catch_up(self, job: BackfillJob, started: set[int]) -> None:
        slots = self._catch_up_slots.setdefault(job.peer, trio.CapacityLimiter(self.config.catch_ups_per_peer))
        try:
            async with slots:
                # Descriptor fetches this pull causes are charged to the host.
                fetch_cause.set(job.peer)
                if await self.take_pull(job.room_id):
                    try:
                        await self._run_backfill(job)
                    finally:
                        await self.end_pull(job.room_id)
                else:  # another worker is filling this room's gap: once is enough
                    job.state = "done"
                    job.done.set()
                    try:
                        await self.store.save_job(job.id, job.view(), self.now())
                    except StorageError as exc:
                        log.warning("backfill job %s not saved: %s", job.id, exc)
        finally:
            self._catch_ups.pop(job.room_id, None)
            started.discard(job.id)
            if not slots.borrowed_tokens and slots.statistics().tasks_waiting == 0:
                self._catch_up_slots.pop(job.peer, None)

    # -- backfill ------------------------------------------------------------------

    async def start_backfill(self, nursery: trio.Nursery, room_id: str, peer: str, limit: int) -> BackfillJob:
        job = BackfillJob(id=0, room_id=room_id, peer=peer, limit=limit)
        await self._new_job(job)
        nursery.start_soon(self._run_admin_backfill, job)
        return job

    async def _new_job(self, job: BackfillJob) -> None:
        """Give ``job`` its id: a row in the shared jobs table, so that every
        worker's admin API answers for it."""
        job.id = await self.store.save_job(None, job.view(), self.now())
        self.jobs[job.id] = job

    async def job_view(self, job_id: int) -> dict[str, Any] | None:
        """A job's admin view: this worker's own, or any worker's (as last saved)."""
        job = self.jobs.get(job_id)
        return job.view() if job is not None else await self.store.get_job(job_id)

    async def _run_admin_backfill(self, job: BackfillJob) -> None:
        """An admin's pull, holding the room's pull lease (one pull of a room at
        a time across workers: two would store the same pages twice over)."""
        if not await self.take_pull(job.room_id):
            job.state = "failed"
            job.error = Refused(Code.CONFLICT, f"{job.room_id} is being pulled by another worker").as_dict()
            job.done.set()
            return
        try:
            await self._run_backfill(job)
        finally:
            await self.end_pull(job.room_id)

    async def _run_backfill(self, job: BackfillJob) -> None:
        try:
            await self._run_backfill_job(job)
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.store.save_job(job.id, job.view(), self.now())
                except StorageError as exc:  # the admin view of other workers lags; this one's is right
                    log.warning("backfill job %s not saved: %s", job.id, exc)

    async def _run_backfill_job(self, job: BackfillJob) -> None:
        try:
            await self._backfill(job)
        except StorageError as exc:
            # A page the store refuses (say a host that chained one proposal twice:
            # core/proposals.py): the pull stops there; what was stored stays.
            log.warning("backfill %s stopped: %s", job.id, exc)
            code = {"conflict": Code.CONFLICT, "unavailable": Code.STORAGE_UNAVAILABLE}.get(exc.code,
                                                                                          Code.INTERNAL_ERROR)
            job.state, job.error = "failed", Refused(code, str(exc)[:200]).as_dict()
        except Exception as exc:  # an unexpected failure must not kill the daemon
            log.exception("backfill %s failed", job.id)
            job.state, job.error = "failed", {"code": "internal_error", "message": str(exc)[:200]}
        finally:
            job.done.set()

    async def _backfill(self, job: BackfillJob) -> None:
        key = self.node.keyring.current
        if key is None:
            job.state, job.error = "failed", Refused(Code.OWN_KEY_MISSING).as_dict()
            return
        refusal = await self.ensure_peered(job.peer)
        if refusal is not None:
            job.state, job.error = "failed", refusal.as_dict()
            return
        saved = None if job.until is not None else await self.store.get_cursor(job.room_id, job.peer)
        if job.until is not None:
            puller = BackfillPuller(server_name=self.config.server_name, room_id=job.room_id, peer=job.peer,
                                    key=key, keys=self.node.keys, limit=job.limit, until=job.until,
                                    verifier=self.node.batch_verifier, lookup=self.node.lookup)
        elif saved is not None:
            puller = BackfillPuller.resume(saved["cursor"], server_name=self.config.server_name, key=key,
                                           keys=self.node.keys, verifier=self.node.batch_verifier, lookup=self.node.lookup)
            if puller.done is not None or puller.limit != job.limit:
                saved = None
        if saved is None and job.until is None:
            lowest = await self.store.events_after(job.room_id, None, 1)
            anchor = None
            if lowest:
                event = self.node_event(lowest[0]["envelope"])
                anchor = (event.depth, event.prev)
            puller = BackfillPuller(server_name=self.config.server_name, room_id=job.room_id, peer=job.peer,
                                    key=key, keys=self.node.keys, limit=job.limit, anchor=anchor,
                                    verifier=self.node.batch_verifier, lookup=self.node.lookup)
        self.record("backfill_start", room_id=job.room_id, peer=job.peer, limit=job.limit,
                    cursor=puller.cursor())
        base = puller.stored
        refused: StorageError | None = None
        async with trio.open_nursery() as nursery:
            try:
                await self._pull(job, puller, base, nursery)
            except StorageError as exc:
                refused = exc  # raised below, not wrapped in the nursery's exception group
            finally:
                nursery.cancel_scope.cancel()  # a page asked for ahead and not needed
        if refused is not None:
            raise refused

    async def _pull(self, job: BackfillJob, puller: BackfillPuller, base: int, nursery: trio.Nursery) -> None:
        """Drive the puller. Fetching, verifying and storing overlap: as a page
        arrives the puller names the page after it (``prefetch``), which is
        requested at once; the page is verified on a worker thread (its
        signatures on the verify pool, as always) while the page before it is
        stored (one durable write with its cursor, in page order)."""
        effects = puller.start(self.now())
        pages = PageTimer(self.verify_clock, self.record, puller)
        ahead: _Ahead | None = None
        pending: _PageStore | None = None  # the last page's events, stored while the next is verified
        while effects:
            effect = effects.pop(0)
            if not isinstance(effect, (SendRequest, StoreEvents)) or job.until is not None:
                pending = await self._store_now(pending)
            if isinstance(effect, SendRequest):
                if ahead is not None and ahead.request is effect:
                    result = await ahead.result()
                else:
                    if ahead is not None:
                        ahead.scope.cancel()  # the guess was wrong: its answer is not wanted
                    if effect.not_before:  # a page asked again after the host said "not now"
                        await trio.sleep(max(0, effect.not_before - self.now()) / 1000)
                    result = await self.send(effect)
                ahead = None
                if isinstance(result, Refused):
                    pending = await self._store_now(pending)
                    pages.flush()
                    effects += puller.fail(result)
                    continue
                guess = puller.prefetch(*result, self.now())
                if guess is not None:
                    ahead = _Ahead(guess)
                    nursery.start_soon(ahead.run, self.send)
                work = Work(stored=0)
                more = await trio.to_thread.run_sync(work.core, self.verify_clock, puller.page_received,
                                                     *result, self.now())
                pending = await self._store_now(pending)  # (under way since the page was checked)
                pages.begin(work)  # the last page's record, its store included
                effects += more
            elif isinstance(effect, StoreEvents) and job.until is None:
                if effect.events:  # the events below this page's lowest are still to come
                    job.expected = min(job.limit, puller.stored - base + min(e.depth for e in effect.events))
                pending = _PageStore(job, effect, pages.page, puller.stored, base, self.now())
                nursery.start_soon(pending.run, self.store)  # while the next page comes and is checked
                if not (effects and isinstance(effects[0], SendRequest)):
                    pending = await self._store_now(pending)  # no next page to overlap with
            elif isinstance(effect, StoreEvents) and job.until is not None:
                # The whole gap at once, and only onto the head it was pulled for.
                async with self.room_lock(job.room_id):
                    head = await self.head_of(job.room_id)
                    if head is not None and (head.depth, head.event_id) == job.until:
                        started = Work.store_started()
                        await self.store.store_events(job.room_id, [e.as_record() for e in effect.events])
                        pages.stored(started, len(effect.events))
                        job.stored = len(effect.events)
            elif isinstance(effect, NeedKeys):
                # Another pull may be fetching the same descriptor (catch-ups run side
                # by side): its answer is ours too.
                await self.limits.fetch_settled(effect.server)
                keys = self.node.lookup(effect.server)
                if keys is None or effect.key_id is None or not keys.knows(effect.key_id):
                    await self.learn_descriptor(effect.server, key_id=effect.key_id)
                effects += pages.more(puller.keys_updated, self.now())
            elif isinstance(effect, Failed):
                await self.peer_error(effect.server, effect.refusal)
            elif isinstance(effect, BackfillDone):
                pages.flush()
                log.info("backfill of %s from %s: %s events stored%s", job.room_id, job.peer, puller.stored - base,
                         f", stopped: {effect.refusal}" if effect.refusal else "")
                self.record("backfill_end", room_id=job.room_id, peer=job.peer, stored=effect.stored,
                            reached_start=effect.reached_start,
                            error=effect.refusal.as_dict() if effect.refusal else None)
                job.reached_start = effect.reached_start
                job.refused = [{"position": pos, **r.as_dict()} for pos, r in puller.refusals]
                if effect.refusal is not None:
                    job.state, job.error = "failed", effect.refusal.as_dict()
                else:
                    job.state, job.expected = "done", job.stored
                    if job.until is None:
                        await self.store.clear_cursor(job.room_id, job.peer)
                return

    async def _store_now(self, pending: _PageStore | None) -> _PageStore | None:
        """Finish a page's store (if not done yet) and raise what it met;
        ``None``: nothing is pending any more."""
        if pending is not None:
            await pending.run(self.store)
            if pending.failure is not None:
                raise pending.failure
        return None


class _PageStore:
    """One backfill page's events and cursor, stored in one write (see ``Service._pull``)."""

    def __init__(self, job: BackfillJob, effect: StoreEvents, work: Work | None, stored: int, base: int,
                 now: int) -> None:
        self.job, self.effect, self.work, self.stored, self.base, self.now = job, effect, work, stored, base, now
        self.failure: StorageError | None = None
        self._started = False
        self._done = trio.Event()

    async def run(self, store: AsyncStore) -> None:
        """Store it once; a second call waits for the first."""
        if self._started:
            await self._done.wait()
            return
        self._started = True
        job, records = self.job, [e.as_record() for e in self.effect.events]
        cursor = {"peer": job.peer, "cursor": self.effect.cursor, "stored": self.stored, "updated_at": self.now}
        # The job's progress, for every worker's admin API, as it will be once the page is stored.
        view = {**job.view(), "stored": self.stored - self.base}

        def write(sync: Any) -> None:
            # One storage call: the page and its cursor (one durable write),
            # then the progress (not flushed on its own), only if the page was stored.
            sync.store_events(job.room_id, records, cursor=cursor)
            sync.save_job(job.id, view, self.now)

        try:
            started = Work.store_started()
            await store.run(write)
            if self.work is not None:
                self.work.store_done(started, len(self.effect.events))
            job.stored = self.stored - self.base
        except StorageError as exc:
            self.failure = exc  # raised by whoever waits for it (not in a nursery's group)
        finally:
            self._done.set()


class _Ahead:
    """A page requested ahead (see ``Service._pull``): its answer, when it comes."""

    def __init__(self, request: SendRequest) -> None:
        self.request = request
        self.scope = trio.CancelScope()
        self._done = trio.Event()
        self._result: tuple[int, bytes] | Refused = Refused(Code.PEER_UNREACHABLE, "the request was not sent")

    async def run(self, send: Any) -> None:
        with self.scope:
            self._result = await send(self.request)
        self._done.set()

    async def result(self) -> tuple[int, bytes] | Refused:
        await self._done.wait()
        return self._result
