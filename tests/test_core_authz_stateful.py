"""Room authorization as a hypothesis state machine (core only, no network).

A host (your-host.test) with users of two tenants (one of them, drawn per run,
may have federation disabled), a member server (peer.test) and a hostile third
server (evil.test). Arbitrary sequences of create, invite, accept, decline,
leave, post, read and backfill, by local users, by remote users through real
signed proposals, and by the hostile server speaking for others, go through the
very functions the daemon asks (``core.authz``, ``check_proposal``,
``Federation.on_backfill``, ``verify_events``). After every step:

- nobody reads or writes a room without a joined membership;
- a sealed room (incognito, bridge, sidekick, or owned by a tenant without
  federation) never has a member from another server or another tenant;
- a DM never has more than its two parties;
- no event we would store carries a sender its origin could not speak for;
- history is served only to a server with a joined member.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from scaiwave_federation.core import Code, Event, KeyRing, NeedKeys, Party, Policy, RoomFacts, chain_event, make_event
from scaiwave_federation.core.authz import (
    may_answer,
    may_invite,
    may_leave,
    may_post,
    may_read,
    push_targets,
    server_may_read_history,
)
from scaiwave_federation.core.events import verify_events
from scaiwave_federation.core.names import server_of
from scaiwave_federation.core.node import Federation
from scaiwave_federation.core.rooms import Head, check_proposal

NOW = 1_764_000_000_000
HOST, PEER, EVIL = "your-host.test", "peer.test:8449", "evil.test"
LOCAL = [f"@{n}:{HOST}" for n in ("alice", "bob", "carol", "dave")]
TENANT = {LOCAL[0]: "acme", LOCAL[1]: "acme", LOCAL[2]: "globex", LOCAL[3]: "globex"}
REMOTE = [f"@{n}:{PEER}" for n in ("erin", "frank")]
HOSTILE = [f"@{n}:{EVIL}" for n in ("mallory",)]
EVERYONE = LOCAL + REMOTE + HOSTILE
ROOM_TYPES = ["group", "dm", "incognito", "bridge", "sidekick"]
RINGS = {name: KeyRing().generate(bytes([i + 1]) * 32, NOW - 1000) for i, name in enumerate((HOST, PEER, EVIL))}
KEYS = {name: ring.public(name) for name, ring in RINGS.items()}


class Rooms(RuleBasedStateMachine):

    @initialize(globex_federates=st.booleans())
    def start(self, globex_federates: bool) -> None:
        self.federates = {"acme": True, "globex": globex_federates}
        self.rooms: dict[str, dict] = {}  # room id -> {"type", "tenant", "members", "parties"}
        self.stored: list[Event] = []  # events this host would store from others
        self.node = Federation(HOST, keyring=RINGS[HOST], policy=Policy("open"))
        self.count = 0

    # -- facts ---------------------------------------------------------------------------------

    def party(self, user: str) -> Party | None:
        if server_of(user) != HOST:
            return Party(user)
        return Party(user, TENANT[user], self.federates[TENANT[user]])

    def facts(self, room_id: str) -> RoomFacts:
        room = self.rooms[room_id]
        return RoomFacts(room_id, room["type"], room["tenant"], self.federates[room["tenant"]], dict(room["members"]))

    def pick_room(self, data, among: list[str] | None = None, memberships: tuple[str, ...] = ()) -> str | None:
        """Any room, but most often one holding someone of ``among`` with one of ``memberships``."""
        if not self.rooms:
            return None
        likely = sorted(r for r, room in self.rooms.items()
                        if any(u in (among or ()) and m in memberships for u, m in room["members"].items()))
        if likely and data.draw(st.integers(0, 3)) > 0:
            return data.draw(st.sampled_from(likely))
        return data.draw(st.sampled_from(sorted(self.rooms)))

    def pick_user(self, data, room_id: str, among: list[str], memberships: tuple[str, ...]) -> str:
        """Anyone of ``among``, but most often someone the room holds with one of
        ``memberships``, so that runs reach deep states (joins, leaves, toggles)."""
        likely = [u for u, m in self.rooms[room_id]["members"].items() if m in memberships and u in among]
        if likely and data.draw(st.integers(0, 3)) > 0:
            return data.draw(st.sampled_from(sorted(likely)))
        return data.draw(st.sampled_from(among))

    def proposal(self, signer: str, sender: str, room_id: str, type: str, content: dict) -> Event:
        """A proposal claiming to come from the sender's server, signed by ``signer``'s key."""
        return make_event(RINGS[signer].current, room_id=room_id, room_type=self.rooms[room_id]["type"], depth=0,
                          prev=None, origin=server_of(sender), sender=sender, type=type, ts=NOW, content=content)

    def set(self, room_id: str, user: str, membership: str) -> None:
        self.rooms[room_id]["members"][user] = membership

    # -- local users ---------------------------------------------------------------------------

    @rule(tenant=st.sampled_from(["acme", "globex"]))
    def toggle_federation(self, tenant: str) -> None:
        """An admin turns a tenant's federation off (or on) with rooms already federated."""
        self.federates[tenant] = not self.federates[tenant]

    @rule(creator=st.sampled_from(LOCAL), room_type=st.sampled_from(ROOM_TYPES))
    def create(self, creator: str, room_type: str) -> None:
        self.count += 1
        room_id = f"!r{self.count}:{HOST}"
        self.rooms[room_id] = {"type": room_type, "tenant": TENANT[creator], "members": {creator: "join"}}

    @rule(data=st.data(), invitee=st.sampled_from(EVERYONE))
    def invite(self, data, invitee: str) -> None:
        room_id = self.pick_room(data, LOCAL, ("join",))
        if room_id is None:
            return
        inviter = self.pick_user(data, room_id, LOCAL, ("join",))
        facts = self.facts(room_id)
        refusal = may_invite(facts, server_name=HOST, inviter=self.party(inviter), invitee=self.party(invitee),
                             invitee_id=invitee)
        if refusal is None:
            assert facts.membership(inviter) == "join"
            # A sealed room gains no member from another server or tenant.
            assert facts.sealed() is None or (server_of(invitee) == HOST and TENANT[invitee] == facts.tenant)
            self.set(room_id, invitee, "invite")
        else:
            assert refusal.code in (Code.NOT_MEMBER, Code.CONFLICT, Code.FORBIDDEN, Code.NOT_FOUND,
                                    Code.TENANT_FEDERATION_DISABLED, Code.ROOM_INCOGNITO, Code.ROOM_BRIDGE,
                                    Code.ROOM_SIDEKICK), refusal

    @rule(data=st.data(), answer=st.sampled_from(["join", "decline"]))
    def answer(self, data, answer: str) -> None:
        room_id = self.pick_room(data, LOCAL, ("invite",))
        if room_id is None:
            return
        user = self.pick_user(data, room_id, LOCAL, ("invite",))
        facts = self.facts(room_id)
        if may_answer(facts, user=self.party(user), answer=answer, server_name=HOST) is None:
            assert facts.membership(user) == "invite"
            self.set(room_id, user, answer)

    @rule(data=st.data())
    def leave(self, data) -> None:
        room_id = self.pick_room(data)
        if room_id is None:
            return
        user = self.pick_user(data, room_id, LOCAL, ("join",))
        facts = self.facts(room_id)
        if may_leave(facts, user=self.party(user), server_name=HOST) is None:
            assert facts.membership(user) == "join"
            self.set(room_id, user, "leave")

    @rule(data=st.data(), write=st.booleans())
    def post_or_read(self, data, write: bool) -> None:
        room_id = self.pick_room(data)
        if room_id is None:
            return
        user = self.pick_user(data, room_id, LOCAL, ("join", "invite"))
        facts = self.facts(room_id)
        ask = may_post(facts, user=self.party(user), server_name=HOST) if write else may_read(facts, user=self.party(user))
        if ask is None:
            assert facts.membership(user) == "join"  # nobody reads or writes without joining
        else:
            assert facts.membership(user) != "join" and ask.code is Code.NOT_MEMBER

    # -- remote users, through signed proposals ------------------------------------------------------

    def _remote_in(self, membership: str) -> list[tuple[str, str]]:
        return sorted((r, u) for r, room in getattr(self, "rooms", {}).items() for u, m in room["members"].items()
                      if m == membership and server_of(u) != HOST)

    @precondition(lambda self: self._remote_in("invite") or self._remote_in("join"))
    @rule(data=st.data(), what=st.sampled_from(["join", "join", "decline", "message", "leave"]))
    def remote_member_acts(self, data, what: str) -> None:
        """A remote user of the room acts through its own server, honestly."""
        room_id, user = data.draw(st.sampled_from(self._remote_in("invite") + self._remote_in("join")))
        self._propose(room_id, user, server_of(user) or PEER, server_of(user) or PEER, what)

    @rule(data=st.data(), honest=st.booleans(), signer=st.sampled_from([PEER, EVIL]),
          origin=st.sampled_from([PEER, EVIL]), what=st.sampled_from(["join", "decline", "leave", "message"]))
    def remote_proposal(self, data, honest: bool, signer: str, origin: str, what: str) -> None:
        room_id = self.pick_room(data, REMOTE + HOSTILE, ("invite", "join"))
        if room_id is None:
            return
        user = self.pick_user(data, room_id, REMOTE + HOSTILE, ("invite", "join"))
        if honest:  # the user's own server, speaking for its user (half the time)
            signer = origin = server_of(user) or PEER
        self._propose(room_id, user, signer, origin, what)

    def _propose(self, room_id: str, user: str, signer: str, origin: str, what: str) -> None:
        facts = self.facts(room_id)
        if what == "message":
            proposal = self.proposal(signer, user, room_id, "m.message", {"body": "hi"})
        else:
            proposal = self.proposal(signer, user, room_id, "m.member", {"membership": what, "user": user})
        (verified,) = verify_events([proposal.envelope], KEYS.get)
        if not isinstance(verified, Event):
            # Signed by another server than the sender's: its key is not one of the
            # sender's server (NeedKeys: unknown key id), or does not verify.
            assert signer != server_of(user)
            assert isinstance(verified, NeedKeys) or verified.code is Code.BAD_SIGNATURE
            return
        refusal = check_proposal(verified, origin=origin, room_type=facts.room_type,
                                 tenant_federates=facts.tenant_federates, membership=facts.membership(user))
        if refusal is not None:
            return
        # Accepted: the origin speaks for its own user, who is allowed to do this.
        assert origin == signer == server_of(user)
        assert facts.sealed() is None
        if what == "message":
            assert facts.membership(user) == "join"
        else:
            assert (facts.membership(user), what) in {("invite", "join"), ("invite", "decline"), ("join", "leave")}
            self.set(room_id, user, what)

    @rule(data=st.data(), server=st.sampled_from([PEER, EVIL]))
    def backfill(self, data, server: str) -> None:
        room_id = self.pick_room(data, REMOTE + HOSTILE, ("invite", "join"))
        if room_id is None:
            return
        facts = self.facts(room_id)
        from scaiwave_federation.core.requests import Authenticated

        answer = self.node.on_backfill(Authenticated(server, "k", b"n", NOW), room_id, {}, room_type=facts.room_type,
                                       tenant_federates=facts.tenant_federates, members=facts.members)
        if isinstance(answer, tuple):
            assert facts.sealed() is None
            assert any(m == "join" and server_of(u) == server for u, m in facts.members.items())

    # -- a hostile host speaking for others ------------------------------------------------------

    @rule(sender=st.sampled_from(EVERYONE), with_source=st.sampled_from([None, PEER, EVIL, HOST]))
    def hostile_host_event(self, sender: str, with_source: str | None) -> None:
        room_id = f"!evil:{EVIL}"
        source = None
        if with_source is not None:
            if server_of(sender) != with_source:
                return  # the decoder itself refuses a proposal not signed by its sender's server
            source = make_event(RINGS[with_source].current, room_id=room_id, room_type="group", depth=0, prev=None,
                                origin=with_source, sender=sender, type="m.message", ts=NOW,
                                content={"body": "words"}).envelope
        event = chain_event(RINGS[EVIL].current, head=Head(3, b"\x01" * 32), room_id=room_id, room_type="group",
                            sender=sender, type="m.message", ts=NOW, content={"body": "words"}, source=source)
        (result,) = verify_events([event.envelope], KEYS.get)
        if isinstance(result, Event):
            self.stored.append(result)
        elif server_of(sender) != EVIL and source is None:
            assert result.code is Code.FORGED_SENDER

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def sealed_rooms_flow_nowhere(self) -> None:
        """A sealed room's events go to no other server and its history to no one,
        even when it was sealed after foreign members joined."""
        for room_id in getattr(self, "rooms", {}):
            facts = self.facts(room_id)
            if facts.sealed() is not None:
                assert push_targets(facts, HOST) == []
                for server in (PEER, EVIL):
                    assert server_may_read_history(facts, server) is not None
            else:
                assert set(push_targets(facts, HOST)) == {
                    server_of(u) for u, m in facts.members.items() if m == "join"} - {HOST}

    @invariant()
    def dms_have_two_parties(self) -> None:
        for room in getattr(self, "rooms", {}).values():
            if room["type"] == "dm":
                assert len(room["members"]) <= 2, room

    @invariant()
    def stored_senders_are_vouched_for(self) -> None:
        for event in getattr(self, "stored", []):
            if server_of(event.sender) != event.origin:
                assert event.source is not None
                (proposal,) = verify_events([event.source], KEYS.get)
                assert isinstance(proposal, Event) and proposal.origin == server_of(event.sender)
                assert proposal.sender == event.sender and proposal.content == event.content


TestRooms = Rooms.TestCase
# Cheap steps (no network): more runs and longer ones than the profile's default.
TestRooms.settings = settings(settings.default, max_examples=max(settings.default.max_examples, 200),
                              stateful_step_count=50)
