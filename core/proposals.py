"""Each proposal is chained at most once per room.

A proposal's id is its event id (the hash of its body). The host chains a
proposal into a room at most once, and a receiver accepts at most one
chained event per proposal in a room: a host that chained a member's single
"I agree" twice would otherwise make it show twice, in the member's own
client too. The same chained event arriving again (a resent transaction, the
copy in a proposal's reply and then the one in order) is a duplicate, not a
second chaining.

The store answers "which chained event of this room carries this proposal?"
(and enforces the rule itself as a last line: a unique index); these pure
rules decide.
"""

from __future__ import annotations

from .codes import Code, Refused
from .events import Event, decode_event, event_id_text

__all__ = ["proposal_id", "chained_once", "may_chain"]


def proposal_id(event: Event) -> bytes | None:
    """The id of the proposal a chained ``event`` was made from (``None``: it
    carries none, or its ``source`` does not decode, which verification refuses)."""
    if event.source is None:
        return None
    proposal = decode_event(event.source)
    return proposal.event_id if isinstance(proposal, Event) else None


def chained_once(event: Event, held: bytes | None) -> Refused | None:
    """May ``event`` (a chained event) be stored, given ``held``: the id of the
    chained event of its room that already carries the same proposal (``None``:
    none does)? Chaining a new proposal, or the same event again, is fine;
    another event for a proposal already chained is ``conflict``."""
    if held is None or held == event.event_id:
        return None
    return Refused(Code.CONFLICT, f"event {event.id_text} chains a proposal already chained in {event.room_id[:100]} "
                                  f"as {event_id_text(held)}")


def may_chain(proposal: Event, held: bytes | None) -> Refused | None:
    """May the host chain ``proposal`` into its room, given ``held``: the id of
    the chained event that already carries it (``None``: none)? Only once."""
    if held is None:
        return None
    return Refused(Code.CONFLICT, f"proposal {proposal.id_text} is already chained in {proposal.room_id[:100]} "
                                  f"as {event_id_text(held)}")
