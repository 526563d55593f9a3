"""One-entry policy edits and what a change does (core.policy, issue 11 item 2):
properties over random policies, peers and spellings, no network."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scaiwave_federation.core import Code, LocalProtocolError, Policy
from scaiwave_federation.core.policy import EDITS, MODES, edit_policy, policy_change

HOSTS = ["a.test", "b.test", "c.test:8449", "d.test", "e.test"]
hosts = st.frozensets(st.sampled_from(HOSTS), max_size=5)
policies = st.builds(Policy, st.sampled_from(MODES), hosts, hosts)


def _spellings(name: str) -> list[str]:
    return [name, name.upper(), name + "." if ":" not in name else name, name + ":443" if ":" not in name else name]


@given(policies, st.sampled_from(sorted(EDITS)), hosts)
def test_an_edit_changes_only_its_list_and_only_those_names(policy: Policy, verb: str, names) -> None:
    after = edit_policy(policy, verb, sorted(names))
    which, add = EDITS[verb]
    other = "blocked_peers" if which == "allowed_peers" else "allowed_peers"
    assert after.default_mode == policy.default_mode
    assert getattr(after, other) == getattr(policy, other)
    expected = getattr(policy, which) | names if add else getattr(policy, which) - names
    assert getattr(after, which) == expected
    # Idempotent: the same edit twice is the edit once.
    assert edit_policy(after, verb, sorted(names)) == after


@given(policies, st.sampled_from(HOSTS), st.integers(0, 3))
def test_any_spelling_edits_the_canonical_entry(policy: Policy, host: str, spelling: int) -> None:
    spelled = _spellings(host)[spelling]
    allowed = edit_policy(policy, "allow", [spelled])
    assert host in allowed.allowed_peers
    assert host not in edit_policy(allowed, "disallow", [spelled]).allowed_peers
    assert host not in edit_policy(edit_policy(policy, "block", [spelled]), "unblock", [host]).blocked_peers


@given(policies, policies, st.frozensets(st.sampled_from(HOSTS)))
def test_cut_off_is_exactly_the_active_peers_the_new_policy_stops_admitting(before, after, active) -> None:
    change = policy_change(before, after, sorted(active))
    expected = {p for p in active if before.admits(p) is None and after.admits(p) is not None}
    assert {name for name, _ in change.cut_off} == expected
    for name, refusal in change.cut_off:
        assert refusal == after.admits(name)
    assert change.changed == (before != after)
    lines = change.lines()
    assert (lines == ["no change"]) == (before == after)


def test_blocking_an_active_peer_says_what_changed_and_whom_it_cuts_off() -> None:
    before = Policy("invite_only", frozenset({"b.test", "c.test"}))
    after = edit_policy(before, "block", ["B.Test"])
    change = policy_change(before, after, ["b.test", "c.test", "Not A Name"])
    assert change.lines() == ["blocked_peers: + b.test"]
    assert [(n, r.code) for n, r in change.cut_off] == [("b.test", Code.PEER_BLOCKED)]
    assert change.as_dict()["cut_off"][0]["code"] == "peer_blocked"
    replaced = Policy("open")
    assert policy_change(before, replaced, ["b.test"]).lines() == [
        "default_mode: invite_only -> open", "allowed_peers: - b.test", "allowed_peers: - c.test"]


def test_bad_edits_are_the_callers_mistake() -> None:
    with pytest.raises(LocalProtocolError, match="unknown policy edit"):
        edit_policy(Policy(), "allowlist", ["a.test"])
    with pytest.raises(LocalProtocolError, match="not a server name"):
        edit_policy(Policy(), "allow", ["https://a.test"])
    with pytest.raises(LocalProtocolError, match="list of server names"):
        edit_policy(Policy(), "allow", "a.test")
