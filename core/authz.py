"""Room authorization: who may enter, speak in and read a room.

Pure rules over facts the host passes in (:class:`RoomFacts`, :class:`Party`);
each answers ``None`` (allowed) or a :class:`~.codes.Refused`. The shell asks
before it stores, chains or sends anything, and carries out the answer; no
rule about rooms lives anywhere else. docs/protocol.md ("Room authorization")
states the rules with the same numbers, and each names the test that proves it.

Memberships and their transitions (rule A1)::

    (none) --invite--> invite --join----> join --leave--> leave
                              --decline-> decline
    decline, leave --invite--> invite

A1. Only the transitions above exist. ``invite`` is caused by a joined member
    of the room (A2); ``join``, ``decline`` and ``leave`` only by the user
    themselves.
A2. Only a joined member invites, and only on the room's host.
A3. A DM has exactly its two parties: its creator and the user invited when
    it was made. Nobody else is ever invited (``forbidden``).
A4. A sealed room (incognito, bridge, sidekick, or owned by a tenant with
    federation disabled) never gains a member from another server, nor from
    another tenant of this server; its history is never served to another
    server.
A5. Another tenant of the same server is treated like another server: its
    users may be invited into a room of this tenant only if the room is not
    sealed and the invitee's own tenant has federation enabled.
A6. Only joined members post, and read a room's messages.
A7. A server reads a room's history (backfill) only while at least one of
    its users is a *joined* member; an invite reads nothing.
A8. A user of a tenant with federation disabled does nothing in a room
    hosted on another server (no join, decline, post or leave goes out), and
    is never invited into one (inbound invites are refused).
A9. A member server proposes (depth 0) only for its own users (the
    proposal's origin is the sender's server), and only what A1 and A6 allow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .codes import Code, Refused
from .names import server_of
from .policy import room_refusal

__all__ = [
    "MEMBERSHIPS",
    "TRANSITIONS",
    "RoomFacts",
    "Party",
    "may_invite",
    "may_answer",
    "may_leave",
    "may_post",
    "may_read",
    "may_receive_invite",
    "server_may_read_history",
    "may_propose",
    "push_targets",
]

MEMBERSHIPS = ("invite", "join", "decline", "leave")

#: Rule A1: (current membership, new membership) -> who may cause it.
#: ``"member"``: a joined member other than the user; ``"self"``: the user.
TRANSITIONS: dict[tuple[str | None, str], str] = {
    (None, "invite"): "member",
    ("decline", "invite"): "member",
    ("leave", "invite"): "member",
    ("invite", "join"): "self",
    ("invite", "decline"): "self",
    ("join", "leave"): "self",
}


@dataclass(frozen=True, slots=True)
class RoomFacts:
    """What the rules read about one room, as the asking server stores it.

    ``tenant`` and ``tenant_federates`` describe the room's owner tenant
    (rooms hosted here); a room hosted elsewhere has ``tenant=None``.
    ``members`` maps user ids to their membership.
    """

    room_id: str
    room_type: str
    tenant: str | None = None
    tenant_federates: bool = True
    members: Mapping[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str | None:
        return server_of(self.room_id)

    def membership(self, user_id: str) -> str | None:
        return self.members.get(user_id)

    def sealed(self) -> Refused | None:
        """Why the room may not gain members outside its tenant, or ``None`` (A4)."""
        return room_refusal(self.room_type, tenant_federates=self.tenant_federates)


@dataclass(frozen=True, slots=True)
class Party:
    """A user as the rules see them: local users carry their tenant."""

    user_id: str
    tenant: str | None = None
    tenant_federates: bool = True


def _short(text: str) -> str:
    return text[:100]


def _transition(room: RoomFacts, user_id: str, wanted: str) -> Refused | None:
    current = room.membership(user_id)
    if (current, wanted) in TRANSITIONS:
        return None
    if current == wanted or (wanted == "invite" and current == "join"):
        return Refused(Code.CONFLICT, f"{_short(user_id)} is already {current} in {_short(room.room_id)}")
    if current is None and wanted != "invite":
        return Refused(Code.NOT_FOUND, f"{_short(user_id)} has no invite to {_short(room.room_id)}")
    return Refused(Code.FORBIDDEN, f"{_short(user_id)} cannot {wanted} {_short(room.room_id)} "
                                   f"(membership {current})")


def may_invite(room: RoomFacts, *, server_name: str, inviter: Party, invitee: Party | None,
               invitee_id: str) -> Refused | None:
    """May ``inviter`` invite ``invitee_id`` into ``room`` (hosted here)?

    ``invitee`` is ``None`` for a user of this server that does not exist;
    for a user of another server it carries no tenant.
    """
    # A2: invites are made on the host, by a joined member.
    if room.host != server_name:
        return Refused(Code.NOT_FOUND, f"{_short(room.room_id)} is not hosted on {server_name}")
    if room.membership(inviter.user_id) != "join":
        return Refused(Code.NOT_MEMBER, f"{_short(inviter.user_id)} is not a joined member of {_short(room.room_id)}")
    invitee_server = server_of(invitee_id)
    if invitee_server is None or not invitee_id.startswith("@"):
        return Refused(Code.BAD_REQUEST, f"not a user id: {_short(invitee_id)!r}")
    if invitee is None:
        return Refused(Code.NOT_FOUND, f"no user {_short(invitee_id)}")
    # A1 (no self-invite either: the inviter is joined already).
    refusal = _transition(room, invitee_id, "invite")
    if refusal is not None:
        return refusal
    # A3.
    if room.room_type == "dm":
        parties = set(room.members) - {inviter.user_id}
        if parties and invitee_id not in parties:
            return Refused(Code.FORBIDDEN, "a DM has exactly its two parties")
    if invitee_server != server_name:
        # A4: another server.
        return room.sealed()
    if invitee.tenant != room.tenant:
        # A4 and A5: another tenant of this server is like another server.
        refusal = room.sealed()
        if refusal is not None:
            return refusal
        if not invitee.tenant_federates:
            return Refused(Code.TENANT_FEDERATION_DISABLED,
                           f"{_short(invitee_id)}'s tenant has federation disabled")
    return None


def _remote_write(room: RoomFacts, user: Party, server_name: str) -> Refused | None:
    # A8: a tenant without federation does nothing in a room hosted elsewhere.
    if room.host != server_name and not user.tenant_federates:
        return Refused(Code.TENANT_FEDERATION_DISABLED, f"{_short(user.user_id)}'s tenant has federation disabled")
    return None


def may_answer(room: RoomFacts, *, user: Party, answer: str, server_name: str) -> Refused | None:
    """May ``user`` answer their invite (``answer``: ``join`` or ``decline``)? A1, A8."""
    if answer not in ("join", "decline"):
        return Refused(Code.BAD_REQUEST, "an invite is answered with join or decline")
    if room.membership(user.user_id) != "invite":
        return Refused(Code.NOT_FOUND, f"no pending invite to {_short(room.room_id)}")
    return _remote_write(room, user, server_name)


def may_leave(room: RoomFacts, *, user: Party, server_name: str) -> Refused | None:
    """May ``user`` leave ``room``? Only a joined member leaves (A1), A8."""
    if room.membership(user.user_id) != "join":
        return Refused(Code.NOT_MEMBER, f"{_short(user.user_id)} is not a joined member of {_short(room.room_id)}")
    return _remote_write(room, user, server_name)


def may_post(room: RoomFacts, *, user: Party, server_name: str) -> Refused | None:
    """May ``user`` post in ``room``? A6, A8."""
    refusal = may_read(room, user=user)
    return refusal if refusal is not None else _remote_write(room, user, server_name)


def may_read(room: RoomFacts, *, user: Party) -> Refused | None:
    """May ``user`` read ``room``'s messages? A6."""
    if room.membership(user.user_id) != "join":
        return Refused(Code.NOT_MEMBER, f"{_short(user.user_id)} is not a joined member of {_short(room.room_id)}")
    return None


def may_receive_invite(*, server_name: str, origin: str, room_id: str, room_type: str, inviter: str,
                       invitee: Party | None, invitee_id: str, membership: str | None) -> Refused | None:
    """May a host (``origin``) invite our user ``invitee_id`` into its room?

    ``invitee`` is ``None`` when no such local user exists; ``membership``
    is the invitee's membership as we store it (``None``: none).
    """
    if server_of(room_id) != origin:
        return Refused(Code.FORBIDDEN, f"{origin} does not host {_short(room_id)}")
    # The invite is the host's event: its inviter is one of the host's users.
    if server_of(inviter) != origin:
        return Refused(Code.FORGED_SENDER, f"{origin} may not invite on behalf of {_short(inviter)}")
    refusal = room_refusal(room_type)
    if refusal is not None:
        return refusal
    if server_of(invitee_id) != server_name or invitee is None:
        return Refused(Code.NOT_FOUND, f"no user {_short(invitee_id)} on {server_name}")
    if not invitee.tenant_federates:  # A8
        return Refused(Code.TENANT_FEDERATION_DISABLED, f"{_short(invitee_id)}'s tenant has federation disabled")
    if membership in ("invite", "join"):
        return Refused(Code.CONFLICT, f"{_short(invitee_id)} is already {membership} in {_short(room_id)}")
    return None


def server_may_read_history(room: RoomFacts, server: str) -> Refused | None:
    """May ``server`` read ``room``'s history (backfill)? A4, A7."""
    refusal = room.sealed()
    if refusal is not None:
        return refusal
    if not any(m == "join" and server_of(u) == server for u, m in room.members.items()):
        return Refused(Code.NOT_MEMBER, f"no user of {_short(server)} is a joined member of {_short(room.room_id)}")
    return None


def may_propose(room: RoomFacts, *, origin: str, sender: str, proposal_origin: str, room_type: str,
                type: str, content: Mapping[str, object]) -> Refused | None:
    """May the host chain a proposal received from ``origin``? A9 (with A1, A4, A6)."""
    if proposal_origin != origin or server_of(sender) != origin:
        return Refused(Code.FORGED_SENDER, f"{origin} may not speak for {_short(sender)}")
    refusal = room.sealed()
    if refusal is not None:
        return refusal
    if room_type != room.room_type:
        return Refused(Code.MALFORMED, "proposal names another room type")
    if type == "m.message":
        if room.membership(sender) != "join":
            return Refused(Code.NOT_MEMBER, f"{_short(sender)} is not a joined member of {_short(room.room_id)}")
        if not isinstance(content.get("body"), str):
            return Refused(Code.MALFORMED, "a message has a text body")
        return None
    if type == "m.member":
        wanted = content.get("membership")
        if content.get("user") != sender:
            return Refused(Code.FORBIDDEN, "a member event from a member's server concerns its sender only")
        if not isinstance(wanted, str) or TRANSITIONS.get((room.membership(sender), wanted)) != "self":
            return Refused(Code.FORBIDDEN, f"{_short(sender)} cannot {str(wanted)[:20]} "
                                           f"(membership {room.membership(sender)})")
        return None
    return Refused(Code.MALFORMED, f"unknown event type {type[:40]!r}")


def push_targets(room: RoomFacts, server_name: str) -> list[str]:
    """The servers the host sends a room's new events to: every server with a
    joined member, but itself (sorted, for a stable order). None for a sealed
    room (A4): a room sealed after foreign members joined (its tenant turned
    federation off) stops flowing out at once."""
    if room.sealed() is not None:
        return []
    servers = {server_of(u) for u, m in room.members.items() if m == "join"}
    return sorted(s for s in servers if s is not None and s != server_name)
