"""The daemon's side of :mod:`scaiwave_federation.core.limits`.

The core decides who may send what and how many descriptor fetches peers may
cause; this module asks it with the daemon's clock and carries the answer
out:

- :meth:`Gate.inbound` wraps one federation request: it reads the *claimed*
  origin from the ``Authorization`` header (a decode, no signature check, no
  I/O), asks the limiter, and holds the origin's slot while the request is
  handled. A refused request is answered ``rate_limited`` (HTTP 429) before
  anything else happens: no descriptor fetch, no storage read or write.
- :data:`fetch_cause` names, per Trio task, the origin whose request is
  being handled (or the peer a catch-up pulls from); :meth:`Gate.begin_fetch`
  charges a descriptor fetch to it.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import trio
from scaiwave_federation.core import Refused
from scaiwave_federation.core import Limits, OriginLimiter
from scaiwave_federation.core import parse_authorization

from ..config import Config

__all__ = ["Gate", "fetch_cause", "limits_of"]

#: The origin whose request (or catch-up) the current task works for; ``None``: our own doing.
fetch_cause: ContextVar[str | None] = ContextVar("scaiwave_fetch_cause", default=None)


def limits_of(config: Config) -> Limits:
    """The core's limits from the daemon's settings."""
    return Limits(rate=config.federation_rate, burst=config.federation_burst,
                  concurrent=config.federation_concurrent,
                  fetches_per_origin=config.descriptor_fetches_per_origin,
                  fetches_total=config.descriptor_fetches_total)


class Gate:
    """The daemon's one :class:`OriginLimiter`, read with its clock."""

    def __init__(self, limits: Limits, now: Callable[[], int]) -> None:
        self.limiter = OriginLimiter(limits)
        self._now = now
        self._settled: dict[str, trio.Event] = {}  # server -> set when its fetch in flight ends

    @contextmanager
    def inbound(self, authorization: str | None) -> Iterator[Refused | None]:
        """Admit one inbound request by its claimed origin; yields the refusal
        (``rate_limited``) or ``None``, holding the slot until the block ends.
        A request without a readable signature is let through: authentication
        refuses it at once, and it names no origin to fetch."""
        signed = parse_authorization(authorization)
        if isinstance(signed, Refused):
            yield None
            return
        refusal = self.limiter.admit(signed.origin, self._now())
        if refusal is not None:
            yield refusal
            return
        token = fetch_cause.set(signed.origin)
        try:
            yield None
        finally:
            fetch_cause.reset(token)
            self.limiter.release(signed.origin)

    def begin_fetch(self, server: str) -> Refused | None:
        """May we fetch ``server``'s descriptor now (charged to :data:`fetch_cause`)?"""
        refusal = self.limiter.begin_fetch(server, fetch_cause.get(), self._now())
        if refusal is None:
            self._settled[server] = trio.Event()
        return refusal

    def fetch_refusal(self, server: str) -> Refused | None:
        """Would :meth:`begin_fetch` refuse ``server`` now? (Reserves nothing.)"""
        refusal = self.begin_fetch(server)
        if refusal is None:
            self.end_fetch(server)
        return refusal

    def end_fetch(self, server: str) -> None:
        self.limiter.end_fetch(server)
        self._settled.pop(server).set()

    async def fetch_settled(self, server: str) -> None:
        """Wait until no fetch of ``server``'s descriptor is in flight."""
        event = self._settled.get(server)
        if event is not None:
            await event.wait()

    def view(self) -> dict:
        """The admin view: settings, busy origins, the most recently limited."""
        return self.limiter.view(self._now())
