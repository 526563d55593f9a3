"""Async access to storage for the Trio daemon: every :class:`Store` method as a coroutine.

Each call runs on the store's one worker thread, in the order they were made,
so the event loop never blocks on the database (SQLite or PostgreSQL: both
drivers block) and there is exactly one user of the connection.
"""

from __future__ import annotations

import functools
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import outcome
import trio

from .dialect import DB_ERRORS, OPERATIONAL_ERRORS, TXN_RETRY_ERRORS
from .schema import StorageError
from .store import Store

__all__ = ["AsyncStore", "storage_fault"]

log = logging.getLogger("scaiwave.storage")

#: How often a call PostgreSQL rolled back to break a deadlock with another
#: worker's transaction is run again (each run is a whole new transaction).
TXN_RETRIES = 5


def _capture(fn: Callable[[], object]) -> outcome.Outcome:
    """Run one storage call; run it again when the database rolled its whole
    transaction back to break a deadlock with another worker (nothing of it
    stands, so running it again is safe and is what the database asks)."""
    for _ in range(TXN_RETRIES):
        result = outcome.capture(fn)
        if not (isinstance(result, outcome.Error) and isinstance(result.error, TXN_RETRY_ERRORS)):
            return result
    return result


#: What a storage call may fail with that may be the storage's fault (a full disk, a lost server).
_DB_OR_OS_ERRORS: tuple[type[BaseException], ...] = (*DB_ERRORS, OSError)

#: SQLite's primary result codes for a disk that is full or failing: the call
#: changed nothing (SQLite rolled back) and may work once the admin frees space.
_FAULTS = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY,
           sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def storage_fault(exc: BaseException) -> StorageError | None:
    """``exc`` as a retryable :class:`StorageError` (``unavailable``) if it is a
    disk that is full or failing (or an OS error under SQLite), or a
    PostgreSQL server that is gone, full or shutting down, else ``None``."""
    if isinstance(exc, OPERATIONAL_ERRORS):
        return StorageError("unavailable", f"storage unavailable (database server): {str(exc)[:160]}")
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None or code & 0xFF not in _FAULTS:
            return None
    elif not isinstance(exc, OSError):
        return None
    return StorageError("unavailable", f"storage unavailable (disk full or failing): {str(exc)[:160]}")

# ------------------------------------------------------------------- async

#: How long a group's commit waits, at most, for writes announced as coming
#: (see AsyncStore.run's ``write_follows``): a durable commit costs this
#: machine about 330 us of CPU, and concurrent posts share it.
COMMIT_WAIT_S = 0.001

P = ParamSpec("P")
R = TypeVar("R")


def _offload(
    method: Callable[Concatenate[Store, P], R],
) -> Callable[Concatenate[AsyncStore, P], Awaitable[R]]:
    """Make a ``Store`` method into an ``AsyncStore`` coroutine method with the
    same name, docs and (for type checkers, through ParamSpec) signature."""

    name = method.__name__

    async def call(self: AsyncStore, *args: P.args, **kwargs: P.kwargs) -> R:
        # Looked up on the store, not bound to Store's: a backend may override it.
        return await self.run(lambda store: getattr(store, name)(*args, **kwargs))

    return functools.wraps(method)(call)


class _Job:
    """One storage call: ``fn`` on the worker thread, then ``complete`` in the Trio thread."""

    __slots__ = ("fn", "grouped", "early", "write_follows", "then", "token", "result", "task", "done")

    def __init__(self, fn: Callable[[], object], grouped: bool, then: Callable[[Any], None] | None,
                 early: bool = False, write_follows: bool = False) -> None:
        self.fn, self.grouped, self.early, self.then = fn, grouped, early, then
        self.write_follows = write_follows
        self.token = trio.lowlevel.current_trio_token()
        self.result: outcome.Outcome | None = None
        self.task: trio.lowlevel.Task | None = None
        self.done = False

    def deliver(self, result: outcome.Outcome) -> None:
        """From the worker thread, in job order. ``run_sync_soon`` runs its
        callbacks in the order they came, so ``then`` runs in job order too."""
        self.fn = None  # type: ignore[assignment]  # drop what the call held, now
        try:
            self.token.run_sync_soon(self._complete, result)
        except trio.RunFinishedError:
            pass  # the loop is gone, and the caller with it

    def _complete(self, result: outcome.Outcome) -> None:
        if self.then is not None and isinstance(result, outcome.Value):
            result = outcome.capture(self.then, result.value)
        self.result, self.done = result, True
        if self.task is not None:
            trio.lowlevel.reschedule(self.task, result)

    async def wait(self) -> Any:
        """The call's result. A cancel waits for the call to finish
        (Abort.FAILED); it lands at the caller's next checkpoint, with the
        call's result in hand."""
        try:
            if self.done:
                await trio.lowlevel.cancel_shielded_checkpoint()
                assert self.result is not None
                return self.result.unwrap()
            self.task = trio.lowlevel.current_task()
            return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        except _DB_OR_OS_ERRORS as exc:
            fault = storage_fault(exc)
            if fault is None:
                raise
            log.error("%s", fault)
            raise fault from exc


class _Worker:
    """The one thread a store's calls run on, in the order they were queued.

    Cheaper than ``trio.to_thread.run_sync`` per call, which a storage round
    trip on the daemon's hot paths paid for a capacity limiter, a context copy
    and two thread renames (``pthread_setname_np``) each time: about a sixth
    of the sender's event-loop time while clients posted.

    **Group commit.** Writes submitted with ``group=True`` that are queued
    one after another run in one SQLite transaction, each in a savepoint of
    it (``Store._write`` nests), and share one durable commit: several posts
    waiting on one fsync instead of one fsync each. None of them is answered
    before that commit: a job that fails alone (a conflict) is rolled back to
    its savepoint and fails alone; a failing disk, or a failed commit, fails
    every job of the group, and nothing of the group is stored.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        #: Writes announced by early reads (``write_follows``) and not queued yet: an estimate
        #: (updated from two threads without a lock; a wait that sees nothing come resets it).
        self.writes_coming = 0
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    def submit(self, job: _Job) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="scaiwave-storage", daemon=True)
            self.thread.start()
        self.jobs.put(job)

    def stop(self) -> None:
        if self.thread is not None:
            self.jobs.put(None)
            self.thread = None

    def _work(self) -> None:
        group: list[_Job] = []
        while True:
            batch = [self.jobs.get()]  # everything waiting: one look at the queue per round
            while True:
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            waited_until = None
            while batch:
                for job in batch:
                    if job is None:  # stop (after what came before it)
                        self._run_group(group)
                        return
                    if job.grouped:
                        group.append(job)
                    elif job.early:
                        job.deliver(_capture(job.fn))  # before the writes queued ahead of it
                        if job.write_follows:
                            self.writes_coming += 1
                    else:
                        self._run_group(group)
                        group = []
                        job.deliver(_capture(job.fn))
                batch = []
                # Group commit's wait: writes are on their way (their callers' reads
                # were just answered), so the commit waits a moment for them to share it.
                if group and self.writes_coming > 0:
                    now = time.monotonic()
                    waited_until = waited_until or now + COMMIT_WAIT_S
                    try:
                        if now < waited_until:
                            batch = [self.jobs.get(timeout=waited_until - now)]
                    except queue.Empty:
                        self.writes_coming = 0  # none came: whatever was counted is not coming
            self._run_group(group)
            group = []

    def _run_group(self, group: list[_Job]) -> None:
        if not group:
            return
        if len(group) == 1:
            group[0].deliver(_capture(group[0].fn))
            return
        store = self.store
        db = store.db
        results: list[outcome.Outcome] = []
        fault: BaseException | None = None
        try:
            db.execute("BEGIN IMMEDIATE")
        except BaseException as exc:  # noqa: BLE001 - every job of the group gets it
            fault = exc
        if fault is None:
            for job in group:
                result = outcome.capture(job.fn)
                if isinstance(result, outcome.Error) and (
                        isinstance(result.error, _DB_OR_OS_ERRORS) or not store._group_usable()):
                    fault = result.error  # the disk failed under the group: none of it stands
                    break
                results.append(result)
            if fault is None and not store._group_usable():
                # (PostgreSQL answers COMMIT of an aborted transaction with a rollback, not an error.)
                fault = StorageError("unavailable", "the grouped transaction was aborted")
            if fault is None:
                try:
                    db.execute("COMMIT")
                except BaseException as exc:  # noqa: BLE001
                    fault = exc
            if fault is not None and store._in_transaction():
                try:
                    db.execute("ROLLBACK")
                except DB_ERRORS:
                    pass
        if fault is not None and isinstance(fault, TXN_RETRY_ERRORS):
            # The database broke a deadlock with another worker by rolling the
            # whole group back: each write again, in a transaction of its own.
            results, fault = [_capture(job.fn) for job in group], None
        if fault is not None:
            results = [outcome.Error(fault) for _ in group]
        for job, done in zip(group, results):
            job.deliver(done)


class AsyncStore:
    """The daemon's storage: every :class:`Store` method, as a coroutine.

    Each call runs on the store's worker thread: one call at a time, in the
    order they were made (one writer, one user of the connection), and the
    Trio loop keeps running meanwhile. A cancelled call is not abandoned: its
    caller waits until the SQLite transaction has committed or rolled back, so
    a cancel scope can never leave half a write, nor two threads on the connection.
    """

    def __init__(self, store: Store) -> None:
        """Wrap an open :class:`Store`; the daemon uses :meth:`open`."""
        self.sync = store
        self._worker = _Worker(store)

    @classmethod
    async def open(cls, target: Path | str) -> AsyncStore:
        """Open the database (a data directory or a ``postgresql://`` URL) on
        a worker thread; raises like :meth:`Store.open`."""
        return cls(await trio.to_thread.run_sync(Store.open, target))

    async def run(self, fn: Callable[[Store], R], *, early: bool = False, write_follows: bool = False) -> R:
        """Run ``fn(store)`` on the storage thread and return its result: for
        several calls that no other task's call may come between.

        ``early``: ``fn`` only reads, and may run before grouped writes queued
        ahead of it (they are waiting for their commit, not yet answered: it
        reads the state before them, as if it had come first). So a post's
        reads do not split the group of the writes around them.
        ``write_follows``: the caller will most likely submit a grouped write
        next (a post): a group's commit waits up to :data:`COMMIT_WAIT_S` for
        such writes to share it (group commit's "commit delay").

        A full or failing disk raises :class:`StorageError` ``unavailable``
        (the transaction was rolled back: nothing of it is stored)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        store = self.sync
        job = _Job(lambda: fn(store), False, None, early, write_follows and early)
        self._worker.submit(job)
        return await job.wait()

    def submit(self, fn: Callable[[Store], R], *, group: bool = False,
               then: Callable[[R], Any] | None = None) -> _Job:
        """Queue ``fn(store)`` at once (calls run in the order they are
        submitted) and return its job; ``await job.wait()`` for the result.

        ``group``: ``fn`` is one write (its changes in ``Store._write``) that
        may share its transaction and durable commit with the grouped writes
        queued next to it (see :class:`_Worker`); its result comes only after
        that commit. ``then(result)`` runs in the Trio thread as the call
        completes, before the ``then`` of any call that completes after it
        (whichever task gets to run first): grouped writes complete in the
        order they were submitted. Its return value is the job's result."""
        store = self.sync
        job = _Job(lambda: fn(store), group, then)
        if group and self._worker.writes_coming > 0:
            self._worker.writes_coming -= 1
        self._worker.submit(job)
        return job

    async def __aenter__(self) -> AsyncStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection. Idempotent."""
        try:
            await self.run(Store.close)
        finally:
            self._worker.stop()

    describe = _offload(Store.describe)
    probe_write = _offload(Store.probe_write)
    schema_version = _offload(Store.schema_version)
    save_keyring = _offload(Store.save_keyring)
    load_keyring = _offload(Store.load_keyring)
    get_policy = _offload(Store.get_policy)
    set_policy = _offload(Store.set_policy)
    get_peer = _offload(Store.get_peer)
    list_peers = _offload(Store.list_peers)
    upsert_peer = _offload(Store.upsert_peer)
    mark_seen = _offload(Store.mark_seen)
    mark_error = _offload(Store.mark_error)
    save_descriptor = _offload(Store.save_descriptor)
    create_tenant = _offload(Store.create_tenant)
    get_tenant = _offload(Store.get_tenant)
    list_tenants = _offload(Store.list_tenants)
    set_tenant_federation = _offload(Store.set_tenant_federation)
    create_user = _offload(Store.create_user)
    get_user = _offload(Store.get_user)
    user_by_token_hash = _offload(Store.user_by_token_hash)
    deactivate_user = _offload(Store.deactivate_user)
    set_token_hash = _offload(Store.set_token_hash)
    client_txn = _offload(Store.client_txn)
    save_client_txn = _offload(Store.save_client_txn)
    paused_peers = _offload(Store.paused_peers)
    set_paused = _offload(Store.set_paused)
    forget_peer = _offload(Store.forget_peer)
    list_users = _offload(Store.list_users)
    create_room = _offload(Store.create_room)
    create_room_with = _offload(Store.create_room_with)
    get_room = _offload(Store.get_room)
    set_membership = _offload(Store.set_membership)
    members = _offload(Store.members)
    rooms_for_user = _offload(Store.rooms_for_user)
    store_events = _offload(Store.store_events)
    event_at = _offload(Store.event_at)
    proposal_chained = _offload(Store.proposal_chained)
    head = _offload(Store.head)
    page_before = _offload(Store.page_before)
    events_after = _offload(Store.events_after)
    event_count = _offload(Store.event_count)
    get_event = _offload(Store.get_event)
    depths = _offload(Store.depths)
    save_invite = _offload(Store.save_invite)
    get_invite = _offload(Store.get_invite)
    pending_invites = _offload(Store.pending_invites)
    set_invite_state = _offload(Store.set_invite_state)
    get_cursor = _offload(Store.get_cursor)
    clear_cursor = _offload(Store.clear_cursor)
    remember_nonce = _offload(Store.remember_nonce)
    live_nonces = _offload(Store.live_nonces)
    expire_nonces = _offload(Store.expire_nonces)
    get_txn_response = _offload(Store.get_txn_response)
    save_txn_response = _offload(Store.save_txn_response)
    store_txn = _offload(Store.store_txn)
    prune_txns = _offload(Store.prune_txns)
    enqueue = _offload(Store.enqueue)
    enqueue_many = _offload(Store.enqueue_many)
    store_events_and_enqueue = _offload(Store.store_events_and_enqueue)
    delivered_many = _offload(Store.delivered_many)
    due = _offload(Store.due)
    next_due_at = _offload(Store.next_due_at)
    pending_count = _offload(Store.pending_count)
    mark_attempt = _offload(Store.mark_attempt)
    delivered = _offload(Store.delivered)
    reset_retry = _offload(Store.reset_retry)
    claim_lease = _offload(Store.claim_lease)
    renew_leases = _offload(Store.renew_leases)
    release_lease = _offload(Store.release_lease)
    lease_rows = _offload(Store.lease_rows)
    outbox_between = _offload(Store.outbox_between)
    shared_generation = _offload(Store.shared_generation)
    outbox_after = _offload(Store.outbox_after)
    outbox_ids = _offload(Store.outbox_ids)
    outbox_rows = _offload(Store.outbox_rows)
    outbox_from = _offload(Store.outbox_from)
    queued_peers = _offload(Store.queued_peers)
    shared_change = _offload(Store.shared_change)
    save_job = _offload(Store.save_job)
    get_job = _offload(Store.get_job)
    prune_jobs = _offload(Store.prune_jobs)
