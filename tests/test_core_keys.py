"""Keys: derivation from seeds, rotation, and the validity rules of old keys.

Live requests: current key, or an old key for 30 days after its expired_at.
Events: the key that was current at the event's time, forever.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from corehelpers import DAY, NOW, seed
from scaiwave_federation.core import GRACE_MS, ROTATION_PERIOD_MS, Code, KeyRing, LocalProtocolError, Refused, SigningKey
from scaiwave_federation.core.keys import Domain, key_id_for, sign, verify, verify_batch
from scaiwave_federation.core.wire import b64e

YEAR = 365 * DAY


def test_from_seed_is_deterministic():
    one = SigningKey.from_seed(seed(1), NOW)
    again = SigningKey.from_seed(seed(1), NOW + 5)
    other = SigningKey.from_seed(seed(2), NOW)
    assert (one.key_id, one.public_key) == (again.key_id, again.public_key)
    assert one.public_key != other.public_key and one.key_id != other.key_id
    assert len(one.public_key) == 32
    assert one.key_id == key_id_for(one.public_key)
    assert one.key_id == "ed25519:" + b64e(hashlib.sha256(one.public_key).digest()[:6])


def test_seed_is_not_in_repr():
    key = SigningKey.from_seed(seed(1), NOW)
    assert seed(1).hex() not in repr(key) and repr(seed(1)) not in repr(key)


@pytest.mark.parametrize("bad", [b"\x01" * 31, b"\x01" * 33, "x" * 32, bytearray(32)])
def test_seed_must_be_32_bytes(bad):
    with pytest.raises(LocalProtocolError):
        SigningKey.from_seed(bad, NOW)


def test_sign_verify_with_domain_separation():
    key = SigningKey.from_seed(seed(1), NOW)
    sig = sign(key, Domain.EVENT, b"message")
    assert len(sig) == 64
    assert verify(key.public_key, Domain.EVENT, b"message", sig)
    # The same bytes under another domain do not verify: no cross-protocol replay.
    assert not verify(key.public_key, Domain.REQUEST, b"message", sig)
    assert not verify(key.public_key, Domain.EVENT, b"messagE", sig)
    other = SigningKey.from_seed(seed(2), NOW)
    assert not verify(other.public_key, Domain.EVENT, b"message", sig)
    assert not verify(key.public_key, Domain.EVENT, b"message", sig[:63])
    assert not verify(key.public_key[:31], Domain.EVENT, b"message", sig)


def test_verify_batch_reports_each_item():
    key = SigningKey.from_seed(seed(1), NOW)
    good = (key.public_key, Domain.EVENT + b"a", sign(key, Domain.EVENT, b"a"))
    bad = (key.public_key, Domain.EVENT + b"b", sign(key, Domain.EVENT, b"a"))
    short = (key.public_key, Domain.EVENT + b"a", b"\x00" * 10)
    assert verify_batch([good, bad, good, short]) == [True, False, True, False]
    assert verify_batch([]) == []


def test_new_ring_has_no_key_until_generate():
    ring = KeyRing()
    assert ring.current is None and ring.rotation_due_at() is None
    with pytest.raises(LocalProtocolError):
        ring.rotate(seed(1), NOW)
    ring = ring.generate(seed(1), NOW)
    assert ring.current.created_at == NOW
    assert ring.rotation_due_at() == NOW + ROTATION_PERIOD_MS
    with pytest.raises(LocalProtocolError):
        ring.generate(seed(2), NOW)
    public = KeyRing().public("a.test")
    assert public.key_id is None and public.public_key is None
    assert public.for_request("ed25519:AAAAAAAA", NOW) is None


def test_rotation_moves_old_key_with_expired_at():
    ring = KeyRing().generate(seed(1), NOW)
    first = ring.current
    rotated = ring.rotate(seed(2), NOW + YEAR)
    assert rotated.current.key_id == SigningKey.from_seed(seed(2), 0).key_id
    assert rotated.current.created_at == NOW + YEAR
    assert len(rotated.old) == 1
    old = rotated.old[0]
    assert (old.key_id, old.public_key, old.expired_at) == (first.key_id, first.public_key, NOW + YEAR)
    assert not hasattr(old, "seed")  # a rotated-out key never signs again
    # Rings are immutable: the original is unchanged.
    assert ring.current == first and ring.old == ()


def test_rotating_twice_keeps_both_old_keys_newest_first():
    ring = KeyRing().generate(seed(1), NOW).rotate(seed(2), NOW + DAY).rotate(seed(3), NOW + 2 * DAY)
    assert [o.key_id for o in ring.old] == [
        SigningKey.from_seed(seed(2), 0).key_id,
        SigningKey.from_seed(seed(1), 0).key_id,
    ]
    assert [o.expired_at for o in ring.old] == [NOW + 2 * DAY, NOW + DAY]
    keys = ring.public("a.test")
    for old in ring.old:
        assert keys.knows(old.key_id)


def test_rotation_refuses_a_reused_key():
    ring = KeyRing().generate(seed(1), NOW).rotate(seed(2), NOW + 1)
    with pytest.raises(LocalProtocolError):
        ring.rotate(seed(2), NOW + 2)  # the current key
    with pytest.raises(LocalProtocolError):
        ring.rotate(seed(1), NOW + 2)  # an old key


def _rotated_keys():
    ring = KeyRing().generate(seed(1), NOW).rotate(seed(2), NOW + YEAR)
    return ring, ring.public("a.test"), ring.old[0], ring.current


def test_for_request_current_and_within_grace():
    _, keys, old, cur = _rotated_keys()
    assert keys.for_request(cur.key_id, NOW + 10 * YEAR) == cur.public_key
    assert keys.for_request(old.key_id, old.expired_at) == old.public_key
    assert keys.for_request(old.key_id, old.expired_at + 29 * DAY) == old.public_key
    assert keys.for_request(old.key_id, old.expired_at + GRACE_MS - 1) == old.public_key


def test_for_request_after_grace_is_expired_key():
    _, keys, old, _ = _rotated_keys()
    for when in (old.expired_at + GRACE_MS, old.expired_at + 31 * DAY, old.expired_at + 5 * YEAR):
        refused = keys.for_request(old.key_id, when)
        assert isinstance(refused, Refused) and refused.code is Code.EXPIRED_KEY


def test_for_event_before_and_after_expired_at():
    _, keys, old, cur = _rotated_keys()
    # A historical event, signed while the old key was current, verifies years later.
    assert keys.for_event(old.key_id, old.expired_at - 1) == old.public_key
    assert keys.for_event(old.key_id, NOW) == old.public_key
    # An event claiming a time after the rotation is refused under the old key.
    refused = keys.for_event(old.key_id, old.expired_at)
    assert isinstance(refused, Refused) and refused.code is Code.EXPIRED_KEY
    assert keys.for_event(cur.key_id, NOW + 50 * YEAR) == cur.public_key


def test_unknown_key_is_none():
    _, keys, _, _ = _rotated_keys()
    assert keys.for_request("ed25519:unknown0", NOW) is None
    assert keys.for_event("ed25519:unknown0", NOW) is None
    assert not keys.knows("ed25519:unknown0")


def test_historical_event_verifies_years_later_end_to_end():
    """An event signed in year one keeps verifying after two rotations."""
    from scaiwave_federation.core import verify_events
    from corehelpers import build_chain

    ring = KeyRing().generate(seed(1), NOW)
    (event,) = build_chain(ring.current, "!r:a.test", 1, ts=NOW)
    ring = ring.rotate(seed(2), NOW + YEAR).rotate(seed(3), NOW + 2 * YEAR)
    keys = ring.public("a.test")
    (result,) = verify_events([event.envelope], {"a.test": keys}.get)
    assert result == event


# -- the key ring as a state machine ------------------------------------------------


class KeyRingMachine(RuleBasedStateMachine):
    """Generate, rotate and let time pass; the verifier's view must follow the rules.

    The model is the list of every key ever made with when it was current.
    """

    def __init__(self):
        super().__init__()
        self.ring = KeyRing()
        self.now = NOW
        self.next_seed = 1
        self.model: list[dict] = []  # {"key_id", "public_key", "created_at", "expired_at"}

    def _seed(self):
        s = seed(self.next_seed)
        self.next_seed += 1
        return s

    @precondition(lambda self: self.ring.current is None)
    @rule()
    def generate(self):
        self.ring = self.ring.generate(self._seed(), self.now)
        cur = self.ring.current
        self.model.append({"key_id": cur.key_id, "public_key": cur.public_key,
                           "created_at": self.now, "expired_at": None})

    @precondition(lambda self: self.ring.current is not None and self.next_seed < 250)
    @rule()
    def rotate(self):
        self.ring = self.ring.rotate(self._seed(), self.now)
        self.model[-1]["expired_at"] = self.now
        cur = self.ring.current
        self.model.append({"key_id": cur.key_id, "public_key": cur.public_key,
                           "created_at": self.now, "expired_at": None})

    @rule(ms=st.integers(min_value=0, max_value=400 * DAY) | st.sampled_from([1, GRACE_MS, GRACE_MS - 1]))
    def advance(self, ms):
        self.now += ms

    @invariant()
    def for_request_follows_the_rules(self):
        keys = self.ring.public("a.test")
        for k in self.model:
            got = keys.for_request(k["key_id"], self.now)
            if k["expired_at"] is None or self.now < k["expired_at"] + GRACE_MS:
                assert got == k["public_key"]
            else:
                assert isinstance(got, Refused) and got.code is Code.EXPIRED_KEY
        assert keys.for_request("ed25519:nokey000", self.now) is None

    @invariant()
    def for_event_follows_the_rules(self):
        keys = self.ring.public("a.test")
        for k in self.model:
            # Any time while the key was current verifies, forever (a key
            # rotated out the moment it was made was never current).
            if k["expired_at"] is None or k["created_at"] < k["expired_at"]:
                assert keys.for_event(k["key_id"], k["created_at"]) == k["public_key"]
            if k["expired_at"] is not None:
                assert keys.for_event(k["key_id"], k["expired_at"] - 1) == k["public_key"]
                late = keys.for_event(k["key_id"], k["expired_at"])
                assert isinstance(late, Refused) and late.code is Code.EXPIRED_KEY

    @invariant()
    def ring_shape(self):
        assert len(self.ring.old) == max(0, len(self.model) - 1)
        if self.ring.current is not None:
            assert self.ring.rotation_due_at() == self.model[-1]["created_at"] + ROTATION_PERIOD_MS


KeyRingMachine.TestCase.settings = settings(stateful_step_count=20)
TestKeyRing = KeyRingMachine.TestCase
