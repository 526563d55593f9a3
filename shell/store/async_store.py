"""Async access to storage for the Trio daemon: every :class:`Store` method as a coroutine.

Each call runs on a worker thread through a ``CapacityLimiter(1)``, so the
event loop never blocks on SQLite and there is exactly one writer.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

import trio

from .schema import StorageError
from .store import Store

__all__ = ["AsyncStore", "storage_fault"]

log = logging.getLogger("scaiwave.storage")

#: SQLite's primary result codes for a disk that is full or failing: the call
#: changed nothing (SQLite rolled back) and may work once the admin frees space.
_FAULTS = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY,
           sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def storage_fault(exc: BaseException) -> StorageError | None:
    """``exc`` as a retryable :class:`StorageError` (``unavailable``) if it is a
    disk that is full or failing (or an OS error under SQLite), else ``None``."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None or code & 0xFF not in _FAULTS:
            return None
    elif not isinstance(exc, OSError):
        return None
    return StorageError("unavailable", f"storage unavailable (disk full or failing): {str(exc)[:160]}")

# ------------------------------------------------------------------- async

P = ParamSpec("P")
R = TypeVar("R")


def _offload(
    method: Callable[Concatenate[Store, P], R],
) -> Callable[Concatenate[AsyncStore, P], Awaitable[R]]:
    """Make a ``Store`` method into an ``AsyncStore`` coroutine method with the
    same name, docs and (for type checkers, through ParamSpec) signature."""

    async def call(self: AsyncStore, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self.run(lambda store: method(store, *args, **kwargs))

    return functools.wraps(method)(call)


class AsyncStore:
    """The daemon's storage: every :class:`Store` method, as a coroutine.

    Each call runs on a worker thread through a ``CapacityLimiter(1)``: one
    call at a time (one writer, one user of the connection), and the Trio loop
    keeps running meanwhile. A cancelled call is not abandoned: its caller
    waits until the SQLite transaction has committed or rolled back, so a
    cancel scope can never leave half a write, nor two threads on the connection.
    """

    def __init__(self, store: Store) -> None:
        """Wrap an open :class:`Store`; the daemon uses :meth:`open`."""
        self.sync = store
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    async def open(cls, data_dir: Path | str) -> AsyncStore:
        """Open the database on a worker thread; raises like :meth:`Store.open`."""
        return cls(await trio.to_thread.run_sync(Store.open, data_dir))

    async def run(self, fn: Callable[[Store], R]) -> R:
        """Run ``fn(store)`` on the storage thread and return its result: for
        several calls that no other task's call may come between.

        A full or failing disk raises :class:`StorageError` ``unavailable``
        (the transaction was rolled back: nothing of it is stored)."""
        try:
            return await trio.to_thread.run_sync(fn, self.sync, limiter=self._limiter)
        except (sqlite3.Error, OSError) as exc:
            fault = storage_fault(exc)
            if fault is None:
                raise
            log.error("%s", fault)
            raise fault from exc

    async def __aenter__(self) -> AsyncStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    close = _offload(Store.close)
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
    events_before = _offload(Store.events_before)
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
    shared_generation = _offload(Store.shared_generation)
    outbox_after = _offload(Store.outbox_after)
    outbox_ids = _offload(Store.outbox_ids)
    outbox_rows = _offload(Store.outbox_rows)
    queued_peers = _offload(Store.queued_peers)
    shared_change = _offload(Store.shared_change)
    save_job = _offload(Store.save_job)
    get_job = _offload(Store.get_job)
    prune_jobs = _offload(Store.prune_jobs)
