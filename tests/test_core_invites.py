"""core.invites: the invite exchange's target, body and reply, one codec for every host."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from corehelpers import A, build_chain, invite_event, pair
from scaiwave_federation.core import Code, Refused, invitee_of
from scaiwave_federation.core.handshake import refusal_body
from scaiwave_federation.core.invites import INVITE_ACCEPTED, decode_invite_reply, invite_body, invite_target
from scaiwave_federation.core.wire import encode

BOB_A = f"@bob:{A}"


def test_an_invite_built_here_is_routed_and_decided_by_the_invitees_node():
    a, b = pair()
    room_id = f"!r1:{b.server_name}"
    event = invite_event(b.keyring.current, build_chain(b.keyring.current, room_id, 1), BOB_A)
    assert a.route("PUT", invite_target(room_id)).endpoint == "invite"
    assert a.route("PUT", invite_target(room_id)).param == room_id
    assert invitee_of(invite_body(event)) == BOB_A


def test_replies():
    assert decode_invite_reply(200, INVITE_ACCEPTED) is None
    refused = decode_invite_reply(403, refusal_body(Refused(Code.NOT_MEMBER, "no")))
    assert isinstance(refused, Refused) and refused.code is Code.NOT_MEMBER
    for lie in (b"", encode({"ok": False}), encode({"ok": 1}), encode([True]), b"\xff" * 10):
        assert decode_invite_reply(200, lie).code is Code.MALFORMED


@given(st.integers(min_value=100, max_value=599), st.binary(max_size=2048))
def test_any_reply_decodes_to_a_value(status, body):
    result = decode_invite_reply(status, body)
    assert result is None or isinstance(result, Refused)
    if result is None:
        assert status == 200
