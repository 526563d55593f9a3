"""Names (servers, users, rooms) and the refusal code table."""

from __future__ import annotations

import pytest

from scaiwave_federation.core import DESCRIPTIONS, Code, LocalProtocolError, Refused
from hypothesis import given
from hypothesis import strategies as st

from scaiwave_federation.core import Policy
from scaiwave_federation.core.names import (
    canonical_room_id,
    canonical_server_name,
    canonical_user_id,
    local_of,
    server_name_problem,
    server_of,
    split_server_name,
    user_id,
    valid_server_name,
)


@pytest.mark.parametrize(
    "name",
    ["peer.test", "peer.test:8449", "your-host.test", "a", "x1.y-2.z", "xn--bcher-kva.example",
     "peer.test:65535", "peer.test:1", "1peer.test", "a.b2"],
)
def test_valid_server_names(name):
    assert valid_server_name(name)
    assert canonical_server_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "peer.test:", "peer.test:0", "peer.test:65536", "peer.test:08449", "peer.test:123456", "-peer.test",
     "peer-.test", "peer..test", "peer test", "peer.test/x", "@bob:peer.test", "[::1", "[zz]", "a" * 256,
     "peer.test:84:49", 5, None, b"peer.test", "peer_x.test", "bücher.example", ".peer.test", "peer.test..",
     "a" * 64 + ".test"],
)
def test_invalid_server_names(name):
    assert not valid_server_name(name)
    assert canonical_server_name(name) is None
    assert server_name_problem(name)


@pytest.mark.parametrize("name", ["[::1]", "[::1]:8448", "10.0.0.1", "10.0.0.1:443", "127.1", "0x7f.1", "2130706433"])
def test_ip_literals_are_never_server_names(name):
    assert not valid_server_name(name)
    assert canonical_server_name(name) is None
    assert "IP literal" in server_name_problem(name)


@pytest.mark.parametrize(
    "spelling, canonical",
    [("Peer.Test", "peer.test"), ("peer.test:443", "peer.test"), ("PEER.TEST:443", "peer.test"),
     ("peer.test.", "peer.test"), ("Peer.Test.:8449", "peer.test:8449"), ("  peer.test  ", "peer.test"),
     ("EVIL.TEST:8449", "evil.test:8449")],
)
def test_other_spellings_are_canonicalized_leniently_but_refused_strictly(spelling, canonical):
    assert canonical_server_name(spelling) == canonical
    assert not valid_server_name(spelling)  # on the wire only the canonical spelling is a name
    assert server_of(f"@bob:{spelling}") is None
    assert canonical_user_id(f"@Bob:{spelling}") == f"@bob:{canonical}"
    assert canonical_room_id(f"!Grp:{spelling}") == f"!grp:{canonical}"


def test_u_labels_are_refused_with_their_a_label():
    assert "xn--bcher-kva.example" in server_name_problem("bücher.example")


@pytest.mark.parametrize(
    "name, host, port",
    [("peer.test", "peer.test", 443), ("peer.test:8449", "peer.test", 8449)],
)
def test_split_server_name(name, host, port):
    assert split_server_name(name) == (host, port)


def test_split_server_name_refuses_non_canonical():
    for bad in ("Peer.Test", "peer.test:443", "[::1]:8448"):
        with pytest.raises(ValueError):
            split_server_name(bad)


@pytest.mark.parametrize(
    "identifier, server, local",
    [
        ("@bob:peer.test:8449", "peer.test:8449", "bob"),
        ("@bob:peer.acme.com", "peer.acme.com", "bob"),
        ("!grp:your-host.test", "your-host.test", "grp"),
    ],
)
def test_ids_carry_their_server(identifier, server, local):
    assert server_of(identifier) == server
    assert local_of(identifier) == local


@pytest.mark.parametrize(
    "identifier",
    ["bob:peer.test", "@bob", "@:peer.test", "@bob:", "@bob:not a server", "#bob:peer.test", "@" + "b" * 129 + ":x.test",
     "@bob:" + "a" * 300, "@bob:" + "a" * 1000, 5, None, "@Bob:peer.test", "@bob:Peer.Test", "@bob:peer.test:443",
     "!Grp:peer.test", "!g/r:peer.test", "@alice:[::1]:8448", "@bob:10.0.0.1"],
)
def test_malformed_ids(identifier):
    assert server_of(identifier) is None
    assert local_of(identifier) is None


# -- every spelling of a name is the same name --------------------------------------------------

_LABELS = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)
_NAMES = st.builds(lambda labels, port: ".".join(labels) + (f":{port}" if port else ""),
                   st.lists(_LABELS, min_size=1, max_size=3), st.sampled_from([None, 443, 8449, 1, 65535]))


@st.composite
def _spellings(draw):
    """A name and another spelling of it: random case, a trailing dot, an explicit :443."""
    name = draw(_NAMES)
    host, _, port = name.partition(":")
    flips = draw(st.lists(st.booleans(), min_size=len(host), max_size=len(host)))
    host = "".join(c.upper() if f else c for c, f in zip(host, flips))
    if draw(st.booleans()):
        host += "."
    if not port and draw(st.booleans()):
        port = "443"
    return name, host + (f":{port}" if port else "")


@given(_spellings())
def test_every_spelling_has_one_canonical_form(pair):
    name, spelling = pair
    canonical = canonical_server_name(name)
    assert canonical_server_name(spelling) == canonical
    assert valid_server_name(canonical)
    assert canonical_server_name(canonical) == canonical  # idempotent


@given(_spellings(), st.sampled_from(["open", "invite_only", "closed"]))
def test_every_spelling_of_a_blocked_name_is_refused(pair, mode):
    name, spelling = pair
    for policy in (Policy(mode, blocked_peers=frozenset([spelling]), allowed_peers=frozenset([spelling])),
                   Policy(mode, blocked_peers=frozenset([name]), allowed_peers=frozenset([name]))):
        for asked in (name, spelling, canonical_server_name(name)):
            refusal = policy.admits(asked)
            assert refusal is not None and refusal.code == Code.PEER_BLOCKED


@given(_spellings())
def test_every_spelling_of_an_unlisted_name_is_refused_in_invite_only(pair):
    name, spelling = pair
    policy = Policy("invite_only", allowed_peers=frozenset(["other.test"]))
    for asked in (name, spelling):
        refusal = policy.admits(asked)
        assert refusal is not None and refusal.code in (Code.PEER_NOT_ALLOWED, Code.PEER_BLOCKED)
    allowed = Policy("invite_only", allowed_peers=frozenset([spelling]))
    assert allowed.admits(name) is None


def test_user_id():
    assert user_id("bob", "peer.test:8449") == "@bob:peer.test:8449"
    for bad in ("", "Bob", "b b", "b:c", "x" * 65):
        with pytest.raises(ValueError):
            user_id(bad, "peer.test")


# -- codes ----------------------------------------------------------------------------------

CONTRACT_CODES = {
    # The contract's list ("Errors"): at least these, with these strings.
    "room_incognito", "room_bridge", "room_sidekick", "tenant_federation_disabled",
    "federation_closed", "peer_not_allowed", "peer_blocked",
    "no_descriptor", "invalid_descriptor", "server_name_mismatch", "tls_failure",
    "unknown_key", "bad_signature", "expired_key", "protocol_version_mismatch",
    "clock_skew", "replayed_request", "too_large", "malformed", "own_key_missing", "unauthorized",
}


def test_contract_codes_exist_with_their_strings():
    assert CONTRACT_CODES <= {c.value for c in Code}


def test_every_code_has_one_http_status_in_the_core():
    from scaiwave_federation.core.codes import HTTP_STATUS
    from scaiwave_federation.shell.http.errors import STATUS

    assert set(HTTP_STATUS) == set(Code) and all(400 <= s <= 599 for s in HTTP_STATUS.values())
    assert STATUS is HTTP_STATUS  # the daemon uses the core's table, not its own


def test_every_code_has_a_description():
    assert set(DESCRIPTIONS) == set(Code)
    assert all(DESCRIPTIONS[c].strip() for c in Code)


def test_codes_are_snake_case_and_unique():
    values = [c.value for c in Code]
    assert len(values) == len(set(values))
    assert all(v.replace("_", "").isalpha() and v == v.lower() for v in values)


def test_refused_wire_form():
    assert Refused(Code.PEER_BLOCKED, "x.test is blocked").as_dict() == {
        "code": "peer_blocked", "message": "x.test is blocked"}
    assert Refused(Code.PEER_BLOCKED).as_dict() == {"code": "peer_blocked", "message": DESCRIPTIONS[Code.PEER_BLOCKED]}
    assert str(Refused(Code.CLOCK_SKEW, "late")) == "clock_skew: late"
    assert str(Refused(Code.CLOCK_SKEW)) == "clock_skew: " + DESCRIPTIONS[Code.CLOCK_SKEW]


def test_refused_needs_a_code():
    with pytest.raises(LocalProtocolError):
        Refused("peer_blocked")
