"""What we know of other servers' keys, and when we may ask again.

The cache holds each peer's :class:`~.keys.ServerKeys` as read from its
descriptor. A signature under a key id we do not know makes the verifier ask
for the signer's descriptor again (key rotation is discovered this way), but
not often: per server, once per ``refetch_interval_ms``, except that a key id
not yet asked about since the last fetch may trigger one after
:data:`NEW_KEY_FLOOR_MS`. So a peer that rotates right after we fetched its
descriptor is picked up within a second, while a flood of made-up key ids
cannot turn us into a descriptor-fetching amplifier (one fetch a second per
server at most).

The cache never fetches: it answers "fetch now" or "you may not yet" and the
shell carries out the fetch, then hands the bytes to :meth:`KeyCache.learn`.
"""

from __future__ import annotations

from typing import Any
from dataclasses import dataclass

from .codes import Refused
from .descriptor import parse_descriptor
from .keys import ServerKeys

__all__ = ["KeyCache", "PeerDescriptor", "DEFAULT_REFETCH_INTERVAL_MS"]

DEFAULT_REFETCH_INTERVAL_MS = 30_000
#: The shortest gap between two fetches for a server, for a newly seen key id.
NEW_KEY_FLOOR_MS = 1_000
#: Past this many servers with a recorded fetch attempt, the stale ones are forgotten.
MAX_ATTEMPTS_KEPT = 10_000


@dataclass(frozen=True, slots=True)
class PeerDescriptor:
    """A checked descriptor of one server, as cached."""

    keys: ServerKeys
    protocol_versions: tuple[str, ...]
    fields: dict[str, Any]
    fetched_at: int


class KeyCache:
    """Peers' keys by server name, with the refetch rate limit."""

    def __init__(self, *, refetch_interval_ms: int = DEFAULT_REFETCH_INTERVAL_MS, key_time_offset_ms: int = 0) -> None:
        self.refetch_interval_ms = refetch_interval_ms
        #: What-if only (``scaiwave replay --key-clock-offset``): key validity
        #: is judged this far ahead of the clock readings (:meth:`ServerKeys.shifted`).
        self.key_time_offset_ms = key_time_offset_ms
        self._peers: dict[str, PeerDescriptor] = {}
        self._attempted: dict[str, int] = {}
        self._asked: dict[str, set[str]] = {}  # key ids fetched for since the last fetch
        self._prune_at = -(1 << 62)  # no stale attempt to forget before this

    def get(self, server: str) -> PeerDescriptor | None:
        """The cached descriptor of ``server``, or ``None``."""
        return self._peers.get(server)

    def keys(self, server: str) -> ServerKeys | None:
        """The cached keys of ``server`` (a :data:`~.events.KeyLookup`)."""
        entry = self._peers.get(server)
        if entry is None:
            return None
        return entry.keys.shifted(self.key_time_offset_ms) if self.key_time_offset_ms else entry.keys

    def may_fetch(self, server: str, now: int, key_id: str | None = None) -> bool:
        """True if a descriptor fetch for ``server`` (because of ``key_id``) is allowed at ``now``."""
        last = self._attempted.get(server)
        if last is None or now - last >= self.refetch_interval_ms:
            return True
        asked = self._asked.get(server, set())
        return key_id is not None and key_id not in asked and now - last >= min(NEW_KEY_FLOOR_MS, self.refetch_interval_ms)

    def fetch_attempted(self, server: str, now: int, key_id: str | None = None) -> None:
        """Record a fetch (successful or not) so the rate limit applies."""
        if len(self._attempted) >= MAX_ATTEMPTS_KEPT and server not in self._attempted and now >= self._prune_at:
            # Strangers' names must not grow this for ever: an attempt older than
            # the refetch interval limits nothing any more, so forget those. (And
            # scan again only when the oldest one left can have gone stale.)
            for name in [n for n, at in self._attempted.items() if now - at >= self.refetch_interval_ms]:
                del self._attempted[name]
                self._asked.pop(name, None)
            self._prune_at = min(self._attempted.values(), default=now) + self.refetch_interval_ms
        self._attempted[server] = now
        self._asked[server] = {key_id} if key_id else set()

    def learn(self, server: str, data: bytes, now: int) -> PeerDescriptor | Refused:
        """Check fetched descriptor bytes of ``server`` and cache them.

        On refusal the previous entry (if any) stays: a broken fetch never
        loses keys we already trust.
        """
        self.fetch_attempted(server, now)
        parsed = parse_descriptor(data, server)
        if isinstance(parsed, Refused):
            return parsed
        keys, versions, fields = parsed
        previous = self._peers.get(server)
        if previous is not None:
            # Never trust less of a key's past than we did (keys.ServerKeys.keeping_past).
            keys = keys.keeping_past(previous.keys, previous.fetched_at)
        entry = PeerDescriptor(keys, versions, fields, now)
        self._peers[server] = entry
        return entry

    def forget(self, server: str) -> None:
        """Drop what we know of ``server`` (the admin's refresh does this first)."""
        self._peers.pop(server, None)
        self._attempted.pop(server, None)
        self._asked.pop(server, None)

    def servers(self) -> list[str]:
        """Every server with cached keys, sorted."""
        return sorted(self._peers)
