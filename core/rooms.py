"""Rooms over federation: chaining on the host, invites, proposals and transactions.

A room lives on its host (the server in its id), which orders its events in a
hash chain: event ``n`` names event ``n-1`` in ``prev``. These pure rules are
used by both sides: the host when it chains, and every receiver when it
checks what it was sent.

Federation payloads (canonical CBOR):

- invite ``PUT invite/{room_id}``: ``{"events": [invite]}``, the host-signed
  ``m.member`` invite event (content ``{"membership": "invite", "user"}``);
  the invitee's server stores it as a pending invite, and the room's history
  reaches it after the join (in transactions from then on, and by backfill);
- transaction ``PUT send/{txn_id}``: ``{"events": [envelope, ...]}``: chained
  events from the host, or proposals (depth 0) from a member's server;
- transaction reply: ``{"results": [{"event_id", "ok"} | {"event_id", "error"}],
  "events": [the chained events made from the proposals]}``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

from .codes import Code, Refused
from .events import Event, decode_event, make_event
from .keys import SigningKey
from .layouts import read_events_body
from .names import server_of
from .authz import RoomFacts, may_propose
from .wire import decode, encode

__all__ = [
    "Head",
    "chain_event",
    "link",
    "link_run",
    "LinkResult",
    "check_proposal",
    "decode_events_body",
    "invitee_of",
    "encode_events_body",
    "MAX_TXN_EVENTS",
    "MAX_TXN_BYTES",
]

MAX_TXN_EVENTS = 100
MAX_TXN_BYTES = 2 * 1024 * 1024


class Head(NamedTuple):
    """The newest event of a room as a server holds it (a NamedTuple: cheap to
    build once per ingested event)."""

    depth: int
    event_id: bytes


def chain_event(key: SigningKey, *, head: Head | None, room_id: str, room_type: str, sender: str,
                type: str, ts: int, content: dict[str, Any], source: bytes | None = None) -> Event:
    """The host appends an event after ``head`` (``None``: the room's first event)."""
    host = server_of(room_id)
    assert host is not None
    return make_event(
        key,
        room_id=room_id,
        room_type=room_type,
        depth=1 if head is None else head.depth + 1,
        prev=None if head is None else head.event_id,
        origin=host,
        sender=sender,
        type=type,
        ts=ts,
        content=content,
        source=source,
    )


class LinkResult:
    """What to do with a chained event given our head."""

    APPEND = "append"
    DUPLICATE = "duplicate"


def link(event: Event, head: Head | None, known_at_depth: bytes | None = None) -> str | Refused:
    """Check a received chained event against our head of its room.

    ``known_at_depth`` is the id we already hold at ``event.depth`` (if any).
    Returns :data:`LinkResult.APPEND`, :data:`LinkResult.DUPLICATE`, or
    ``chain_broken`` (a gap: the caller backfills, or an inserted event).
    """
    if known_at_depth is not None:
        if known_at_depth == event.event_id:
            return LinkResult.DUPLICATE
        return Refused(Code.CHAIN_BROKEN, f"another event already holds depth {event.depth}")
    if head is None:
        if event.depth == 1:
            return LinkResult.APPEND
        return Refused(Code.CHAIN_BROKEN, f"event at depth {event.depth} but we hold none of the room")
    if event.depth == head.depth + 1 and event.prev == head.event_id:
        return LinkResult.APPEND
    return Refused(Code.CHAIN_BROKEN, f"event at depth {event.depth} does not follow our head at {head.depth}")


def link_run(events: Sequence[object], head: Head | None) -> tuple[int, Refused | None]:
    """Check a run of received chained events (oldest first) against ``head``.

    The batch form of :func:`link` for the APPEND case: returns how many
    leading events extend the chain one by one, and the refusal that stopped
    it (``None`` when all of them do). Non-events (refusals from
    verification) stop the run with their own refusal, or ``malformed``.
    """
    depth, prev = (0, None) if head is None else head
    for index, event in enumerate(events):
        if type(event) is not Event:
            return index, event if isinstance(event, Refused) else Refused(Code.MALFORMED, "not a verified event")
        if event.depth != depth + 1 or event.prev != prev:
            return index, Refused(Code.CHAIN_BROKEN, f"event at depth {event.depth} does not follow depth {depth}")
        depth, prev = event.depth, event.event_id
    return len(events), None


def check_proposal(proposal: Event, *, origin: str, room_type: str, tenant_federates: bool,
                   membership: str | None) -> Refused | None:
    """May the host chain ``proposal``, received from authenticated ``origin``?

    ``membership`` is the sender's current membership of the room (``None``:
    none). The rules are :func:`~.authz.may_propose`'s (A9): joined members
    post messages; invited users join or decline; joined members leave.
    Returns ``None`` when it may.
    """
    if proposal.depth != 0:
        return Refused(Code.MALFORMED, "members send proposals (depth 0), not chained events")
    room = RoomFacts(proposal.room_id, room_type, tenant_federates=tenant_federates,
                     members={proposal.sender: membership} if membership else {})
    return may_propose(room, origin=origin, sender=proposal.sender, proposal_origin=proposal.origin,
                       room_type=proposal.room_type, type=proposal.type, content=proposal.content)


def invitee_of(body: bytes) -> str | None:
    """Whom an invite body claims to invite (unverified), so the host can look
    the user up before :meth:`~.node.Federation.on_invite` decides; ``None``
    when the body does not even say."""
    decoded = decode_events_body(body)
    if isinstance(decoded, Refused) or len(decoded[0]) != 1:
        return None
    event = decode_event(decoded[0][0])
    user = event.content.get("user") if isinstance(event, Event) else None
    return user if isinstance(user, str) else None


def encode_events_body(envelopes: list[bytes], **extra: Any) -> bytes:
    """``{"events": [...], **extra}`` as canonical CBOR."""
    return encode({"events": list(envelopes), **extra})


def decode_events_body(body: bytes, *, extra: frozenset[str] = frozenset()) -> tuple[list[bytes], dict[str, Any]] | Refused:
    """Decode an invite or transaction body into its envelopes (and extra fields)."""
    if type(body) is bytes and len(body) <= MAX_TXN_BYTES:
        envelopes = read_events_body(body, MAX_TXN_EVENTS)  # the common layout, read fast
        if envelopes is not None:
            return envelopes, {}
    value = decode(body, max_size=MAX_TXN_BYTES, max_depth=4)
    if isinstance(value, Refused):
        return value
    if not isinstance(value, dict) or "events" not in value or not set(value) <= {"events"} | extra:
        return Refused(Code.MALFORMED, "body is {events: [...]}")
    events = value["events"]
    if type(events) is not list or not 0 < len(events) <= MAX_TXN_EVENTS or not all(type(e) is bytes for e in events):
        return Refused(Code.MALFORMED, f"events is a list of 1 to {MAX_TXN_EVENTS} envelopes")
    return events, {k: v for k, v in value.items() if k != "events"}
