"""Per-origin limits on inbound federation, and caps on the descriptor fetches
that inbound traffic causes. Pure and deterministic: time comes in as ms.

In the spirit of Synapse's ``rc_federation`` (concurrency per origin, and a
rate above which requests are rejected), adapted to a daemon that refuses
rather than queues (a refusal costs nothing; a queue of sleeping requests
holds sockets):

- **Rate**: a token bucket per *claimed* origin, ``rate`` requests a second
  sustained, ``burst`` at once. Integer arithmetic in milli-tokens, so the
  same readings always give the same answers.
- **Concurrency**: at most ``concurrent`` requests of one origin in flight.
- **Descriptor fetches**: a request whose signature names a server we have
  no keys for makes us fetch that server's descriptor. At most
  ``fetches_per_origin`` such fetches caused by one origin at a time, at most
  ``fetches_total`` caused by all peers together, and one per server.
  Fetches we start ourselves (the admin, a handshake we begin) are not
  capped in total: strangers cannot starve them.

Every refusal is ``rate_limited``, which a sender retries after a backoff.

The limits apply to the origin a request *claims* (read from its
``Authorization`` header without verifying it) because they must hold before
the request costs anything: a descriptor fetch, a storage write. The price is
that a forger can spend a real origin's budget at this server; it gains
nothing else, and the real origin's requests are retried.

Memory is bounded: at most ``max_tracked`` origins are tracked. Idle origins
with a full bucket are forgotten first (forgetting them changes no answer);
past that, a new origin is refused until some finish. The admin view
(:meth:`OriginLimiter.view`) keeps the ``max_shown`` most recently limited
origins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .codes import Code, LocalProtocolError, Refused

__all__ = ["Limits", "OriginLimiter", "DEFAULT_LIMITS", "limit_key"]

_MILLI = 1000  # milli-tokens per token


def limit_key(origin: str) -> str:
    """One bucket per server however its name is spelt (``Peer.Test:443`` is ``peer.test``)."""
    origin = origin.lower()
    return origin[:-4] if origin.endswith(":443") else origin


@dataclass(frozen=True, slots=True)
class Limits:
    """The settings; each a positive integer."""

    rate: int = 50  # requests a second per origin, sustained
    burst: int = 100  # requests at once per origin (the bucket's size)
    concurrent: int = 8  # requests in flight per origin
    fetches_per_origin: int = 2  # descriptor fetches one origin's requests may cause at once
    fetches_total: int = 8  # descriptor fetches all peers' requests may cause at once
    max_tracked: int = 10_000  # origins tracked at once
    max_shown: int = 100  # limited origins the admin view remembers

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise LocalProtocolError(f"limit {name} is a positive integer, got {value!r}")


DEFAULT_LIMITS = Limits()


@dataclass(slots=True)
class _Origin:
    tokens: int  # milli-tokens
    at: int  # when ``tokens`` was computed
    in_flight: int = 0
    fetching: int = 0


@dataclass(slots=True)
class _Shown:
    refused: int = 0
    last_at: int = 0
    last_reason: str = ""


@dataclass
class OriginLimiter:
    """Who may send us what, now. Ask :meth:`admit` before handling a request
    and :meth:`release` after; :meth:`begin_fetch` before a descriptor fetch and
    :meth:`end_fetch` after."""

    limits: Limits = DEFAULT_LIMITS
    _origins: dict[str, _Origin] = field(default_factory=dict)
    _fetching: dict[str, str | None] = field(default_factory=dict)  # server -> the origin that caused it
    _caused: int = 0  # fetches in flight caused by peers (not by us)
    _shown: dict[str, _Shown] = field(default_factory=dict)
    _no_scan_before: int = -(1 << 62)  # the table was full of busy origins: do not rescan before

    # -- requests --------------------------------------------------------------------

    def admit(self, origin: str, now: int) -> Refused | None:
        """May a request claiming ``origin`` start at ``now``? ``None``: yes, and it
        holds a slot until :meth:`release`. Else ``rate_limited``."""
        origin = limit_key(origin)
        entry = self._entry(origin, now)
        if entry is None:
            return self._refuse(origin, now, f"tracking {self.limits.max_tracked} busy origins: try later")
        if entry.in_flight >= self.limits.concurrent:
            return self._refuse(origin, now, f"{origin} has {entry.in_flight} requests in flight "
                                             f"(at most {self.limits.concurrent})")
        if entry.tokens < _MILLI:
            return self._refuse(origin, now, f"{origin} sends more than {self.limits.rate} requests a second "
                                             f"(bursts of {self.limits.burst})")
        entry.tokens -= _MILLI
        entry.in_flight += 1
        return None

    def release(self, origin: str) -> None:
        """A request admitted for ``origin`` finished (however it ended)."""
        entry = self._origins.get(limit_key(origin))
        if entry is None or entry.in_flight < 1:
            raise LocalProtocolError(f"release without admit for {origin!r}")
        entry.in_flight -= 1

    # -- descriptor fetches ------------------------------------------------------------

    def begin_fetch(self, server: str, cause: str | None, now: int) -> Refused | None:
        """May we fetch ``server``'s descriptor now, for a request of ``cause``
        (``None``: our own doing)? ``None``: yes, until :meth:`end_fetch`."""
        cause = None if cause is None else limit_key(cause)
        if server in self._fetching:
            return self._refuse(cause or server, now, f"a fetch of {server}'s descriptor is in flight")
        if cause is not None:
            entry = self._entry(cause, now)
            if entry is None:
                return self._refuse(cause, now, f"tracking {self.limits.max_tracked} busy origins: try later")
            if entry.fetching >= self.limits.fetches_per_origin:
                return self._refuse(cause, now, f"{cause}'s requests have {entry.fetching} descriptor fetches "
                                                f"in flight (at most {self.limits.fetches_per_origin})")
            if self._caused >= self.limits.fetches_total:
                return self._refuse(cause, now, f"{self._caused} descriptor fetches for peers' requests are in "
                                                f"flight (at most {self.limits.fetches_total})")
            entry.fetching += 1
            self._caused += 1
        self._fetching[server] = cause
        return None

    def end_fetch(self, server: str) -> None:
        """The fetch begun for ``server`` ended (however it ended)."""
        if server not in self._fetching:
            raise LocalProtocolError(f"end_fetch without begin_fetch for {server!r}")
        cause = self._fetching.pop(server)
        if cause is not None:
            self._origins[cause].fetching -= 1
            self._caused -= 1

    # -- the admin view ----------------------------------------------------------------

    def view(self, now: int) -> dict[str, Any]:
        """Who is limited: the settings, the origins with requests or fetches in
        flight, and the most recently refused origins (newest first)."""
        busy = sorted((name, e) for name, e in self._origins.items() if e.in_flight or e.fetching)
        shown = sorted(self._shown.items(), key=lambda item: (-item[1].last_at, item[0]))
        return {
            "settings": {name: getattr(self.limits, name) for name in self.limits.__dataclass_fields__},
            "tracked": len(self._origins),
            "descriptor_fetches": {"in_flight": len(self._fetching), "caused_by_peers": self._caused},
            "busy": [{"origin": name, "in_flight": e.in_flight, "descriptor_fetches": e.fetching,
                      "tokens": self._refill(e, now) // _MILLI} for name, e in busy],
            "limited": [{"origin": name, "refused": s.refused, "last_at": s.last_at, "reason": s.last_reason}
                        for name, s in shown],
        }

    # -- internals ---------------------------------------------------------------------

    def _refill(self, entry: _Origin, now: int) -> int:
        cap = self.limits.burst * _MILLI
        if now > entry.at:
            # rate tokens a second = rate milli-tokens a ms.
            entry.tokens = min(cap, entry.tokens + (now - entry.at) * self.limits.rate)
            entry.at = now
        return entry.tokens

    def _entry(self, origin: str, now: int) -> _Origin | None:
        entry = self._origins.get(origin)
        if entry is not None:
            self._refill(entry, now)
            return entry
        if len(self._origins) >= self.limits.max_tracked:
            if now < self._no_scan_before:
                return None
            self._forget_idle(now)
            if len(self._origins) >= self.limits.max_tracked:
                # Every tracked origin is busy: a scan per new origin would cost
                # O(max_tracked) each; wait until a bucket can have refilled.
                self._no_scan_before = now + max(1, _MILLI // self.limits.rate)
                return None
        entry = self._origins[origin] = _Origin(self.limits.burst * _MILLI, now)
        return entry

    def _forget_idle(self, now: int) -> None:
        cap = self.limits.burst * _MILLI
        idle = [name for name, e in self._origins.items()
                if not e.in_flight and not e.fetching and self._refill(e, now) >= cap]
        for name in idle:
            del self._origins[name]

    def _refuse(self, origin: str, now: int, reason: str) -> Refused:
        shown = self._shown.pop(origin, None) or _Shown()
        shown.refused += 1
        shown.last_at, shown.last_reason = now, reason
        self._shown[origin] = shown  # re-inserted: the dict stays in order of last refusal
        if len(self._shown) > self.limits.max_shown:
            del self._shown[next(iter(self._shown))]
        return Refused(Code.RATE_LIMITED, reason)
