"""The what-if key clock: key validity judged later, request freshness at the recorded clock.

A peer rotates its key; two days later a request still signed with the old
key arrives (inside the 30-day grace), with a transaction carrying events
the old key signed before the rotation. The plain replay accepts it as live
did; ``key_offset_ms`` of 31 days refuses the request with ``expired_key``
(not ``clock_skew``: freshness still uses the recorded clock), while a plain
``clock_offset_ms`` of 31 days can only say ``clock_skew``. Property: the key
clock changes nothing for traffic under current keys.
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from corehelpers import A, B, DAY, NOW, build_chain, descriptor_bytes, endpoint, make_node, seed
from scaiwave_federation.core.requests import sign_request
from scaiwave_federation.core.keys import GRACE_MS, KeyRing, OldKey, ServerKeys
from scaiwave_federation.core.replay import replay_records
from scaiwave_federation.core.wire import encode

P = "/_scaiwave/federation/v1/"
GROUP = f"!grp:{B}"


def _recording(*, signed_by_old: bool, gap: int = 2 * DAY, event_age: int = DAY) -> list[dict]:
    a, b = make_node(A, 1, allowed=[B]), make_node(B, 2, allowed=[A])
    old = b.keyring.current
    rotated_at = NOW + event_age
    b.keyring = b.keyring.rotate(seed(3), rotated_at)
    chain = build_chain(old, GROUP, 2)  # signed before the rotation, ts NOW+1, NOW+2
    body = encode({"events": [e.envelope for e in chain]})
    at = rotated_at + gap
    target = P + "send/t1"
    key = old if signed_by_old else b.keyring.current
    auth = sign_request(key, origin=B, destination=A, method="PUT", target=target, body=body, now=at)
    ok = encode({"results": [{"event_id": e.id_text, "ok": True} for e in chain], "events": []})
    return [
        {"kind": "settings", "now": NOW, "refetch_interval_ms": 30_000, "skew_ms": 120_000},
        {"kind": "policy", "now": NOW, "policy": a.policy.as_dict()},
        {"kind": "own_keys", "now": NOW, "public": a.descriptor(endpoint(A))},
        {"kind": "descriptor", "now": at, "server": B, "body": descriptor_bytes(b)},
        {"kind": "inbound", "now": at + 1, "received_at": at, "method": "PUT", "target": target,
         "authorization": auth, "body": body, "status": 200, "response": ok,
         "context": {"peered": True, "heads": {GROUP: {"known": True, "host": B, "head": None}}}},
    ]


def test_plain_replay_accepts_the_old_key_inside_its_grace():
    (d,) = replay_records(A, _recording(signed_by_old=True)).decisions
    assert d.same and d.replay.short() == "accepted"


def test_key_clock_31d_refuses_what_the_grace_window_would_refuse():
    (d,) = replay_records(A, _recording(signed_by_old=True), key_offset_ms=31 * DAY).decisions
    assert d.replay.short() == "refused expired_key" and not d.same


def test_clock_offset_31d_can_only_say_clock_skew():
    (d,) = replay_records(A, _recording(signed_by_old=True), clock_offset_ms=31 * DAY).decisions
    assert d.replay.short() == "refused clock_skew"


def test_key_clock_judges_event_times_too():
    # Request under the new key; the events were signed by the old key one day
    # before the rotation. Shifted by two days, they claim a time after it.
    rec = _recording(signed_by_old=False)
    assert replay_records(A, rec).decisions[0].replay.short() == "accepted"
    (d,) = replay_records(A, rec, key_offset_ms=2 * DAY).decisions
    assert d.replay.short() == "accepted [expired_key x2]"
    (d,) = replay_records(A, rec, key_offset_ms=DAY // 2).decisions
    assert d.replay.short() == "accepted"


def test_the_what_if_is_flagged():
    assert replay_records(A, _recording(signed_by_old=True), key_offset_ms=1).what_if
    assert not replay_records(A, _recording(signed_by_old=True)).what_if


@settings(max_examples=60, deadline=None)
@given(offset=st.integers(-400 * DAY, 400 * DAY), expired_at=st.integers(0, 2 * NOW), now=st.integers(0, 2 * NOW))
def test_shifted_keys_are_the_rules_at_a_later_time(offset, expired_at, now):
    ring = KeyRing().generate(seed(5), 0)
    keys = ServerKeys(B, ring.current.key_id, ring.current.public_key, (OldKey("ed25519:old", b"k" * 32, expired_at),))
    shifted = keys.shifted(offset)
    # The grace window at now + offset, the event-time rule at ts + offset; the current key always.
    assert (shifted.for_request("ed25519:old", now) == b"k" * 32) == (now + offset < expired_at + GRACE_MS)
    assert (shifted.for_event("ed25519:old", now) == b"k" * 32) == (now + offset < expired_at)
    assert shifted.for_request(ring.current.key_id, now) == ring.current.public_key
    assert keys.shifted(0) is keys
