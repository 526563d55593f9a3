"""Keys' past (docs/protocol.md, "Keys' past"): what a verifier believes about
a key's validity only grows. A later descriptor cannot move an ``expired_at``
earlier than what was trusted, nor drop a key; and a proposal inside a
host-signed chained event is vouched for by the host, so a member that lies
about its own old key cannot cut a host's history short (issue 16)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from corehelpers import A, B, NOW, endpoint, make_node
from scaiwave_federation.core import Code, Event, Head, KeyCache, KeyRing, NeedKeys, SigningKey, build_descriptor
from scaiwave_federation.core import chain_event, make_event, verify_events
from scaiwave_federation.core.keys import DAY_MS, OldKey, ServerKeys

KEYS = [SigningKey.from_seed(bytes([0x40 + i]) * 32, NOW - 400 * DAY_MS) for i in range(3)]


def descriptor(current: int, old: dict[int, int]) -> bytes:
    """A's descriptor with key ``current`` and ``old`` = {key index: expired_at}, signed by the current key."""
    ring = KeyRing(current=KEYS[current],
                   old=tuple(OldKey(KEYS[i].key_id, KEYS[i].public_key, at) for i, at in old.items()))
    return json.dumps(build_descriptor(A, ring, federation_endpoint=endpoint(A))).encode()


def test_a_later_descriptor_cannot_shorten_a_keys_past():
    cache = KeyCache()
    cache.learn(A, descriptor(0, {}), NOW)  # key 0 is current when we look, at NOW
    # Then key 0 is "rotated out in 1970", and key 1 signed before NOW is dropped later on.
    cache.learn(A, descriptor(1, {0: 0}), NOW + 10)
    keys = cache.keys(A)
    assert keys.for_event(KEYS[0].key_id, NOW - 5) == KEYS[0].public_key  # trusted until NOW at least
    assert keys.for_event(KEYS[0].key_id, NOW + 5).code is Code.EXPIRED_KEY  # but not beyond
    cache.learn(A, descriptor(2, {}), NOW + 20)  # both old keys dropped
    keys = cache.keys(A)
    assert keys.for_event(KEYS[0].key_id, NOW - 5) == KEYS[0].public_key
    assert keys.for_event(KEYS[1].key_id, NOW + 9) == KEYS[1].public_key  # current when seen at NOW + 10
    assert keys.for_event(KEYS[1].key_id, NOW + 15).code is Code.EXPIRED_KEY
    # A real rotation (expired_at after what we trusted) is taken as published.
    cache.learn(A, descriptor(2, {0: NOW + 1000}), NOW + 30)
    assert cache.keys(A).for_event(KEYS[0].key_id, NOW + 999) == KEYS[0].public_key


def test_keeping_past_without_a_previous_view_is_the_descriptor():
    keys = ServerKeys(A, KEYS[0].key_id, KEYS[0].public_key)
    assert keys.keeping_past(None, NOW) is keys


@given(st.lists(st.tuples(st.integers(0, 2), st.dictionaries(st.integers(0, 2), st.integers(0, 3000), max_size=3)),
                min_size=1, max_size=6))
def test_what_a_verifier_accepts_of_a_keys_past_only_grows(views):
    """Any sequence of descriptors (keys made current, rotated out at any time,
    dropped): an event of the past (dated no later than when the verifier
    looked) that it accepted stays accepted."""
    cache, accepted = KeyCache(), set()
    for step, (current, old) in enumerate(views):
        old.pop(current, None)
        seen_at = 1000 * step
        cache.learn(A, descriptor(current, {i: NOW + at for i, at in old.items()}), NOW + seen_at)
        keys = cache.keys(A)
        now_accepted = {(k, ts) for k in range(3) for ts in range(0, 6001, 250)
                        if isinstance(keys.for_event(KEYS[k].key_id, NOW + ts), bytes)}
        assert accepted <= now_accepted
        accepted |= {(k, ts) for k, ts in now_accepted if ts <= seen_at}


def _room_with_a_proposal(proposal_ts: int):
    """B hosts a room; A's proposal (signed with A's key 0, at ``proposal_ts``) is chained by B."""
    b = make_node(B, 2)
    room = f"!grp:{B}"
    create = chain_event(b.keyring.current, head=None, room_id=room, room_type="group", sender=f"@bob:{B}",
                         type="m.create", ts=NOW, content={"creator": f"@bob:{B}", "room_type": "group"})
    proposal = make_event(KEYS[0], room_id=room, room_type="group", depth=0, prev=None, origin=A,
                          sender=f"@alice:{A}", type="m.message", ts=proposal_ts, content={"body": "hi"})
    chained = chain_event(b.keyring.current, head=Head(1, create.event_id), room_id=room, room_type="group",
                          sender=proposal.sender, type="m.message", ts=proposal_ts + 1, content=proposal.content,
                          source=proposal.envelope)
    cache = KeyCache()
    cache.learn(B, json.dumps(b.descriptor(endpoint(B))).encode(), NOW)
    return chained, proposal, cache


def test_a_source_proposal_is_vouched_for_by_the_host():
    """A rewrote key 0's past (rotated out in 1970): the proposal it signed
    inside B's chained event still verifies. A plain event of A under that
    key, with no host to vouch for it, still follows the event-time rule."""
    chained, proposal, cache = _room_with_a_proposal(NOW)
    cache.learn(A, descriptor(1, {0: 0}), NOW)  # a newcomer: it never saw key 0 as current
    [result] = verify_events([chained.envelope], cache.keys)
    assert isinstance(result, Event) and result.event_id == chained.event_id
    [direct] = verify_events([proposal.envelope], cache.keys)
    assert direct.code is Code.EXPIRED_KEY


def test_a_source_still_needs_a_listed_key_and_a_good_signature():
    chained, proposal, cache = _room_with_a_proposal(NOW)
    cache.learn(A, descriptor(1, {}), NOW)  # key 0 not listed at all
    [result] = verify_events([chained.envelope], cache.keys)
    assert result == NeedKeys(A, KEYS[0].key_id)
    impostor = KeyRing(current=SigningKey.from_seed(b"\x55" * 32, NOW),
                       old=(OldKey(KEYS[0].key_id, KEYS[2].public_key, 0),))  # key 0's id, another key
    fields = json.loads(json.dumps(build_descriptor(A, impostor, federation_endpoint=endpoint(A))))
    assert fields["old_keys"][0]["key_id"] == KEYS[0].key_id
    assert KeyCache().learn(A, json.dumps(fields).encode(), NOW).code is Code.INVALID_DESCRIPTOR
