"""Names (servers, users, rooms) and the refusal code table."""

from __future__ import annotations

import pytest

from scaiwave_federation.core import DESCRIPTIONS, Code, LocalProtocolError, Refused
from scaiwave_federation.core.names import local_of, server_of, split_server_name, user_id, valid_server_name


@pytest.mark.parametrize(
    "name",
    ["peer.test", "peer.test:8449", "your-host.test", "a", "x1.y-2.z", "[::1]", "[::1]:8448", "10.0.0.1:443",
     "peer.test:65535", "peer.test:1"],
)
def test_valid_server_names(name):
    assert valid_server_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "peer.test:", "peer.test:0", "peer.test:65536", "peer.test:08449", "peer.test:123456", "-peer.test",
     "peer-.test", "peer..test", "peer test", "peer.test/x", "@bob:peer.test", "[::1", "[zz]", "a" * 256,
     "peer.test:84:49", 5, None, b"peer.test"],
)
def test_invalid_server_names(name):
    assert not valid_server_name(name)


@pytest.mark.parametrize(
    "name, host, port",
    [("peer.test", "peer.test", 443), ("peer.test:8449", "peer.test", 8449), ("[::1]", "::1", 443),
     ("[::1]:8448", "::1", 8448)],
)
def test_split_server_name(name, host, port):
    assert split_server_name(name) == (host, port)


@pytest.mark.parametrize(
    "identifier, server, local",
    [
        ("@bob:peer.test:8449", "peer.test:8449", "bob"),
        ("@bob:peer.acme.com", "peer.acme.com", "bob"),
        ("!grp:your-host.test", "your-host.test", "grp"),
        ("@alice:[::1]:8448", "[::1]:8448", "alice"),
    ],
)
def test_ids_carry_their_server(identifier, server, local):
    assert server_of(identifier) == server
    assert local_of(identifier) == local


@pytest.mark.parametrize(
    "identifier",
    ["bob:peer.test", "@bob", "@:peer.test", "@bob:", "@bob:not a server", "#bob:peer.test", "@" + "b" * 129 + ":x.test",
     "@bob:" + "a" * 300, "@bob:" + "a" * 1000, 5, None],
)
def test_malformed_ids(identifier):
    assert server_of(identifier) is None
    assert local_of(identifier) is None


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
