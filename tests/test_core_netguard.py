"""core.netguard: outbound federation reaches public addresses only, unless an admin allowed a range."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scaiwave_federation.core import Code
from scaiwave_federation.core.netguard import address_refusal, parse_networks


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "fe80::1",
    "fc00::1", "fd12:3456::1", "100.64.0.1", "0.0.0.0", "::", "224.0.0.1", "ff02::1", "::ffff:127.0.0.1",
    "::ffff:10.0.0.1", "192.0.2.1", "198.51.100.7", "240.0.0.1", "fe80::1%eth0",
])
def test_non_public_addresses_are_refused(address):
    refusal = address_refusal(address)
    assert refusal is not None and refusal.code is Code.ADDRESS_BLOCKED
    assert "SCAIWAVE_RESOLVE" in refusal.detail and "SCAIWAVE_OUTBOUND_ALLOW" in refusal.detail


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address):
    assert address_refusal(address) is None


def test_an_allowed_range_lets_its_addresses_through_and_no_others():
    allowed = parse_networks(["10.0.0.0/8", "fd00::/8", " 127.0.0.1 "])
    assert address_refusal("10.20.30.40", allowed=allowed) is None
    assert address_refusal("fd00::5", allowed=allowed) is None
    assert address_refusal("127.0.0.1", allowed=allowed) is None
    assert address_refusal("127.0.0.2", allowed=allowed).code is Code.ADDRESS_BLOCKED
    assert address_refusal("192.168.0.1", allowed=allowed).code is Code.ADDRESS_BLOCKED
    assert address_refusal("not an address").code is Code.ADDRESS_BLOCKED


def test_bad_ranges_are_named():
    with pytest.raises(ValueError, match="10.0.0.0/33"):
        parse_networks(["10.0.0.0/33"])


@given(st.ip_addresses())
def test_exactly_the_global_addresses_pass(ip):
    judged = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
    assert (address_refusal(str(ip)) is None) == (judged.is_global and not judged.is_multicast)
