"""The handshake: two cores over the fake link, every failure with its code,
and the initiator's transition table tried with every (state, input) pair."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corehelpers import A, B, C, NOW, FakeLink, descriptor_bytes, make_node, pair, run_handshake
from scaiwave_federation.core import (
    Code,
    Failed,
    FetchDescriptor,
    Initiator,
    KeyRing,
    LocalProtocolError,
    PeerAgreed,
    Refused,
    SendRequest,
    answer_hello,
)
from scaiwave_federation.core.handshake import HANDSHAKE_TARGET, TRANSITIONS, State, decode_refusal, refusal_body
from scaiwave_federation.core.wire import decode, encode

V1 = "scaiwave-fed/1"
NONCE = b"n" * 16


def test_success_records_the_same_version_on_both_sides():
    a, b = pair()
    link = FakeLink(a, b)
    ini, effects = run_handshake(link, A, B, nonce=NONCE)
    assert ini.state == State.PEERED and ini.version == V1 and ini.refusal is None
    assert [type(e) for e in effects] == [FetchDescriptor, SendRequest, PeerAgreed]
    assert effects[0] == FetchDescriptor(B)
    request = effects[1]
    assert (request.destination, request.method, request.target) == (B, "POST", HANDSHAKE_TARGET)
    assert effects[2] == PeerAgreed(B, V1, b.keyring.current.key_id)
    # The responder recorded the initiator with the same version.
    agreed = link.server(B).peered[A]
    assert (agreed.server, agreed.protocol_version) == (A, V1)
    # One exchange: B fetched A's descriptor to check the signed hello.
    assert [x.status for x in link.log] == [200]
    assert link.fetches == [B, A]


def test_the_responders_best_common_version_wins_on_both_sides():
    a = make_node(A, 1, allowed=[B], versions=("scaiwave-fed/3", "scaiwave-fed/2", V1))
    b = make_node(B, 2, allowed=[A], versions=(V1, "scaiwave-fed/2"))
    link = FakeLink(a, b)
    ini, effects = run_handshake(link, A, B)
    assert ini.version == link.server(B).peered[A].protocol_version == V1
    assert effects[-1].protocol_version == V1


def test_both_directions_work():
    a, b = pair()
    link = FakeLink(a, b)
    assert run_handshake(link, A, B)[0].state == State.PEERED
    assert run_handshake(link, B, A, nonce=b"m" * 16)[0].state == State.PEERED


def _failed(effects) -> Refused:
    assert isinstance(effects[-1], Failed), effects
    return effects[-1].refusal


@pytest.mark.parametrize(
    "a_kwargs, code",
    [
        ({"mode": "closed", "allowed": [B]}, Code.FEDERATION_CLOSED),
        ({"mode": "open", "blocked": [B]}, Code.PEER_BLOCKED),
        ({"mode": "invite_only"}, Code.PEER_NOT_ALLOWED),
    ],
)
def test_initiator_policy_refuses_before_any_traffic(a_kwargs, code):
    a = make_node(A, 1, **a_kwargs)
    b = make_node(B, 2, mode="open")
    link = FakeLink(a, b)
    ini, effects = run_handshake(link, A, B)
    assert ini.state == State.FAILED and ini.refusal.code is code
    assert effects == [Failed(B, ini.refusal)]
    assert link.fetches == [] and link.log == []


@pytest.mark.parametrize(
    "b_kwargs, code",
    [
        ({"mode": "invite_only"}, Code.PEER_NOT_ALLOWED),
        ({"mode": "open", "blocked": [A]}, Code.PEER_BLOCKED),
        ({"mode": "closed", "allowed": [A]}, Code.FEDERATION_CLOSED),
    ],
)
def test_responder_refusal_comes_back_to_the_initiator(b_kwargs, code):
    a = make_node(A, 1, allowed=[B])
    b = make_node(B, 2, **b_kwargs)
    link = FakeLink(a, b)
    ini, effects = run_handshake(link, A, B)
    assert _failed(effects).code is code
    assert ini.state == State.FAILED
    assert link.log[-1].status == 403
    assert A not in link.server(B).peered


def test_disjoint_descriptor_versions_are_a_mismatch():
    a = make_node(A, 1, allowed=[B])
    b = make_node(B, 2, allowed=[A], versions=("scaiwave-fed/2",))
    link = FakeLink(a, b)
    ini, effects = run_handshake(link, A, B)
    assert _failed(effects).code is Code.PROTOCOL_VERSION_MISMATCH
    assert link.log == []  # no hello was sent


def test_responder_refuses_a_hello_without_a_common_version():
    b = make_node(B, 2, allowed=[A])
    hello = encode({"type": "hello", "initiator": A, "responder": B, "versions": ["scaiwave-fed/9"], "nonce": NONCE})
    result = answer_hello(origin=A, body=hello, server_name=B, key=b.keyring.current, policy=b.policy)
    assert isinstance(result, Refused) and result.code is Code.PROTOCOL_VERSION_MISMATCH


def test_descriptor_of_another_server_is_a_name_mismatch():
    a, b = pair()
    c = make_node(C, 3)
    link = FakeLink(a, b, c)
    link.server(B).descriptor_override = descriptor_bytes(c)
    ini, effects = run_handshake(link, A, B)
    assert _failed(effects).code is Code.SERVER_NAME_MISMATCH
    assert link.log == []


def test_unreachable_peer_fails_with_the_transport_code():
    a = make_node(A, 1, allowed=[C])
    link = FakeLink(a)
    ini, effects = run_handshake(link, A, C)
    assert _failed(effects).code is Code.PEER_UNREACHABLE


def _rewrite_welcome(**changes):
    def rewrite(status, body):
        value = decode(body, max_size=4096)
        value.update(changes)
        return status, encode(value)

    return rewrite


def _flip_proof(status, body):
    value = decode(body, max_size=4096)
    proof = bytearray(value["proof"])
    proof[0] ^= 1
    value["proof"] = bytes(proof)
    return status, encode(value)


def _proof_by_other_key(status, body):
    from scaiwave_federation.core.handshake import _transcript
    from scaiwave_federation.core.keys import Domain, sign

    value = decode(body, max_size=4096)
    c_key = make_node(C, 3).keyring.current
    value["proof"] = sign(c_key, Domain.HANDSHAKE, _transcript(A, B, V1, NONCE))
    return status, encode(value)


@pytest.mark.parametrize(
    "reply_filter, code",
    [
        (_flip_proof, Code.HANDSHAKE_FAILED),
        (_proof_by_other_key, Code.HANDSHAKE_FAILED),
        (_rewrite_welcome(nonce=b"x" * 16), Code.HANDSHAKE_FAILED),
        (_rewrite_welcome(initiator=C), Code.HANDSHAKE_FAILED),
        (_rewrite_welcome(responder=C), Code.HANDSHAKE_FAILED),
        (_rewrite_welcome(version="scaiwave-fed/9"), Code.PROTOCOL_VERSION_MISMATCH),
        (_rewrite_welcome(type="hello"), Code.MALFORMED),
        (_rewrite_welcome(proof="text"), Code.MALFORMED),
        (_rewrite_welcome(extra=1), Code.MALFORMED),
        (lambda s, b: (s, b"\xff"), Code.MALFORMED),
        (lambda s, b: (s, b + b"\x00"), Code.NON_CANONICAL),
        (lambda s, b: (s, encode([1, 2])), Code.MALFORMED),
        (lambda s, b: (500, b"oops"), Code.HANDSHAKE_FAILED),
        (lambda s, b: (403, refusal_body(Refused(Code.PEER_BLOCKED))), Code.PEER_BLOCKED),
    ],
)
def test_bad_replies_fail_with_their_code(reply_filter, code):
    a, b = pair()
    link = FakeLink(a, b)
    ini, effects = run_handshake(link, A, B, nonce=NONCE, reply_filter=reply_filter)
    assert _failed(effects).code is code
    assert ini.state == State.FAILED and ini.version is None


def test_initiator_without_a_key_fails_at_start():
    a = make_node(A, None, allowed=[B])
    b = make_node(B, 2, allowed=[A])
    link = FakeLink(a, b)
    ini, effects = run_handshake(link, A, B)
    assert _failed(effects).code is Code.OWN_KEY_MISSING
    assert link.fetches == []


def test_responder_without_a_key_publishes_an_invalid_descriptor():
    a = make_node(A, 1, allowed=[B])
    b = make_node(B, None, allowed=[A])
    ini, effects = run_handshake(FakeLink(a, b), A, B)
    assert _failed(effects).code is Code.INVALID_DESCRIPTOR


def test_responder_that_lost_its_key_answers_own_key_missing():
    a, b = pair()
    link = FakeLink(a, b)
    link.server(B).descriptor_override = descriptor_bytes(b)  # a stale descriptor, still cached somewhere
    b.keyring = KeyRing()
    ini, effects = run_handshake(link, A, B)
    assert _failed(effects).code is Code.OWN_KEY_MISSING
    assert link.log[-1].status == 503
    result = answer_hello(origin=A, body=b"", server_name=B, key=None, policy=b.policy)
    assert result.code is Code.OWN_KEY_MISSING


def test_proof_is_checked_under_the_descriptor_fetched_for_this_handshake():
    """The shared key cache may forget the peer (an admin refresh) while the hello
    is in flight; the reply is still checked, not crashed on."""
    a, b = pair()
    link = FakeLink(a, b)
    ini = Initiator(server_name=A, peer=B, keyring=a.keyring, policy=a.policy, keys=a.keys)
    ini.start(NONCE)
    (request,) = ini.descriptor_received(descriptor_bytes(b), NOW)
    a.keys.forget(B)
    status, body = link.deliver(A, request, NOW)
    assert ini.reply_received(status, body) == [PeerAgreed(B, V1, b.keyring.current.key_id)]


def _hello(**changes):
    value = {"type": "hello", "initiator": A, "responder": B, "versions": [V1], "nonce": NONCE}
    value.update(changes)
    return encode(value)


@pytest.mark.parametrize(
    "body, code",
    [
        (b"\xff", Code.MALFORMED),
        (encode([1]), Code.MALFORMED),
        (_hello(type="welcome"), Code.MALFORMED),
        (_hello(nonce=b"short"), Code.MALFORMED),
        (_hello(nonce=b"x" * 65), Code.MALFORMED),
        (_hello(versions=[]), Code.MALFORMED),
        (_hello(versions=[1]), Code.MALFORMED),
        (_hello(versions=["v"] * 33), Code.MALFORMED),
        (_hello(initiator=5), Code.MALFORMED),
        (_hello(initiator=C), Code.WRONG_DESTINATION),
        (_hello(responder=C), Code.WRONG_DESTINATION),
        (b"\x00" * 5000, Code.TOO_LARGE),
    ],
)
def test_responder_checks_the_hello(body, code):
    b = make_node(B, 2, allowed=[A])
    result = answer_hello(origin=A, body=body, server_name=B, key=b.keyring.current, policy=b.policy)
    assert isinstance(result, Refused) and result.code is code


def test_responder_welcome_proves_its_key():
    from scaiwave_federation.core.handshake import _transcript
    from scaiwave_federation.core.keys import Domain, verify

    b = make_node(B, 2, allowed=[A])
    reply, agreed = answer_hello(origin=A, body=_hello(), server_name=B, key=b.keyring.current, policy=b.policy)
    welcome = decode(reply, max_size=4096)
    assert welcome["type"] == "welcome" and welcome["version"] == V1 and welcome["nonce"] == NONCE
    assert verify(b.keyring.current.public_key, Domain.HANDSHAKE, _transcript(A, B, V1, NONCE), welcome["proof"])
    assert (agreed.server, agreed.protocol_version) == (A, V1)


def test_decode_refusal_reads_codes_and_tolerates_junk():
    assert decode_refusal(403, refusal_body(Refused(Code.PEER_BLOCKED, "x"))).code is Code.PEER_BLOCKED
    for junk in (b"", b"\xff", encode({"error": {"code": "no_such_code"}}), encode({"error": {"code": [1]}}),
                 encode({"error": "x"}), encode([1])):
        assert decode_refusal(500, junk).code is Code.HANDSHAKE_FAILED


@pytest.mark.parametrize("nonce", [b"", b"x" * 15, b"x" * 65])
def test_nonce_length_is_caller_misuse(nonce):
    a, _ = pair()
    ini = Initiator(server_name=A, peer=B, keyring=a.keyring, policy=a.policy, keys=a.keys)
    with pytest.raises(LocalProtocolError):
        ini.start(nonce)
    assert ini.state == State.IDLE


# -- the transition table, every (state, input) pair ------------------------------------

STATES = (State.IDLE, State.AWAIT_DESCRIPTOR, State.AWAIT_REPLY, State.PEERED, State.FAILED)
INPUTS = ("start", "descriptor_received", "descriptor_failed", "reply_received", "reply_failed")


def test_table_shape():
    # Terminal states accept nothing; every state has a way to FAILED.
    assert {s for s, _ in TRANSITIONS} == {State.IDLE, State.AWAIT_DESCRIPTOR, State.AWAIT_REPLY}
    for (_state, _), targets in TRANSITIONS.items():
        assert set(targets) <= set(STATES) and State.FAILED in targets


def _good_welcome() -> tuple[int, bytes]:
    a, b = pair()
    link = FakeLink(a, b)
    ini = Initiator(server_name=A, peer=B, keyring=a.keyring, policy=a.policy, keys=a.keys)
    ini.start(NONCE)
    (request,) = ini.descriptor_received(descriptor_bytes(b), NOW)
    return link.deliver(A, request, NOW)


GOOD_WELCOME = _good_welcome()


def _initiator_in(state: str, *, keyless: bool = False) -> Initiator:
    a, b = pair()
    if keyless:
        a.keyring = KeyRing()
    link = FakeLink(a, b)
    ini = Initiator(server_name=A, peer=B, keyring=a.keyring, policy=a.policy, keys=a.keys)
    if state == State.IDLE:
        return ini
    if state == State.FAILED:
        ini.start(NONCE)
        if ini.state != State.FAILED:
            ini.descriptor_failed(Refused(Code.PEER_UNREACHABLE))
        return ini
    ini.start(NONCE)
    if state == State.AWAIT_DESCRIPTOR:
        return ini
    (request,) = ini.descriptor_received(descriptor_bytes(b), NOW)
    if state == State.AWAIT_REPLY:
        return ini
    ini.reply_received(*link.deliver(A, request, NOW))
    assert ini.state == State.PEERED
    return ini


def _payloads(event: str):
    a, b = pair()
    return {
        "start": [(NONCE,)],
        "descriptor_received": [(descriptor_bytes(b), NOW), (b"garbage", NOW), (descriptor_bytes(a), NOW)],
        "descriptor_failed": [(Refused(Code.TLS_FAILURE),)],
        "reply_received": [GOOD_WELCOME, (200, b"\xff"), (403, refusal_body(Refused(Code.PEER_BLOCKED))),
                           (200, encode({"type": "welcome", "initiator": A, "responder": B,
                                         "version": V1, "nonce": b"", "proof": b""}))],
        "reply_failed": [(Refused(Code.PEER_UNREACHABLE),)],
    }[event]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("event", INPUTS)
@settings(max_examples=12)
@given(data=st.data())
def test_every_state_input_pair(state, event, data):
    keyless = data.draw(st.booleans(), label="keyless") if state in (State.IDLE, State.FAILED) else False
    ini = _initiator_in(state, keyless=keyless)
    assert ini.state == state
    args = data.draw(st.sampled_from(_payloads(event)), label="args")
    before = (ini.state, ini.version, ini.refusal, ini._nonce, ini.keys.get(B))
    allowed = TRANSITIONS.get((state, event))
    if allowed is None:
        with pytest.raises(LocalProtocolError):
            getattr(ini, event)(*args)
        # Misuse leaves the machine exactly as it was.
        assert (ini.state, ini.version, ini.refusal, ini._nonce, ini.keys.get(B)) == before
        return
    effects = getattr(ini, event)(*args)
    assert ini.state in allowed
    if ini.state == State.FAILED:
        assert effects == [Failed(B, ini.refusal)] and isinstance(ini.refusal, Refused)
    elif ini.state == State.PEERED:
        assert effects == [PeerAgreed(B, V1, ini.keys.get(B).keys.key_id)]
    elif ini.state == State.AWAIT_DESCRIPTOR:
        assert effects == [FetchDescriptor(B)]
    else:
        assert [type(e) for e in effects] == [SendRequest]


def test_table_uses_only_the_states_and_inputs_tried_above():
    # If the table grows a state or an input, the cross product above must grow too.
    assert set(TRANSITIONS) < {(s, i) for s in STATES for i in INPUTS}
    assert {v for s, i in TRANSITIONS for v in TRANSITIONS[s, i]} <= set(STATES)
