"""Live processing times, for the recording: how long the core took, and storage.

The core reads no clock, so the shell times it from outside. Two things make
the split into *decode*, *verify* and *store* possible without touching the
core:

- the core verifies every signature through the :data:`~scaiwave_federation.core.keys.BatchVerifier`
  the shell hands it, so :class:`VerifyClock` wraps that verifier and adds up
  the time spent inside it;
- ``on_events`` and ``page_received`` are synchronous (no other task runs
  while they do), so the verify time spent during one call is exactly the
  clock's growth over that call, and everything else in the call is decoding
  and checking (hash, layout, chain walk): ``decode_us``.

Durations are integer microseconds (``perf_counter_ns`` // 1000). The inbound
record's ``timings`` and the ``backfill_page`` record carry them (format:
docs/replay.md). Nothing here makes a protocol decision.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from scaiwave_federation.core import BatchVerifier

__all__ = ["VerifyClock", "Work", "begin", "current", "PageTimer"]

T = TypeVar("T")


class VerifyClock:
    """A :data:`BatchVerifier` that adds up the nanoseconds spent verifying."""

    def __init__(self, verifier: BatchVerifier) -> None:
        self.verifier = verifier
        self.ns = 0

    def __call__(self, items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bool]:
        start = time.perf_counter_ns()
        try:
            return self.verifier(items)
        finally:
            self.ns += time.perf_counter_ns() - start


@dataclass
class Work:
    """The processing times of one inbound request or one backfill page, in µs."""

    decode_us: int = 0
    verify_us: int = 0
    store_us: int = 0
    stored: int | None = None

    def core(self, clock: VerifyClock | None, call: Callable[..., T], *args: Any) -> T:
        """Run the synchronous core ``call``; add its decode and verify time."""
        before = clock.ns if clock is not None else 0
        start = time.perf_counter_ns()
        result = call(*args)
        total = time.perf_counter_ns() - start
        verify = (clock.ns - before) if clock is not None else 0
        self.verify_us += verify // 1000
        self.decode_us += max(0, total - verify) // 1000
        return result

    @staticmethod
    def store_started() -> int:
        """A reading to pass to :meth:`store_done` when the write ends."""
        return time.perf_counter_ns()

    def store_done(self, started: int, stored: int) -> None:
        """Storage that began at ``started`` (:meth:`store_started`) wrote ``stored`` events."""
        self.store_us += (time.perf_counter_ns() - started) // 1000
        self.stored = (self.stored or 0) + stored

    def fields(self) -> dict[str, int]:
        """The ``timings`` map of an inbound record."""
        return {"decode_us": self.decode_us, "verify_us": self.verify_us, "store_us": self.store_us}


_current: contextvars.ContextVar[Work | None] = contextvars.ContextVar("scaiwave_work", default=None)


def begin() -> Work:
    """Start timing the request this task serves (each Trio task has its own context)."""
    work = Work()
    _current.set(work)
    return work


def current() -> Work:
    """The request's :class:`Work` (a throwaway one outside :func:`begin`)."""
    work = _current.get()
    return work if work is not None else Work()


class PageTimer:
    """Times the pages of one backfill pull, one ``backfill_page`` record each.

    A page's record is written once the next request goes out or the pull
    ends, so the storage of its events is counted with it. ``puller`` is the
    :class:`~scaiwave_federation.core.backfill.BackfillPuller` (its
    ``room_id``, ``peer`` and ``refusals`` are read).
    """

    def __init__(self, clock: VerifyClock | None, record: Callable[..., None], puller: Any) -> None:
        self.clock, self._record, self.puller = clock, record, puller
        self.page: Work | None = None
        self._refused = len(puller.refusals)

    def received(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` (``puller.page_received``), timed as a new page."""
        self.flush()
        self.page = Work(stored=0)
        return self.page.core(self.clock, call, *args)

    def begin(self, work: Work) -> None:
        """Write the current page's record, then time ``work`` as the new page."""
        self.flush()
        self.page = work

    def more(self, call: Callable[..., T], *args: Any) -> T:
        """A core call that still works on the current page (``keys_updated``)."""
        return self.page.core(self.clock, call, *args) if self.page is not None else call(*args)

    def stored(self, started: int, count: int) -> None:
        """The current page's events were written (``started``: :meth:`Work.store_started`)."""
        if self.page is not None:
            self.page.store_done(started, count)

    def flush(self) -> None:
        """Write the current page's record (if any)."""
        page, self.page = self.page, None
        if page is None:
            return
        refused, self._refused = len(self.puller.refusals) - self._refused, len(self.puller.refusals)
        self._record("backfill_page", room_id=self.puller.room_id, peer=self.puller.peer,
                     stored=page.stored or 0, refused=refused, **page.fields())
