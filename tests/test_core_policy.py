"""Policy: who may federate with us, and which rooms may leave the server."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from scaiwave_federation.core import Code, LocalProtocolError, Policy, Refused, room_refusal
from scaiwave_federation.core.policy import MODES, mutual_refusal

PEER = "peer.test:8449"

# mode, allowed?, blocked? -> the code (None: admitted)
TABLE = [
    ("open", False, False, None),
    ("open", True, False, None),
    ("open", False, True, Code.PEER_BLOCKED),
    ("open", True, True, Code.PEER_BLOCKED),
    ("invite_only", False, False, Code.PEER_NOT_ALLOWED),
    ("invite_only", True, False, None),
    ("invite_only", False, True, Code.PEER_BLOCKED),
    ("invite_only", True, True, Code.PEER_BLOCKED),
    ("closed", False, False, Code.FEDERATION_CLOSED),
    ("closed", True, False, Code.FEDERATION_CLOSED),
    ("closed", False, True, Code.PEER_BLOCKED),
    ("closed", True, True, Code.PEER_BLOCKED),
]


@pytest.mark.parametrize("mode, allowed, blocked, code", TABLE)
def test_admits_table(mode, allowed, blocked, code):
    policy = Policy(mode, frozenset({PEER} if allowed else ()), frozenset({PEER} if blocked else ()))
    result = policy.admits(PEER)
    if code is None:
        assert result is None
    else:
        assert isinstance(result, Refused) and result.code is code


def test_table_covers_every_mode():
    assert {row[0] for row in TABLE} == set(MODES)


def test_lists_name_exact_servers():
    # A port is part of the name: peer.test:8449 is not peer.test.
    policy = Policy("invite_only", frozenset({PEER}), frozenset({"peer.test"}))
    assert policy.admits(PEER) is None
    assert policy.admits("peer.test").code is Code.PEER_BLOCKED


def test_default_policy_is_invite_only_with_nobody():
    assert Policy().default_mode == "invite_only"
    assert Policy().admits(PEER).code is Code.PEER_NOT_ALLOWED


@pytest.mark.parametrize(
    "kwargs",
    [
        {"default_mode": "opened"},
        {"default_mode": "OPEN"},
        {"allowed_peers": frozenset({"not a name"})},
        {"blocked_peers": frozenset({"bad:port:x"})},
        {"allowed_peers": frozenset({"peer.test:70000"})},
    ],
)
def test_invalid_policy_is_caller_misuse(kwargs):
    with pytest.raises(LocalProtocolError):
        Policy(**kwargs)


def test_dict_round_trip_is_sorted():
    data = {"default_mode": "open", "allowed_peers": ["b.test", "a.test"], "blocked_peers": ["z.test:8449"]}
    policy = Policy.from_dict(data)
    assert policy == Policy("open", frozenset({"a.test", "b.test"}), frozenset({"z.test:8449"}))
    assert policy.as_dict() == {"default_mode": "open", "allowed_peers": ["a.test", "b.test"],
                                "blocked_peers": ["z.test:8449"]}
    assert Policy.from_dict(policy.as_dict()) == policy
    assert Policy.from_dict({}) == Policy()


@pytest.mark.parametrize(
    "data",
    [{"mode": "open"}, {"allowed_peers": "a.test"}, {"blocked_peers": None}, {"default_mode": "shut"}],
)
def test_from_dict_refuses_bad_input(data):
    with pytest.raises(LocalProtocolError):
        Policy.from_dict(data)


# -- properties ---------------------------------------------------------------------

NAMES = ["a.test", "b.test", "c.test:8449"]
policies = st.builds(
    Policy,
    st.sampled_from(MODES),
    st.frozensets(st.sampled_from(NAMES)),
    st.frozensets(st.sampled_from(NAMES)),
)


@given(pa=policies, pb=policies)
def test_mutual_refusal_is_symmetric(pa, pb):
    forward = mutual_refusal("a.test", pa, "b.test", pb)
    backward = mutual_refusal("b.test", pb, "a.test", pa)
    assert (forward is None) == (backward is None)
    # Both sides must let the other in.
    assert (forward is None) == (pa.admits("b.test") is None and pb.admits("a.test") is None)
    # The first party's own refusal is reported first.
    if pa.admits("b.test") is not None:
        assert forward == pa.admits("b.test")


@given(policy=policies, peer=st.sampled_from(NAMES))
def test_blocked_always_refuses(policy, peer):
    blocked = Policy(policy.default_mode, policy.allowed_peers, policy.blocked_peers | {peer})
    assert blocked.admits(peer).code is Code.PEER_BLOCKED


@given(policy=policies, peer=st.sampled_from(NAMES))
def test_closed_always_refuses(policy, peer):
    closed = Policy("closed", policy.allowed_peers, policy.blocked_peers)
    assert isinstance(closed.admits(peer), Refused)


@given(policy=policies, peer=st.sampled_from(NAMES))
def test_open_admits_everyone_not_blocked(policy, peer):
    opened = Policy("open", policy.allowed_peers, policy.blocked_peers)
    assert (opened.admits(peer) is None) == (peer not in policy.blocked_peers)


# -- rooms ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "room_type, code",
    [("incognito", Code.ROOM_INCOGNITO), ("bridge", Code.ROOM_BRIDGE), ("sidekick", Code.ROOM_SIDEKICK)],
)
@pytest.mark.parametrize("tenant_federates", [True, False])
def test_rooms_that_never_leave(room_type, code, tenant_federates):
    assert room_refusal(room_type, tenant_federates=tenant_federates).code is code


@pytest.mark.parametrize("room_type", ["dm", "group"])
def test_federable_rooms(room_type):
    assert room_refusal(room_type) is None
    assert room_refusal(room_type, tenant_federates=False).code is Code.TENANT_FEDERATION_DISABLED


def test_unknown_room_type_is_malformed():
    assert room_refusal("channel").code is Code.MALFORMED


# -- the admin editing a policy, as a state machine --------------------------------


class PolicyMachine(RuleBasedStateMachine):
    """The admin changes mode and lists in any order; ``admits`` must always
    match the contract's rules, read straight from the lists."""

    def __init__(self):
        super().__init__()
        self.policy = Policy()

    @rule(mode=st.sampled_from(MODES))
    def set_mode(self, mode):
        self.policy = Policy.from_dict({**self.policy.as_dict(), "default_mode": mode})

    @rule(peer=st.sampled_from(NAMES), which=st.sampled_from(["allowed_peers", "blocked_peers"]))
    def add(self, peer, which):
        data = self.policy.as_dict()
        data[which] = [*data[which], peer]
        self.policy = Policy.from_dict(data)

    @rule(peer=st.sampled_from(NAMES), which=st.sampled_from(["allowed_peers", "blocked_peers"]))
    def remove(self, peer, which):
        data = self.policy.as_dict()
        data[which] = [p for p in data[which] if p != peer]
        self.policy = Policy.from_dict(data)

    @invariant()
    def admits_follows_the_rules(self):
        p = self.policy
        for peer in NAMES:
            got = p.admits(peer)
            if peer in p.blocked_peers:
                assert got.code is Code.PEER_BLOCKED
            elif p.default_mode == "closed":
                assert got.code is Code.FEDERATION_CLOSED
            elif p.default_mode == "invite_only" and peer not in p.allowed_peers:
                assert got.code is Code.PEER_NOT_ALLOWED
            else:
                assert got is None

    @invariant()
    def as_dict_round_trips(self):
        assert Policy.from_dict(self.policy.as_dict()) == self.policy


PolicyMachine.TestCase.settings = settings(stateful_step_count=12)
TestPolicyEditing = PolicyMachine.TestCase
