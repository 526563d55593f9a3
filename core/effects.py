"""Effects: what a core machine asks its host (the shell, or an embedder) to do.

Effects are frozen values. The host carries each one out and feeds the result
back as an input (for example ``FetchDescriptor`` -> ``descriptor_received``).
The core never performs I/O itself, so any runtime can host it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .codes import Refused
from .events import Event, NeedKeys

__all__ = [
    "FetchDescriptor", "SendRequest", "StoreEvents", "PeerAgreed", "Failed", "NeedKeys", "KeyRotated", "BackfillDone",
    "Effect",
]


@dataclass(frozen=True, slots=True)
class FetchDescriptor:
    """GET ``https://{server}/.well-known/scaiwave`` over verified TLS; answer
    with the body bytes, or with the transport failure as a :class:`Refused`."""

    server: str


@dataclass(frozen=True, slots=True)
class SendRequest:
    """Send a signed federation request; answer with ``(status, body)``.
    ``not_before``: not before this time (ms, the clock the machine is
    given; its signature carries that time); 0: at once. Only a backfill
    page asked again after the host said "not now" has one (see
    ``core.backfill.PAGE_RETRIES``)."""

    destination: str
    method: str
    target: str
    body: bytes
    authorization: str
    not_before: int = 0


@dataclass(frozen=True, slots=True)
class StoreEvents:
    """Durably store verified events of ``room_id`` (all or nothing, with the
    optional resume ``cursor`` in the same transaction), then acknowledge."""

    room_id: str
    events: tuple[Event, ...]
    cursor: bytes | None = None


@dataclass(frozen=True, slots=True)
class PeerAgreed:
    """A handshake succeeded: record the peer as active with this version and key."""

    server: str
    protocol_version: str
    key_id: str


@dataclass(frozen=True, slots=True)
class Failed:
    """A machine ended with a refusal (record it as the peer's ``last_error``)."""

    server: str
    refusal: Refused


@dataclass(frozen=True, slots=True)
class KeyRotated:
    """A timer rotated our federation key: persist ``keyring`` (its new current
    key's seed is the one the host handed :meth:`~.node.Federation.handle_timeout`)
    and publish the new descriptor."""

    keyring: Any


@dataclass(frozen=True, slots=True)
class BackfillDone:
    """Effect: the pull ended. ``refusal`` is set when it stopped at a bad event or error."""

    room_id: str
    peer: str
    stored: int
    reached_start: bool
    refusal: Refused | None = None


Effect = FetchDescriptor | SendRequest | StoreEvents | PeerAgreed | Failed | NeedKeys | KeyRotated | BackfillDone
