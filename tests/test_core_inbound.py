"""core.inbound: a verified transaction decided whole from a snapshot (no network, no storage)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from corehelpers import A, B, NOW, build_chain, descriptor_bytes, events_body, head_of, pair
from scaiwave_federation.core import Code, Head, KeyRing, NeedKeys, make_event
from scaiwave_federation.core.inbound import (
    RoomState,
    TxnSnapshot,
    held_needed,
    proposals_needed,
    rooms_needed,
    snapshot_context,
    snapshot_from_context,
)
from scaiwave_federation.core.requests import Authenticated
from scaiwave_federation.core.wire import decode

HOSTED = f"!mine:{A}"  # hosted by A (the receiver)
THEIRS = f"!grp:{B}"  # hosted by B (the sender)
CAROL_B = f"@carol:{B}"


def _auth(origin: str = B) -> Authenticated:
    return Authenticated(origin, "k", b"n" * 32, NOW)


def _nodes():
    a, b = pair()
    a.learn_descriptor(B, descriptor_bytes(b), NOW)
    return a, b


def _proposal(b, body: str = "hi", *, type: str = "m.message", content: dict | None = None, sender: str = CAROL_B):
    return make_event(b.keyring.current, room_id=HOSTED, room_type="group", depth=0, prev=None, origin=B,
                      sender=sender, type=type, ts=NOW, content=content if content is not None else {"body": body})


def _decide(a, events, snapshot, origin=B):
    results = a.on_events(_auth(origin), events_body(events))
    return results, a.on_transaction(_auth(origin), results, snapshot, NOW)


def _reply(decision) -> list[dict]:
    return decode(decision.reply, max_size=1 << 20)["results"]


def test_chained_events_append_duplicate_fork_and_unknown_rooms():
    a, b = _nodes()
    chain = build_chain(b.keyring.current, THEIRS, 4)
    fork = build_chain(b.keyring.current, THEIRS, 4, sender=f"@zed:{B}")[3]
    stranger_room = build_chain(b.keyring.current, f"!other:{B}", 1)
    snapshot = TxnSnapshot(
        {THEIRS: RoomState(known=True, host=B, head=head_of(chain[:2])), f"!other:{B}": RoomState(known=False)},
        held={chain[1].id_text: chain[1].event_id})
    results, decision = _decide(a, [chain[1], chain[2], chain[3], fork, stranger_room[0]], snapshot)
    assert rooms_needed(results) == [THEIRS, f"!other:{B}"]
    assert held_needed(results, snapshot.rooms) == [(THEIRS, 2, chain[1].id_text)]
    assert decision.outcomes == ("ok", "ok", "ok", "chain_broken", "not_found")
    assert decision.store == (chain[2], chain[3]) and decision.stored == 2 and decision.echoed == 1
    assert [r.get("ok") for r in _reply(decision)] == [True, True, True, None, None]
    assert [r.code for r in decision.refused] == [Code.CHAIN_BROKEN, Code.NOT_FOUND]  # reported, never silent
    assert decision.catch_ups == ()


def test_an_event_above_a_gap_from_the_host_starts_one_catch_up():
    a, b = _nodes()
    chain = build_chain(b.keyring.current, THEIRS, 6)
    snapshot = TxnSnapshot({THEIRS: RoomState(known=True, host=B, head=head_of(chain[:2]))})
    _, decision = _decide(a, [chain[4], chain[5]], snapshot)
    assert decision.outcomes == ("chain_broken", "chain_broken")
    assert [(c.room_id, c.host, c.head) for c in decision.catch_ups] == [(THEIRS, B, head_of(chain[:2]))]


def test_proposals_are_chained_with_memberships_moving_inside_the_transaction():
    a, b = _nodes()
    mine = build_chain(a.keyring.current, HOSTED, 2)
    join = _proposal(b, type="m.member", content={"membership": "join", "user": CAROL_B})
    post = _proposal(b, "hello")
    stranger = _proposal(b, "hi", sender=f"@dave:{B}")
    snapshot = TxnSnapshot({HOSTED: RoomState(known=True, host=A, head=head_of(mine), room_type="group",
                                              members={f"@alice:{A}": "join", CAROL_B: "invite"})})
    results, decision = _decide(a, [join, post, stranger], snapshot)
    assert decision.outcomes == ("ok", "ok", "not_member")
    joined, posted = decision.chained
    assert (joined.depth, posted.depth) == (3, 4) and posted.prev == joined.event_id
    assert joined.source == join.envelope and posted.source == post.envelope and posted.sender == CAROL_B
    assert decision.store == decision.chained and decision.memberships == ((HOSTED, CAROL_B, "join"),)
    assert [r.get("chained") for r in _reply(decision)] == [joined.id_text, posted.id_text, None]
    assert decode(decision.reply, max_size=1 << 20)["events"] == [joined.envelope, posted.envelope]
    assert set(proposals_needed(results)) == {(HOSTED, join.event_id), (HOSTED, post.event_id),
                                               (HOSTED, stranger.event_id)}
    # Queued for the room's member servers as it stands after the join: the
    # proposer's server included (it had only an invite before).
    assert decision.pushes == ((HOSTED, (B,)),)
    # Nothing chained, nothing to queue.
    _, decision = _decide(a, [stranger], snapshot)
    assert decision.pushes == ()


def test_a_proposal_is_chained_once_and_a_second_chaining_is_refused():
    a, b = _nodes()
    mine = build_chain(a.keyring.current, HOSTED, 2)
    post = _proposal(b, "I agree")
    state = RoomState(known=True, host=A, head=head_of(mine), room_type="group", members={CAROL_B: "join"})
    _, twice = _decide(a, [post, post], TxnSnapshot({HOSTED: state}))
    assert twice.outcomes == ("ok", "conflict") and len(twice.chained) == 1
    _, again = _decide(a, [post], TxnSnapshot({HOSTED: state}, chained={(HOSTED, post.event_id): b"\x01" * 32}))
    assert again.outcomes == ("conflict",) and again.store == ()


def test_a_host_chaining_one_proposal_twice_in_one_transaction_gets_the_second_refused():
    """The snapshot says the proposal is chained nowhere yet (None): the first
    chaining in the transaction must count for the second."""
    a, b = _nodes()
    chain = build_chain(b.keyring.current, THEIRS, 2)
    proposal = make_event(a.keyring.current, room_id=THEIRS, room_type="group", depth=0, prev=None, origin=A,
                          sender=f"@bob:{A}", type="m.message", ts=NOW, content={"body": "I agree"})
    from scaiwave_federation.core import chain_event

    first = chain_event(b.keyring.current, head=head_of(chain), room_id=THEIRS, room_type="group",
                        sender=f"@bob:{A}", type="m.message", ts=NOW, content={"body": "I agree"},
                        source=proposal.envelope)
    second = chain_event(b.keyring.current, head=Head(3, first.event_id), room_id=THEIRS, room_type="group",
                         sender=f"@bob:{A}", type="m.message", ts=NOW, content={"body": "I agree"},
                         source=proposal.envelope)
    snapshot = TxnSnapshot({THEIRS: RoomState(known=True, host=B, head=head_of(chain))},
                           chained={(THEIRS, proposal.event_id): None})
    _, decision = _decide(a, [first, second], snapshot)
    assert decision.outcomes == ("ok", "conflict") and decision.store == (first,)
    results = a.on_events(_auth(), events_body([first, second]))
    reply = a.on_proposal_reply(B, results, snapshot, NOW)
    assert reply.outcomes == ("ok", "conflict") and reply.store == (first,)


def test_proposals_for_rooms_we_do_not_host_and_without_a_key_are_refused():
    a, b = _nodes()
    post = _proposal(b)
    _, decision = _decide(a, [post], TxnSnapshot({HOSTED: RoomState(known=True, host=B)}))
    assert decision.outcomes == ("not_found",)
    state = RoomState(known=True, host=A, head=None, room_type="group", members={CAROL_B: "join"})
    results = a.on_events(_auth(), events_body([post]))
    assert a.on_transaction(_auth(), results, TxnSnapshot({HOSTED: state}), NOW).outcomes == ("ok",)
    a.keyring = KeyRing()
    assert a.on_transaction(_auth(), results, TxnSnapshot({HOSTED: state}), NOW).outcomes == ("own_key_missing",)


def test_events_whose_keys_are_missing_get_the_policys_code_or_unknown_key():
    a, _ = _nodes()
    results = [NeedKeys("third.test", "ed25519:x"), NeedKeys(B, "ed25519:y")]
    decision = a.on_transaction(_auth(), results, TxnSnapshot({}), NOW)
    assert decision.outcomes == ("unknown_key", "unknown_key")  # retryable: not reported as final
    assert decision.refused == ()


def test_the_decision_is_deterministic():
    a, b = _nodes()
    mine = build_chain(a.keyring.current, HOSTED, 1)
    state = RoomState(known=True, host=A, head=head_of(mine), room_type="group", members={CAROL_B: "join"})
    first = _decide(a, [_proposal(b)], TxnSnapshot({HOSTED: state}))[1]
    assert _decide(a, [_proposal(b)], TxnSnapshot({HOSTED: state}))[1] == first


_ids = st.binary(min_size=32, max_size=32)
_room = st.sampled_from([HOSTED, THEIRS, f"!x:{B}"])
_state = st.builds(RoomState, known=st.booleans(), host=st.sampled_from([None, A, B]),
                   head=st.none() | st.builds(Head, st.integers(1, 10**6), _ids),
                   room_type=st.sampled_from([None, "group", "dm"]), tenant_federates=st.booleans(),
                   members=st.dictionaries(st.sampled_from([CAROL_B, f"@alice:{A}"]),
                                           st.sampled_from(["invite", "join", "leave", "decline"])))


@given(st.builds(TxnSnapshot, st.dictionaries(_room, _state),
                 st.dictionaries(st.text(min_size=1, max_size=8), st.none() | _ids),
                 st.dictionaries(st.tuples(_room, _ids), st.none() | _ids)))
def test_the_recorded_snapshot_reads_back_the_same(snapshot):
    """What the recorder writes (``context``) is what a replay decides from."""
    back = snapshot_from_context(snapshot_context(snapshot))
    rooms = {r: RoomState(s.known, s.host, s.head, s.room_type, s.tenant_federates if s.room_type else True,
                          s.members if s.room_type else {}) for r, s in snapshot.rooms.items()}
    assert back == TxnSnapshot(rooms, snapshot.held, snapshot.chained)


def test_a_snapshot_of_chains_held_in_memory():
    a, b = _nodes()
    chain = build_chain(b.keyring.current, THEIRS, 4)
    results = a.on_events(_auth(), events_body([chain[1], chain[3]]))
    from scaiwave_federation.core.inbound import snapshot_of_chains

    snapshot = snapshot_of_chains(results, {THEIRS: chain[:3]})
    assert snapshot.rooms[THEIRS] == RoomState(known=True, host=B, head=head_of(chain[:3]))
    assert snapshot.held == {chain[1].id_text: chain[1].event_id}
    decision = a.on_transaction(_auth(), results, snapshot, NOW)
    assert decision.outcomes == ("ok", "ok") and decision.store == (chain[3],) and decision.echoed == 1
    assert snapshot_of_chains(results, {}).rooms[THEIRS] == RoomState(known=False, host=B)


def _our_join(a, b, chain):
    """The host B chaining A's user's join proposal onto ``chain`` (as it does for our proposal)."""
    from scaiwave_federation.core import chain_event

    proposal = make_event(a.keyring.current, room_id=THEIRS, room_type="group", depth=0, prev=None, origin=A,
                          sender=f"@alice:{A}", type="m.member", ts=NOW, content={"membership": "join"})
    return chain_event(b.keyring.current, head=head_of(chain), room_id=THEIRS, room_type="group",
                       sender=f"@alice:{A}", type="m.member", ts=NOW, content={"membership": "join"},
                       source=proposal.envelope)


def test_our_own_join_pushed_before_the_proposals_reply_starts_the_room():
    """Our user joined a room on B: B's outbox may deliver the chained join
    before B's reply to our proposal reaches us. The room starts with it, as
    with the reply (same event, same signatures, our proposal inside it):
    no chain_broken reported against B. Anything else pushed into a room we
    hold none of still does not start it."""
    a, b = _nodes()
    chain = build_chain(b.keyring.current, THEIRS, 3)
    join = _our_join(a, b, chain)
    invited = TxnSnapshot({THEIRS: RoomState(known=True, host=B, head=None)})
    _, decision = _decide(a, [join], invited)
    assert decision.outcomes == ("ok",) and decision.store == (join,) and decision.refused == ()
    # Another event, or another server's user's join, pushed into a room we hold none of: still refused.
    other = build_chain(b.keyring.current, THEIRS, 4)[3]
    _, decision = _decide(a, [other], invited)
    assert decision.outcomes == ("chain_broken",) and decision.store == ()
    # Once we hold the room, the join is linked like any event: a duplicate of the reply's copy.
    held = TxnSnapshot({THEIRS: RoomState(known=True, host=B, head=Head(join.depth, join.event_id))},
                       held={join.id_text: join.event_id})
    _, decision = _decide(a, [join], held)
    assert decision.outcomes == ("ok",) and decision.store == () and decision.echoed == 1
    # The host cannot make one up: a join of our user without our signed
    # proposal inside is a forged sender, and starts nothing.
    from scaiwave_federation.core import chain_event

    forged = chain_event(b.keyring.current, head=head_of(chain), room_id=THEIRS, room_type="group",
                         sender=f"@alice:{A}", type="m.member", ts=NOW, content={"membership": "join"})
    _, decision = _decide(a, [forged], invited)
    assert decision.outcomes == ("forged_sender",) and decision.store == ()
    # Relayed by a server that is not the room's host: refused.
    third = TxnSnapshot({THEIRS: RoomState(known=True, host="third.test", head=None)})
    _, decision = _decide(a, [join], third)
    assert decision.outcomes != ("ok",)
