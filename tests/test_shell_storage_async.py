"""Storage through the Trio wrapper (AsyncStore): every Store method as a
coroutine, off the event loop, in order, cancels that still finish their
write, group commit (several writes, one durable commit, a conflict failing
alone), and a transaction PostgreSQL rolled back to break a deadlock run again.

Most tests run on both backends (conftest.py's ``store_target``).
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from scaiwave_federation.shell.store.async_store import AsyncStore
from scaiwave_federation.shell.store.store import DB_FILENAME, StorageError, Store

from test_shell_storage import ROOM, ev



def test_async_store_has_every_store_method() -> None:
    public = {name for name, _ in inspect.getmembers(Store, inspect.isfunction)
              if not name.startswith("_")}
    for name in public:
        method = getattr(AsyncStore, name)
        assert inspect.iscoroutinefunction(method), name
        assert method.__doc__ == getattr(Store, name).__doc__


async def test_async_store_runs_off_the_loop(store_target) -> None:
    astore = await AsyncStore.open(store_target)
    loop_thread = threading.get_ident()
    assert await astore.run(lambda s: threading.get_ident()) != loop_thread

    # A call that blocks its worker thread until the loop lets it go: if the
    # loop were blocked too, this would deadlock (and fail_after would fire).
    release = threading.Event()
    order: list[str] = []

    def slow(s: Store) -> int:
        release.wait(10)
        order.append("slow")
        return s.store_events(ROOM, [ev(0)])

    async def quick() -> None:
        order.append("quick started")
        await astore.store_events(ROOM, [ev(1)])  # queued behind slow: one at a time
        order.append("quick")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(astore.run, slow)
            await trio.sleep(0.05)
            nursery.start_soon(quick)
            await trio.sleep(0.05)
            order.append("loop ran")  # the loop runs while both calls are pending
            release.set()
    assert order == ["quick started", "loop ran", "slow", "quick"]
    assert await astore.depths(ROOM) == [0, 1]
    await astore.close()


async def test_async_store_concurrent_calls_all_complete(store_target) -> None:
    async with await AsyncStore.open(store_target) as astore:
        results: dict[int, int] = {}

        async def write(depth: int) -> None:
            results[depth] = await astore.store_events(ROOM, [ev(depth)])

        async with trio.open_nursery() as nursery:
            for depth in range(20):
                nursery.start_soon(write, depth)
        assert results == {d: 1 for d in range(20)}
        assert await astore.event_count(ROOM) == 20
        with pytest.raises(StorageError):
            await astore.create_user("@x:host.test", "x", "nope", "h")


async def test_cancelled_call_still_finishes_its_write(store_target) -> None:
    async with await AsyncStore.open(store_target) as astore:

        def slow_write(s: Store) -> int:
            time.sleep(0.2)
            return s.store_events(ROOM, [ev(0)])

        returned = None
        with trio.move_on_after(0.01) as scope:
            returned = await astore.run(slow_write)
            await trio.sleep(10)  # the pending cancel lands here
        # The cancel waited for the thread: the write returned whole, not half.
        assert scope.cancelled_caught and returned == 1
        assert await astore.event_count(ROOM) == 1


async def test_grouped_writes_share_a_commit_and_fail_alone(tmp_path: Path) -> None:
    """Grouped writes queued together run in one transaction (one commit), each
    in a savepoint: a conflict fails its own write only; ``then`` callbacks run
    in submission order; an early read may pass the grouped writes ahead of it."""
    async with await AsyncStore.open(tmp_path) as astore:
        started, release = threading.Event(), threading.Event()
        commits: list[str] = []
        astore.sync.db.conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
        # Holds the worker while the rest queue up (all of them then taken at once).
        blocker = astore.submit(lambda s: started.set() or release.wait(10))
        await trio.to_thread.run_sync(started.wait, 10)
        seen: list[int] = []
        jobs = [astore.submit(lambda s, d=d: s.store_events(ROOM, [ev(d)]), group=True,
                              then=lambda new, d=d: seen.append(d) or new) for d in range(5)]
        clash = astore.submit(lambda s: s.store_events(ROOM, [ev(2, tag="other")]), group=True)  # depth 2 is taken
        after = astore.submit(lambda s: s.store_events(ROOM, [ev(9)]), group=True)
        early: list[int] = []

        async def read_early() -> None:
            early.append(await astore.run(lambda s: s.event_count(ROOM), early=True))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_early)
            await trio.testing.wait_all_tasks_blocked()  # its read is queued
            release.set()
        assert await blocker.wait() is True
        assert [await j.wait() for j in jobs] == [1] * 5 and seen == [0, 1, 2, 3, 4]
        with pytest.raises(StorageError) as caught:
            await clash.wait()
        assert caught.value.code == "conflict"
        assert await after.wait() == 1
        assert early == [0]  # it ran before the writes queued ahead of it
        assert commits.count("COMMIT") == 1  # seven writes, one durable commit
        assert await astore.depths(ROOM) == [0, 1, 2, 3, 4, 9]


async def test_a_group_commit_on_either_backend_fails_a_conflict_alone(store_target) -> None:
    """The same group on SQLite and PostgreSQL (where a failed statement outside
    a savepoint would abort the whole transaction): the conflict fails alone,
    the others are stored and answered in order."""
    async with await AsyncStore.open(store_target) as astore:
        started, release = threading.Event(), threading.Event()
        blocker = astore.submit(lambda s: started.set() or release.wait(10))
        await trio.to_thread.run_sync(started.wait, 10)
        jobs = [astore.submit(lambda s, d=d: s.store_events(ROOM, [ev(d)]), group=True) for d in range(3)]
        clash = astore.submit(lambda s: s.store_events(ROOM, [ev(1, tag="other")]), group=True)
        after = astore.submit(lambda s: s.store_events(ROOM, [ev(7)]), group=True)
        release.set()
        assert await blocker.wait() is True
        assert [await j.wait() for j in jobs] == [1, 1, 1]
        with pytest.raises(StorageError) as caught:
            await clash.wait()
        assert caught.value.code == "conflict"
        assert await after.wait() == 1
        assert await astore.depths(ROOM) == [0, 1, 2, 7]


def test_store_usable_without_trio_after_async_use(store_target) -> None:
    async def main() -> None:
        async with await AsyncStore.open(store_target) as astore:
            await astore.create_tenant("acme")

    trio.run(main)
    with Store.open(store_target) as s:
        assert s.get_tenant("acme") is not None
    if isinstance(store_target, Path):
        assert os.path.exists(store_target / DB_FILENAME)


def test_a_call_rolled_back_to_break_a_deadlock_runs_again() -> None:
    """PostgreSQL breaks a deadlock between two workers' transactions by rolling
    one back whole: that call runs again (a fresh transaction), a few times at most."""
    import psycopg

    from scaiwave_federation.shell.store import async_store

    runs: list[int] = []

    def deadlocks_twice() -> str:
        runs.append(1)
        if len(runs) <= 2:
            raise psycopg.errors.DeadlockDetected("deadlock detected")
        return "stored"

    assert async_store._capture(deadlocks_twice).unwrap() == "stored" and len(runs) == 3
    runs.clear()

    def always() -> str:
        runs.append(1)
        raise psycopg.errors.DeadlockDetected("deadlock detected")

    with pytest.raises(psycopg.errors.DeadlockDetected):
        async_store._capture(always).unwrap()
    assert len(runs) == async_store.TXN_RETRIES
    runs.clear()

    def conflict() -> str:  # any other error is the call's answer at once
        runs.append(1)
        raise StorageError("conflict", "taken")

    with pytest.raises(StorageError):
        async_store._capture(conflict).unwrap()
    assert len(runs) == 1
