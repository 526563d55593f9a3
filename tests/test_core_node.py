"""The Federation facade: routes, admission, invites, transactions, backfill
serving and timers, driven over the fake link where a peer is involved."""

from __future__ import annotations

import pytest

from corehelpers import (
    A,
    B,
    C,
    DAY,
    NOW,
    FakeLink,
    HostedRoom,
    build_chain,
    descriptor_bytes,
    events_body,
    head_of,
    invite_event,
    make_node,
    pair,
    run_handshake,
    tamper_envelope,
)
from scaiwave_federation.core import (
    Authenticated,
    Code,
    InviteDecision,
    KeyRing,
    NeedKeys,
    Party,
    Refused,
    Route,
    SendRequest,
    chain_event,
    make_event,
)
from scaiwave_federation.core.backfill import PAGE_CAP
from scaiwave_federation.core.requests import DEFAULT_SKEW_MS
from scaiwave_federation.core.wire import decode, encode

P = "/_scaiwave/federation/v1/"
BOB_A = f"@bob:{A}"


@pytest.mark.parametrize(
    "method, path, expected",
    [
        ("POST", P + "handshake", Route("handshake", None)),
        ("post", P + "handshake", Route("handshake", None)),
        ("PUT", P + f"invite/!dm:{B}", Route("invite", f"!dm:{B}")),
        ("PUT", P + "send/txn-1.a_b~c", Route("send", "txn-1.a_b~c")),
        ("GET", P + f"rooms/!grp:{B}/backfill", Route("backfill", f"!grp:{B}")),
    ],
)
def test_routes(method, path, expected):
    assert make_node(A, 1).route(method, path) == expected


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", P + "handshake"),
        ("POST", P + f"invite/!dm:{B}"),
        ("GET", P + "send/t1"),
        ("PUT", P + f"rooms/!grp:{B}/backfill"),
        ("PUT", P + "invite/dm"),  # a room id starts with !
        ("PUT", P + "send/a b"),
        ("PUT", P + "send/" + "t" * 129),
        ("POST", P + "handshake/x"),
        ("GET", P),
        ("GET", "/.well-known/scaiwave"),
        ("POST", "/_scaiwave/federation/v2/handshake"),
        ("GET", "/v1/rooms"),
    ],
)
def test_unknown_routes_are_not_found(method, path):
    result = make_node(A, 1).route(method, path)
    assert isinstance(result, Refused) and result.code is Code.NOT_FOUND


def _auth(origin=A):
    return Authenticated(origin, "ed25519:xxxxxxxx", b"n" * 32, NOW)


def test_admit_applies_policy_then_peering():
    b = make_node(B, 2, allowed=[A], blocked=[C])
    assert b.admit(_auth(A), peered=True) is None
    assert b.admit(_auth(A), peered=False).code is Code.NOT_PEERED
    assert b.admit(_auth(C), peered=True).code is Code.PEER_BLOCKED
    assert b.admit(_auth("d.test"), peered=True).code is Code.PEER_NOT_ALLOWED


def test_lookup_own_keys_from_the_ring_and_others_from_the_cache():
    a, b = pair()
    assert a.lookup(A) == a.keyring.public(A)
    assert a.lookup(B) is None
    a.learn_descriptor(B, descriptor_bytes(b), NOW)
    assert a.lookup(B) == b.keyring.public(B)


def test_timers_and_handle_timer():
    a, b = pair()
    assert b.timers() == {"rotate_key": NOW + 365 * DAY}
    assert make_node(C, None).timers() == {}
    auth = a.sign(destination=B, method="POST", target=P + "handshake", body=b"", now=NOW)
    b.learn_descriptor(A, descriptor_bytes(a), NOW)
    assert isinstance(b.authenticate(method="POST", target=P + "handshake", authorization=auth, body=b"", now=NOW),
                      Authenticated)
    assert b.timers()["expire_nonces"] == NOW + DEFAULT_SKEW_MS + 1
    assert b.handle_timer(NOW + DEFAULT_SKEW_MS) == []
    assert len(b.requests.replay) == 1
    assert b.handle_timer(NOW + DEFAULT_SKEW_MS + 1) == []
    assert "expire_nonces" not in b.timers()
    # Rotation is due after a year; the host rotates with its own randomness.
    assert b.handle_timer(NOW + 365 * DAY - 1) == []
    assert b.handle_timer(NOW + 365 * DAY) == ["rotate_key"]


# -- invites over the link ------------------------------------------------------------------


def _invite_setup(room_type="group", *, peer=True):
    """B hosts a room and invites @bob:your-host.test; A knows bob."""
    a, b = pair()
    link = FakeLink(a, b)
    link.server(A).users.add(BOB_A)
    if peer:
        assert run_handshake(link, B, A)[0].state == "peered"
    room_id = f"!r1:{B}"
    chain = build_chain(b.keyring.current, room_id, 2, room_type=room_type, sender=f"@alice:{B}")
    return link, a, b, room_id, chain


def _send_invite(link, b, room_id, body, now=NOW):
    target = P + f"invite/{room_id}"
    auth = b.sign(destination=A, method="PUT", target=target, body=body, now=now)
    return link.deliver(B, SendRequest(A, "PUT", target, body, auth), now)


def test_invite_accepted():
    link, a, b, room_id, chain = _invite_setup()
    invite = invite_event(b.keyring.current, chain, BOB_A)
    status, reply = _send_invite(link, b, room_id, events_body([invite]))
    assert status == 200, decode(reply, max_size=4096)
    (decision,) = link.server(A).invites
    assert decision == InviteDecision(room_id, "group", BOB_A, f"@alice:{B}", invite)


@pytest.mark.parametrize(
    "room_type, code",
    [("incognito", Code.ROOM_INCOGNITO), ("bridge", Code.ROOM_BRIDGE), ("sidekick", Code.ROOM_SIDEKICK)],
)
def test_invite_into_a_room_that_never_leaves_is_refused(room_type, code):
    link, a, b, room_id, chain = _invite_setup(room_type)
    invite = invite_event(b.keyring.current, chain, BOB_A)
    status, reply = _send_invite(link, b, room_id, events_body([invite]))
    assert status == 403
    assert decode(reply, max_size=4096)["error"]["code"] == code.value
    assert link.server(A).invites == []


def _decide(a, room_id, body, origin=B, federates=True, members=None):
    return a.on_invite(_auth(origin), room_id, body, local_user=lambda u: Party(u, tenant_federates=federates)
                       if u == BOB_A else None, members=members)


def test_invite_refusals():
    a, b = pair()
    a.learn_descriptor(B, descriptor_bytes(b), NOW)
    room_id = f"!r1:{B}"
    chain = build_chain(b.keyring.current, room_id, 2)
    key = b.keyring.current
    good = invite_event(key, chain, BOB_A)
    assert isinstance(_decide(a, room_id, events_body([good])), InviteDecision)
    cases = [
        # The origin must host the room it invites to.
        (_decide(a, f"!r1:{C}", events_body([good])), Code.FORBIDDEN),
        (_decide(a, room_id, events_body([good]), origin=C), Code.FORBIDDEN),
        (_decide(a, room_id, b"\xff"), Code.MALFORMED),
        (_decide(a, room_id, events_body([chain[0], good])), Code.MALFORMED),
        (_decide(a, room_id, encode({"events": [tamper_envelope(good, membership="join")]})), Code.BAD_SIGNATURE),
        (_decide(a, room_id, events_body([invite_event(key, build_chain(key, f"!r2:{B}", 1), BOB_A)])),
         Code.WRONG_ROOM),
        (_decide(a, room_id, events_body([chain[1]])), Code.MALFORMED),  # not an m.member invite
        (_decide(a, room_id, events_body([invite_event(key, chain, f"@carol:{A}")])), Code.NOT_FOUND),
        (_decide(a, room_id, events_body([invite_event(key, chain, f"@bob:{C}")])), Code.NOT_FOUND),
        # A8: a tenant without federation receives no invite from another server.
        (_decide(a, room_id, events_body([good]), federates=False), Code.TENANT_FEDERATION_DISABLED),
        # A1: no second invite of a user who is invited or joined already.
        (_decide(a, room_id, events_body([good]), members={BOB_A: "join"}), Code.CONFLICT),
        (_decide(a, room_id, events_body([good]), members={BOB_A: "invite"}), Code.CONFLICT),
        # The inviter is the host's user: an invite "from" a third server's user is forged.
        (_decide(a, room_id, events_body([chain_event(key, head=head_of(chain), room_id=room_id, room_type="group",
                                                      sender=f"@mallory:{C}", type="m.member", ts=NOW,
                                                      content={"membership": "invite", "user": BOB_A})])),
         Code.FORGED_SENDER),
    ]
    for result, code in cases:
        assert isinstance(result, Refused) and result.code is code, (result, code)


def test_invite_signed_with_a_key_we_lack_is_refused_not_returned_as_need_keys():
    # NeedKeys is only ever an effect: on_invite decides (unknown_key, retryable).
    a, b = pair()
    room_id = f"!r1:{B}"
    invite = invite_event(b.keyring.current, build_chain(b.keyring.current, room_id, 1), BOB_A)
    decision = _decide(a, room_id, events_body([invite]))
    assert isinstance(decision, Refused) and decision.code is Code.UNKNOWN_KEY and decision.retryable


def test_invite_without_handshake_is_not_peered():
    link, a, b, room_id, chain = _invite_setup(peer=False)
    status, reply = _send_invite(link, b, room_id, events_body([invite_event(b.keyring.current, chain, BOB_A)]))
    assert status == 403 and decode(reply, max_size=4096)["error"]["code"] == "not_peered"


def test_invite_to_a_server_without_a_key_is_own_key_missing():
    link, a, b, room_id, chain = _invite_setup()
    a.keyring = KeyRing()
    status, reply = _send_invite(link, b, room_id, events_body([invite_event(b.keyring.current, chain, BOB_A)]))
    assert status == 503 and decode(reply, max_size=4096)["error"]["code"] == "own_key_missing"


# -- transactions -------------------------------------------------------------------------


def _send(link, origin_node, destination, body, now=NOW, txn="t1"):
    target = P + f"send/{txn}"
    auth = origin_node.sign(destination=destination, method="PUT", target=target, body=body, now=now)
    return link.deliver(origin_node.server_name, SendRequest(destination, "PUT", target, body, auth), now)


def test_transaction_of_the_hosts_events_is_accepted():
    link, a, b, room_id, chain = _invite_setup()
    assert _send_invite(link, b, room_id, events_body([invite_event(b.keyring.current, chain, BOB_A)]))[0] == 200
    status, reply = _send(link, b, A, events_body(chain))
    assert status == 200
    assert decode(reply, max_size=4096) == {
        "results": [{"ok": True, "event_id": e.id_text} for e in chain], "events": []}
    assert link.server(A).received == chain
    # The same transaction again (a new signed request): the same reply, nothing stored twice.
    assert _send(link, b, A, events_body(chain), now=NOW + 1) == (200, reply)
    assert link.server(A).received == chain


def test_transaction_decided_by_the_core_refuses_a_gap_and_an_unknown_room():
    # The fake link runs the daemon's two core calls (on_events, on_transaction):
    # an event after a gap is chain_broken and a room we do not know is not_found,
    # both in the reply, neither stored.
    link, a, b, room_id, chain = _invite_setup()
    longer = build_chain(b.keyring.current, room_id, 4, room_type="group", sender=f"@alice:{B}")
    other = build_chain(b.keyring.current, f"!other:{B}", 1, room_type="group", sender=f"@alice:{B}")
    assert _send_invite(link, b, room_id, events_body([invite_event(b.keyring.current, longer, BOB_A)]))[0] == 200
    status, reply = _send(link, b, A, events_body([longer[0], longer[2], other[0]]))
    results = decode(reply, max_size=4096)["results"]
    assert status == 200 and results[0] == {"ok": True, "event_id": longer[0].id_text}
    assert [r["error"]["code"] for r in results[1:]] == ["chain_broken", "not_found"]
    assert link.server(A).received == [longer[0]]


def test_on_events_refuses_rooms_the_origin_does_not_host():
    a, b = pair()
    c = make_node(C, 3)
    for node in (b, c):
        a.learn_descriptor(node.server_name, descriptor_bytes(node), NOW)
    own = build_chain(b.keyring.current, f"!r:{B}", 1)[0]
    foreign = build_chain(c.keyring.current, f"!r:{C}", 1)[0]
    secret = build_chain(b.keyring.current, f"!s:{B}", 1, room_type="incognito")[0]
    proposal = make_event(b.keyring.current, room_id=f"!r:{A}", room_type="group", depth=0, prev=None, origin=B,
                          sender=f"@bob:{B}", type="m.message", ts=NOW, content={"body": "hi"})
    relayed = make_event(c.keyring.current, room_id=f"!r:{A}", room_type="group", depth=0, prev=None, origin=C,
                         sender=f"@carol:{C}", type="m.message", ts=NOW, content={"body": "hi"})
    results = a.on_events(_auth(B), events_body([own, foreign, secret, proposal, relayed]))
    assert results[0] == own
    assert results[1].code is Code.FORBIDDEN  # C's room, sent by B
    assert results[2].code is Code.ROOM_INCOGNITO
    assert results[3] == proposal  # B's own user's proposal into A's room
    assert results[4].code is Code.FORBIDDEN  # B may not relay C's proposals
    assert a.on_events(_auth(B), b"\xa0").code is Code.MALFORMED


def test_on_events_reports_bad_events_one_by_one():
    a, b = pair()
    a.learn_descriptor(B, descriptor_bytes(b), NOW)
    chain = build_chain(b.keyring.current, f"!r:{B}", 3)
    body = encode({"events": [chain[0].envelope, tamper_envelope(chain[1]), chain[2].envelope]})
    results = a.on_events(_auth(B), body)
    assert results[0] == chain[0] and results[2] == chain[2]
    assert results[1].code is Code.BAD_SIGNATURE


# -- backfill serving ---------------------------------------------------------------------------


def test_on_backfill_decisions():
    _, b = pair()
    room = f"!r:{B}"
    ok = dict(room_type="group", tenant_federates=True, members={f"@carol:{A}": "join", f"@dave:{B}": "join"})

    def ask(query, room_id=room, **kw):
        return b.on_backfill(_auth(A), room_id, query, **{**ok, **kw})

    assert ask({}) == (None, PAGE_CAP)
    assert ask({"before": "50", "limit": "10"}) == (50, 10)
    assert ask({"limit": "5000"}) == (None, PAGE_CAP)
    assert ask({"before": "1"}) == (1, PAGE_CAP)
    for bad in ({"before": "0"}, {"limit": "0"}, {"before": "x"}, {"limit": "-3"}, {"limit": "9" * 5000}):
        assert ask(bad).code is Code.MALFORMED, bad
    assert ask({}, room_type=None).code is Code.NOT_FOUND
    assert ask({}, room_id=f"!r:{A}").code is Code.NOT_FOUND
    assert ask({}, room_type="incognito").code is Code.ROOM_INCOGNITO
    assert ask({}, room_type="bridge").code is Code.ROOM_BRIDGE
    assert ask({}, room_type="sidekick").code is Code.ROOM_SIDEKICK
    assert ask({}, tenant_federates=False).code is Code.TENANT_FEDERATION_DISABLED
    # A7: only a server with a *joined* member reads history; an invite reads nothing.
    assert ask({}, members={}).code is Code.NOT_MEMBER
    assert ask({}, members={f"@carol:{A}": "invite"}).code is Code.NOT_MEMBER
    assert ask({}, members={f"@carol:{A}": "leave", f"@eve:{A}": "decline"}).code is Code.NOT_MEMBER
    assert ask({}, members={f"@carol:{C}": "join"}).code is Code.NOT_MEMBER


def test_backfill_over_the_link_refuses_a_room_of_a_tenant_without_federation():
    a, b = pair()
    link = FakeLink(a, b)
    run_handshake(link, A, B)
    room_id = f"!r:{B}"
    link.server(B).rooms[room_id] = HostedRoom("group", build_chain(b.keyring.current, room_id, 3),
                                               tenant_federates=False, member_servers={A})
    target = P + f"rooms/{room_id}/backfill?limit=10"
    auth = a.sign(destination=B, method="GET", target=target, body=b"", now=NOW)
    status, reply = link.deliver(A, SendRequest(B, "GET", target, b"", auth), NOW)
    assert status == 403
    assert decode(reply, max_size=4096)["error"]["code"] == "tenant_federation_disabled"


def test_requests_to_unknown_endpoints_are_not_found_over_the_link():
    a, b = pair()
    link = FakeLink(a, b)
    target = P + "nowhere"
    auth = a.sign(destination=B, method="GET", target=target, body=b"", now=NOW)
    status, reply = link.deliver(A, SendRequest(B, "GET", target, b"", auth), NOW)
    assert status == 404 and decode(reply, max_size=4096)["error"]["code"] == "not_found"


def test_authentication_failure_over_the_link_is_401():
    a, b = pair()
    link = FakeLink(a, b)
    target = P + "handshake"
    auth = a.sign(destination=B, method="POST", target=target, body=b"", now=NOW - 10 * DAY)
    status, reply = link.deliver(A, SendRequest(B, "POST", target, b"", auth), NOW)
    assert status == 401 and decode(reply, max_size=4096)["error"]["code"] == "clock_skew"



def test_third_party_words_are_verified_unless_their_server_is_blocked():
    """Policy rule 6: an admitted host may relay a third server's member's
    proposal; we fetch that server's keys unless it is blocked (or we are closed)."""
    a, b = pair()
    c = make_node(C, 3)
    room_id = f"!r:{B}"
    chain = build_chain(b.keyring.current, room_id, 1)
    proposal = make_event(c.keyring.current, room_id=room_id, room_type="group", depth=0, prev=None, origin=C,
                          sender=f"@carol:{C}", type="m.message", ts=NOW, content={"body": "hi"})
    relayed = chain_event(b.keyring.current, head=head_of(chain), room_id=room_id, room_type="group",
                          sender=f"@carol:{C}", type="m.message", ts=NOW, content={"body": "hi"},
                          source=proposal.envelope)
    a.learn_descriptor(B, descriptor_bytes(b), NOW)
    (need,) = a.on_events(_auth(B), events_body([relayed]))
    assert need == NeedKeys(C, c.keyring.current.key_id)
    # invite_only without C: C is no peer of ours, but its user's words are verified.
    assert a.may_fetch_keys(C, NOW) is None
    assert a.unverifiable(need).code is Code.UNKNOWN_KEY
    a.learn_descriptor(C, descriptor_bytes(c), NOW)
    (event,) = a.on_events(_auth(B), events_body([relayed]))
    assert event.sender == f"@carol:{C}" and event.source == proposal.envelope
    # Blocked (or closed): never fetched, refused with the policy's code.
    blocked = make_node(A, 1, allowed=[B], blocked=[C])
    assert blocked.may_fetch_keys(C, NOW).code is Code.PEER_BLOCKED
    assert blocked.unverifiable(need).code is Code.PEER_BLOCKED
    assert make_node(A, 1, mode="closed").may_fetch_keys(C, NOW).code is Code.FEDERATION_CLOSED
