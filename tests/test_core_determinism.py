"""Determinism: the core is a function of its state and inputs.

One scripted scenario (handshakes, an invite, a transaction and a backfill,
with fixed seeds, nonces and clock) is run twice from scratch; every effect
and every byte that crossed the link must be identical.
"""

from __future__ import annotations

from corehelpers import (
    A,
    B,
    NOW,
    FakeLink,
    HostedRoom,
    build_chain,
    descriptor_bytes,
    events_body,
    invite_event,
    pair,
    run_backfill,
    run_handshake,
)
from scaiwave_federation.core import BackfillPuller, SendRequest, StoreEvents

P = "/_scaiwave/federation/v1/"


def scenario() -> tuple[list[str], list[bytes]]:
    """Returns (repr of every effect and decision, every byte string emitted)."""
    a, b = pair()
    link = FakeLink(a, b)
    link.server(A).users.add(f"@bob:{A}")
    effects: list = []
    emitted: list[bytes] = [descriptor_bytes(a), descriptor_bytes(b)]

    effects += run_handshake(link, A, B, nonce=bytes(range(16)), now=NOW)[1]
    effects += run_handshake(link, B, A, nonce=bytes(range(16, 48)), now=NOW + 10)[1]

    room_id = f"!room:{B}"
    chain = build_chain(b.keyring.current, room_id, 37, ts=NOW + 100)
    link.server(B).rooms[room_id] = HostedRoom("group", chain, member_servers={A})
    invite = invite_event(b.keyring.current, chain, f"@bob:{A}", ts=NOW + 200)
    body = events_body([invite])
    target = P + f"invite/{room_id}"
    auth = b.sign(destination=A, method="PUT", target=target, body=body, now=NOW + 300)
    effects.append(link.deliver(B, SendRequest(A, "PUT", target, body, auth), NOW + 300))
    effects += link.server(A).invites

    body = events_body(chain[:3])
    target = P + "send/txn-1"
    auth = b.sign(destination=A, method="PUT", target=target, body=body, now=NOW + 400)
    effects.append(link.deliver(B, SendRequest(A, "PUT", target, body, auth), NOW + 400))

    puller = BackfillPuller(server_name=A, room_id=room_id, peer=B, key=a.keyring.current, keys=a.keys,
                            limit=30, page_size=7)
    run = run_backfill(link, puller, now=NOW + 500)
    effects += run.effects

    for exchange in link.log:
        emitted += [exchange.body, exchange.authorization.encode(), exchange.reply]
    for effect in effects:
        if isinstance(effect, StoreEvents):
            emitted += [e.envelope for e in effect.events] + [effect.cursor]
    return [repr(e) for e in effects], emitted


def test_same_inputs_same_outputs_byte_for_byte():
    first = scenario()
    second = scenario()
    assert first[0] == second[0]
    assert first[1] == second[1]


def test_the_scenario_does_what_it_says():
    # Guard against a vacuous comparison: the scenario really ran end to end.
    effects, emitted = scenario()
    assert sum("PeerAgreed(" in e for e in effects) == 2
    assert any(e.startswith("InviteDecision(") for e in effects)
    assert ("BackfillDone(room_id='!room:peer.test:8449', peer='peer.test:8449', stored=30, reached_start=False, "
            "refusal=None)") in effects
    assert len(emitted) > 50 and all(isinstance(x, bytes) for x in emitted)
