"""``/healthz`` and ``/readyz``.

``/healthz`` answers 200 ``{"alive": true}`` whenever the event loop can
answer at all: a process supervisor restarts the daemon when it stops
answering.

``/readyz`` answers 200 when the daemon can do its job and 503 when not, in
both cases ``{"ready", "checks": {name: "ok" or the reason}}`` (and
``"reason"``, the failed checks in one line, when not ready). The checks:

- ``storage``: a real write (one row of ``meta``, in a transaction with a
  1 s lock wait) commits. A full disk, a read-only file system or another
  process holding the write lock all fail it, with the database's reason
  (SQLite's, or PostgreSQL's: a server that is down, full or read-only);
- ``key``: a federation key exists (peers cannot verify anything we sign
  without one);
- ``listener``: the HTTPS listener is up and not shutting down.

Both endpoints are public, like ``/.well-known/scaiwave``: probes and load
balancers hold no token, and the reasons say nothing the descriptor does not
(a missing key shows as an empty ``public_key`` there). So that a flood of
probes cannot turn into a flood of disk writes, the storage check runs at
most once a second and the others share its answer.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from ..runtime.service import Service
    from ..store.store import Store

__all__ = ["Health", "probe_write"]

#: How long a readiness answer is reused.
CACHE_S = 1.0
def probe_write(store: Store, now: int) -> str:
    """Commit one small write; ``"ok"`` or the database's reason. Runs on the storage thread."""
    return store.probe_write(now)


class Health:
    """The daemon's liveness and readiness. The daemon sets :attr:`listening`."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.listening = False
        self._cached: tuple[float, dict[str, str]] | None = None
        self._lock = trio.Lock()

    async def checks(self) -> dict[str, str]:
        """``{check: "ok" or reason}``, at most :data:`CACHE_S` old."""
        async with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < CACHE_S:
                return self._cached[1]
            now = self.service.now()
            try:
                storage = await self.service.store.run(lambda store: probe_write(store, now))
            except Exception as exc:  # a closed database, say: not ready, not a 500
                storage = f"not writable: {exc}"
            checks = {
                "storage": storage,
                "key": "ok" if self.service.node.keyring.current is not None
                else "no federation key: run `scaiwave admin federation key generate`",
                "listener": "ok" if self.listening else "the HTTPS listener is not up (starting or shutting down)",
            }
            self._cached = (time.monotonic(), checks)
            return checks

    async def ready(self) -> tuple[int, dict[str, Any]]:
        """The ``/readyz`` status and body."""
        checks = await self.checks()
        failed = [f"{name}: {reason}" for name, reason in checks.items() if reason != "ok"]
        if not failed:
            return 200, {"ready": True, "checks": checks}
        return 503, {"ready": False, "checks": checks, "reason": "; ".join(failed)}

    def forget(self) -> None:
        """Drop the cached answer (after a key is generated, say)."""
        self._cached = None
