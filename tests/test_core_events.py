"""Events and rooms: signed, hash-chained events, proposals, chain links and
the host's rules for chaining a member's proposal."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corehelpers import A, B, DAY, NOW, build_chain, head_of, invite_event, make_node, seed, tamper_envelope
from scaiwave_federation.core import (
    Code,
    Event,
    Head,
    KeyRing,
    LocalProtocolError,
    NeedKeys,
    Refused,
    chain_event,
    check_proposal,
    decode_event,
    link,
    make_event,
    verify_events,
)
from scaiwave_federation.core.events import MAX_EVENT_BYTES, event_id_text
from scaiwave_federation.core.keys import Domain, sign
from scaiwave_federation.core.rooms import MAX_TXN_EVENTS, LinkResult, decode_events_body, encode_events_body
from scaiwave_federation.core.wire import b64e, decode, encode

ROOM = f"!grp:{B}"
ALICE = f"@alice:{A}"
BOB = f"@bob:{B}"


def _nodes():
    return make_node(A, 1), make_node(B, 2)


def _lookup(*nodes):
    keys = {n.server_name: n.keyring.public(n.server_name) for n in nodes}
    return keys.get


def test_make_decode_round_trip():
    _, b = _nodes()
    event = make_event(b.keyring.current, room_id=ROOM, room_type="group", depth=1, prev=None, origin=B,
                       sender=BOB, type="m.create", ts=NOW, content={"creator": BOB, "n": [1, {"x": b"y"}]})
    again = decode_event(event.envelope)
    assert again == event
    assert event.event_id == hashlib.sha256(event.body).digest()
    assert event.id_text == "$" + b64e(event.event_id) == event_id_text(event.event_id)
    assert decode(event.envelope, max_size=MAX_EVENT_BYTES) == [event.body, b.keyring.current.key_id, event.signature]
    assert (event.room_id, event.depth, event.prev, event.origin, event.sender, event.type, event.ts) == (
        ROOM, 1, None, B, BOB, "m.create", NOW)
    assert event.as_record() == {"event_id": event.event_id, "depth": 1, "sender": BOB, "origin": B,
                                 "type": "m.create", "ts": NOW, "envelope": event.envelope}
    assert verify_events([event.envelope], _lookup(b)) == [event]


def test_chain_links_each_event_to_the_previous():
    _, b = _nodes()
    chain = build_chain(b.keyring.current, ROOM, 5)
    assert [e.depth for e in chain] == [1, 2, 3, 4, 5]
    assert chain[0].prev is None
    for prev, event in zip(chain, chain[1:]):
        assert event.prev == prev.event_id
    assert all(isinstance(r, Event) for r in verify_events([e.envelope for e in chain], _lookup(b)))


def test_tampered_body_is_bad_signature():
    _, b = _nodes()
    event = build_chain(b.keyring.current, ROOM, 2)[1]
    forged = tamper_envelope(event, body="forged")
    (result,) = verify_events([forged], _lookup(b))
    assert isinstance(result, Refused) and result.code is Code.BAD_SIGNATURE
    # The forged body also has another id: the id is the content hash.
    assert decode_event(forged).event_id != event.event_id


def test_signature_of_another_server_is_bad_signature():
    a, b = _nodes()
    event = build_chain(b.keyring.current, ROOM, 1)[0]
    # Re-sign B's event with A's key but keep B's key id.
    forged = encode([event.body, event.key_id, sign(a.keyring.current, Domain.EVENT, event.body)])
    (result,) = verify_events([forged], _lookup(a, b))
    assert result.code is Code.BAD_SIGNATURE


def test_unknown_signer_needs_keys():
    a, b = _nodes()
    event = build_chain(b.keyring.current, ROOM, 1)[0]
    assert verify_events([event.envelope], _lookup(a)) == [NeedKeys(B, b.keyring.current.key_id)]
    # Known server, unknown key id (it rotated since we last looked).
    stale = make_node(B, 3).keyring.public(B)
    assert verify_events([event.envelope], {B: stale}.get) == [NeedKeys(B, b.keyring.current.key_id)]


def test_event_after_its_key_was_rotated_out_is_expired_key():
    ring = KeyRing().generate(seed(2), NOW)
    old_key = ring.current
    ring = ring.rotate(seed(12), NOW + DAY)
    before, after = (chain_event(old_key, head=None, room_id=ROOM, room_type="group", sender=BOB,
                                 type="m.create", ts=ts, content={}) for ts in (NOW + DAY - 1, NOW + DAY))
    results = verify_events([before.envelope, after.envelope], {B: ring.public(B)}.get)
    assert results[0] == before
    assert results[1].code is Code.EXPIRED_KEY


def test_undecodable_envelopes_in_a_batch_are_refused_in_place():
    _, b = _nodes()
    chain = build_chain(b.keyring.current, ROOM, 2)
    results = verify_events([chain[0].envelope, b"\xff", encode([1]), chain[1].envelope], _lookup(b))
    assert results[0] == chain[0] and results[3] == chain[1]
    assert results[1].code is Code.MALFORMED and results[2].code is Code.MALFORMED


def test_batch_goes_to_the_verifier_in_one_call():
    _, b = _nodes()
    chain = build_chain(b.keyring.current, ROOM, 4)
    calls = []

    def verifier(items):
        calls.append(len(items))
        return [i != 2 for i in range(len(items))]  # pretend the third fails

    results = verify_events([e.envelope for e in chain], _lookup(b), verifier=verifier)
    assert calls == [4]
    assert [isinstance(r, Event) for r in results] == [True, True, False, True]
    assert results[2].code is Code.BAD_SIGNATURE


def _envelope(fields: dict, key=None, key_id=None) -> bytes:
    key = key or make_node(B, 2).keyring.current
    body = encode(fields)
    return encode([body, key_id or key.key_id, sign(key, Domain.EVENT, body)])


GOOD = {"v": 1, "room_id": ROOM, "room_type": "group", "depth": 1, "prev": None, "origin": B,
        "sender": BOB, "type": "m.create", "ts": NOW, "content": {}}


def test_good_fields_decode():
    assert isinstance(decode_event(_envelope(GOOD)), Event)


@pytest.mark.parametrize(
    "envelope, code",
    [
        (encode("x"), Code.MALFORMED),
        (encode([b"", "k"]), Code.MALFORMED),
        (encode([encode(GOOD), "k", b"short"]), Code.MALFORMED),
        (encode([encode(GOOD), "", bytes(64)]), Code.MALFORMED),
        (encode([encode(GOOD), "k" * 65, bytes(64)]), Code.MALFORMED),
        (encode(["body", "k", bytes(64)]), Code.MALFORMED),
        (encode([b"\xff", "k", bytes(64)]), Code.MALFORMED),
        (encode([encode([1]), "k", bytes(64)]), Code.MALFORMED),
        (encode([b"\x18\x01", "k", bytes(64)]), Code.NON_CANONICAL),
        (encode([encode(GOOD), "k", bytes(64)]) + b"\x00", Code.NON_CANONICAL),
        (encode([b"x" * MAX_EVENT_BYTES, "k", bytes(64)]), Code.TOO_LARGE),
    ],
)
def test_bad_envelopes(envelope, code):
    result = decode_event(envelope)
    assert isinstance(result, Refused) and result.code is code


@pytest.mark.parametrize(
    "changes",
    [
        {"v": 2},
        {"extra": 1},
        {"room_id": 5},
        {"depth": -1},
        {"depth": "1"},
        {"ts": -5},
        {"content": []},
        {"prev": bytes(32)},  # depth 1 has no prev
        {"depth": 2},  # ... and depth 2 needs one
        {"depth": 2, "prev": b"short"},
        {"depth": 0, "prev": bytes(32), "origin": B},
        {"source": b"x", "depth": 0, "origin": B},  # proposals carry no source
        {"source": "text"},
        {"sender": "bob"},
        {"room_id": "grp"},
        {"origin": A},  # only the host signs chained events
        {"depth": 0, "origin": A},  # a proposal is signed by the sender's server (B here)
    ],
)
def test_bad_bodies_are_malformed(changes):
    fields = dict(GOOD, **changes)
    result = decode_event(_envelope(fields))
    assert isinstance(result, Refused), fields
    assert result.code is Code.MALFORMED


def test_missing_field_is_malformed():
    fields = dict(GOOD)
    del fields["ts"]
    assert decode_event(_envelope(fields)).code is Code.MALFORMED


def test_make_event_refuses_caller_mistakes():
    key = make_node(B, 2).keyring.current
    with pytest.raises(LocalProtocolError):
        make_event(key, room_id=ROOM, room_type="group", depth=1, prev=None, origin=A, sender=BOB,
                   type="m.create", ts=NOW, content={})  # B's room, signed as A
    with pytest.raises(LocalProtocolError):
        make_event(key, room_id=ROOM, room_type="group", depth=1, prev=None, origin=B, sender=BOB,
                   type="m.create", ts=NOW, content={"x": object()})


# -- proposals embedded as source ---------------------------------------------------------


def _proposal(a, *, content=None, type="m.message", sender=ALICE):
    return make_event(a.keyring.current, room_id=ROOM, room_type="group", depth=0, prev=None, origin=A,
                      sender=sender, type=type, ts=NOW, content=content or {"body": "hi"})


def _relay(b, chain, proposal, **overrides):
    fields = dict(sender=proposal.sender, type=proposal.type, content=proposal.content)
    fields.update(overrides)
    return chain_event(b.keyring.current, head=head_of(chain), room_id=ROOM, room_type="group", ts=NOW + 50,
                       source=proposal.envelope, **fields)


def test_proposal_embedded_as_source_verifies():
    a, b = _nodes()
    chain = build_chain(b.keyring.current, ROOM, 2)
    proposal = _proposal(a)
    assert proposal.depth == 0 and proposal.origin == A
    relayed = _relay(b, chain, proposal)
    assert relayed.origin == B and relayed.sender == ALICE and relayed.source == proposal.envelope
    assert verify_events([relayed.envelope], _lookup(a, b)) == [relayed]


@pytest.mark.parametrize(
    "overrides",
    [{"content": {"body": "words alice never wrote"}}, {"type": "m.member"}, {"sender": f"@carol:{A}"}],
)
def test_mismatched_source_is_refused(overrides):
    a, b = _nodes()
    chain = build_chain(b.keyring.current, ROOM, 2)
    relayed = _relay(b, chain, _proposal(a), **overrides)
    (result,) = verify_events([relayed.envelope], _lookup(a, b))
    assert isinstance(result, Refused) and result.code is Code.MALFORMED


def test_forged_source_is_bad_signature():
    a, b = _nodes()
    chain = build_chain(b.keyring.current, ROOM, 2)
    proposal = _proposal(a)
    forged_source = tamper_envelope(proposal, body="forged")
    relayed = chain_event(b.keyring.current, head=head_of(chain), room_id=ROOM, room_type="group",
                          sender=ALICE, type="m.message", ts=NOW, content={"body": "forged"},
                          source=forged_source)
    (result,) = verify_events([relayed.envelope], _lookup(a, b))
    assert result.code is Code.BAD_SIGNATURE


def test_source_of_an_unknown_server_needs_keys():
    a, b = _nodes()
    relayed = _relay(b, build_chain(b.keyring.current, ROOM, 1), _proposal(a))
    assert verify_events([relayed.envelope], _lookup(b)) == [NeedKeys(A, a.keyring.current.key_id)]


def test_undecodable_source_is_refused_with_its_code():
    a, b = _nodes()
    relayed = chain_event(b.keyring.current, head=None, room_id=ROOM, room_type="group", sender=ALICE,
                          type="m.message", ts=NOW, content={"body": "hi"}, source=b"\xff")
    (result,) = verify_events([relayed.envelope], _lookup(a, b))
    assert result.code is Code.MALFORMED and "source" in result.detail


# -- link ---------------------------------------------------------------------------------


def test_link_rules():
    _, b = _nodes()
    chain = build_chain(b.keyring.current, ROOM, 4)
    assert link(chain[0], None) == LinkResult.APPEND
    assert link(chain[1], None).code is Code.CHAIN_BROKEN
    assert link(chain[2], head_of(chain[:2])) == LinkResult.APPEND
    assert link(chain[3], head_of(chain[:2])).code is Code.CHAIN_BROKEN  # a gap: backfill first
    assert link(chain[2], Head(2, bytes(32))).code is Code.CHAIN_BROKEN  # prev is not our head
    # Already held at that depth: the same event is a duplicate, another one an insertion.
    assert link(chain[1], head_of(chain), known_at_depth=chain[1].event_id) == LinkResult.DUPLICATE
    assert link(chain[1], head_of(chain), known_at_depth=chain[2].event_id).code is Code.CHAIN_BROKEN


def test_forked_event_does_not_link():
    _, b = _nodes()
    chain = build_chain(b.keyring.current, ROOM, 3)
    fork = chain_event(b.keyring.current, head=head_of(chain[:1]), room_id=ROOM, room_type="group",
                       sender=BOB, type="m.message", ts=NOW, content={"body": "other"})
    assert fork.depth == 2 and fork.event_id != chain[1].event_id
    assert link(chain[2], Head(fork.depth, fork.event_id)).code is Code.CHAIN_BROKEN


# -- check_proposal ---------------------------------------------------------------------------


def _member_proposal(a, membership, user=ALICE):
    return _proposal(a, type="m.member", content={"membership": membership, "user": user})


@pytest.mark.parametrize(
    "kind, membership, code",
    [
        ("message", "join", None),
        ("message", "invite", Code.NOT_MEMBER),
        ("message", None, Code.NOT_MEMBER),
        ("message", "leave", Code.NOT_MEMBER),
        ("join", "invite", None),
        ("join", "join", Code.FORBIDDEN),
        ("join", "decline", Code.FORBIDDEN),
        ("join", None, Code.FORBIDDEN),
        ("join", "leave", Code.FORBIDDEN),
        ("decline", "invite", None),
        ("decline", "join", Code.FORBIDDEN),
        ("leave", "join", None),
        ("leave", "invite", Code.FORBIDDEN),
        ("invite", "join", Code.FORBIDDEN),
    ],
)
def test_check_proposal_membership_rules(kind, membership, code):
    a, _ = _nodes()
    proposal = _proposal(a) if kind == "message" else _member_proposal(a, kind)
    result = check_proposal(proposal, origin=A, room_type="group", tenant_federates=True, membership=membership)
    assert result is None if code is None else result.code is code


def test_check_proposal_other_rules():
    a, b = _nodes()
    ok = dict(origin=A, room_type="group", tenant_federates=True, membership="join")
    chained = build_chain(b.keyring.current, ROOM, 1)[0]
    assert check_proposal(chained, **ok).code is Code.MALFORMED
    assert check_proposal(_proposal(a), **dict(ok, origin=B)).code is Code.FORGED_SENDER
    assert check_proposal(_member_proposal(a, "leave", user=f"@carol:{A}"), **ok).code is Code.FORBIDDEN
    assert check_proposal(_proposal(a), **dict(ok, room_type="incognito")).code is Code.ROOM_INCOGNITO
    assert check_proposal(_proposal(a), **dict(ok, room_type="bridge")).code is Code.ROOM_BRIDGE
    assert check_proposal(_proposal(a), **dict(ok, room_type="sidekick")).code is Code.ROOM_SIDEKICK
    assert check_proposal(_proposal(a), **dict(ok, tenant_federates=False)).code is Code.TENANT_FEDERATION_DISABLED
    assert check_proposal(_proposal(a), **dict(ok, room_type="dm")).code is Code.MALFORMED
    assert check_proposal(_proposal(a, content={"body": 5}), **ok).code is Code.MALFORMED
    assert check_proposal(_proposal(a, type="m.topic"), **ok).code is Code.MALFORMED


# -- event bodies of invites and transactions -----------------------------------------------


def test_events_body_round_trip():
    body = encode_events_body([b"a", b"b"], txn="t1")
    assert decode_events_body(body, extra=frozenset({"txn"})) == ([b"a", b"b"], {"txn": "t1"})


@pytest.mark.parametrize(
    "body",
    [
        encode({"events": []}),
        encode({"events": [b"x"] * (MAX_TXN_EVENTS + 1)}),
        encode({"events": ["text"]}),
        encode({"events": b"x"}),
        encode({"other": [b"x"]}),
        encode({"events": [b"x"], "extra": 1}),
        encode([b"x"]),
        b"\xff",
    ],
)
def test_bad_events_bodies(body):
    result = decode_events_body(body)
    assert isinstance(result, Refused) and result.code is Code.MALFORMED


# -- the envelope fast path gives the generic decoder's verdicts ------------------------------


def _sample_envelopes():
    key = make_node(B, 2).keyring.current
    small = _envelope(GOOD)
    big = _envelope(dict(GOOD, content={"body": "x" * 400}))
    long_key_id = _envelope(GOOD, key_id="ed25519:" + "k" * 40)
    chained = build_chain(key, ROOM, 2)[1].envelope
    return [small, big, long_key_id, chained]


ENVELOPES = _sample_envelopes()


def _verdict(result):
    return ("event", result) if isinstance(result, Event) else ("refused", result.code)


@given(
    index=st.sampled_from(range(len(ENVELOPES))),
    edits=st.lists(
        st.tuples(st.sampled_from(["set", "insert", "delete", "truncate", "append"]),
                  st.integers(0, 1 << 16), st.integers(0, 255)),
        max_size=3,
    ),
)
def test_fast_and_generic_envelope_paths_agree(index, edits):
    data = bytearray(ENVELOPES[index])
    for op, where, byte in edits:
        at = where % (len(data) + 1)
        if op == "set" and at < len(data):
            data[at] = byte
        elif op == "insert":
            data.insert(at, byte)
        elif op == "delete" and at < len(data):
            del data[at]
        elif op == "truncate":
            del data[at:]
        elif op == "append":
            data.append(byte)
    fast = decode_event(bytes(data))  # bytes: may take the fast path
    generic = decode_event(bytearray(data))  # anything else: always the generic decoder
    assert _verdict(fast) == _verdict(generic)


@pytest.mark.parametrize(
    "envelope, code",
    [
        # Shapes the fast path hands over to the generic decoder, with its verdicts.
        (encode([encode(GOOD)[:20], "k", bytes(64)]), Code.MALFORMED),  # body under 24 bytes
        (b"\x83\x58\x14" + encode(GOOD)[:20] + encode("k") + encode(bytes(64)), Code.NON_CANONICAL),
        (b"\x83\x59\x00" + bytes([len(encode(GOOD))]) + encode(GOOD) + encode("k") + encode(bytes(64)),
         Code.NON_CANONICAL),  # a two-byte length for a short body
        (b"\x83" + encode(encode(GOOD)) + b"\x78\x05kkkkk" + encode(bytes(64)), Code.NON_CANONICAL),
        (b"\x83" + encode(encode(GOOD)) + b"\x62\xc3\x28" + encode(bytes(64)), Code.MALFORMED),  # bad UTF-8
        (b"\x83" + encode(encode(GOOD)) + encode("k") + b"\x58\x41" + bytes(65), Code.MALFORMED),
    ],
)
def test_envelope_shapes_outside_the_fast_path(envelope, code):
    result = decode_event(envelope)
    assert isinstance(result, Refused) and result.code is code


_json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64) + 1, 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@given(
    content=st.dictionaries(st.text(max_size=8), _json_like, max_size=4),
    depth=st.integers(0, 2**63 - 1),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
    reorder=st.booleans(),
)
def test_decode_event_fast_path_gives_the_generic_verdict(content, depth, flips, reorder):
    """decode_event's fast path accepts exactly what the generic decoder accepts."""
    from scaiwave_federation.core.events import _decode_event_generic
    import cbor2

    key = make_node(B, 2).keyring.current
    fields = {"v": 1, "room_id": f"!r:{B}", "room_type": "group", "depth": depth,
              "prev": None if depth <= 1 else b"\x07" * 32, "origin": B, "sender": f"@bob:{B}",
              "type": "m.message", "ts": NOW, "content": content}
    body = cbor2.dumps(dict(reversed(list(fields.items()))) if reorder else fields, canonical=not reorder)
    body = bytearray(body)
    for pos, value in flips:
        body[pos % len(body)] = value
    body = bytes(body)
    envelope = cbor2.dumps([body, key.key_id, sign(key, Domain.EVENT, body)], canonical=True)
    assert decode_event(envelope) == _decode_event_generic(envelope)


def test_link_run_checks_a_whole_run_against_the_head():
    from scaiwave_federation.core.rooms import link_run

    key = make_node(B, 2).keyring.current
    chain = build_chain(key, f"!r:{B}", 5)
    assert link_run(chain, None) == (5, None)
    assert link_run(chain[2:], Head(chain[1].depth, chain[1].event_id)) == (3, None)
    count, refusal = link_run(chain[:2] + chain[3:], None)
    assert count == 2 and refusal.code is Code.CHAIN_BROKEN
    count, refusal = link_run([chain[0], Refused(Code.BAD_SIGNATURE, "x")], None)
    assert count == 1 and refusal.code is Code.BAD_SIGNATURE


def test_invitee_of_reads_the_claimed_invitee_only():
    from scaiwave_federation.core.rooms import invitee_of

    key = make_node(B, 2).keyring.current
    chain = build_chain(key, f"!r:{B}", 2)
    invite = invite_event(key, chain, f"@carol:{A}")
    assert invitee_of(encode_events_body([invite.envelope])) == f"@carol:{A}"
    assert invitee_of(encode_events_body([invite.envelope, invite.envelope])) is None
    assert invitee_of(b"garbage") is None
