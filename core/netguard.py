"""Where outbound federation may connect: public addresses only, by default.

A peer's name is chosen by whoever sends us a request or a room event, so
without this rule any stranger could make us connect to our own loopback,
our private network or a cloud metadata address, and read the outcome (a
port scanner). As Synapse's ``ip_range_blocklist``: an address that is not
globally routable (loopback, private, link-local, carrier-grade NAT,
unspecified, multicast, reserved, documentation ranges; IPv4-mapped IPv6
judged as its IPv4) is refused with ``address_blocked``, unless

- the admin pinned the name to an address with ``SCAIWAVE_RESOLVE`` (the
  shell then never asks this module), or
- the address is inside a range the admin allowed (``SCAIWAVE_OUTBOUND_ALLOW``).

Pure: the shell resolves the name, asks :func:`address_refusal` for each
address, and connects only to one that passed.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Sequence

from .codes import Code, Refused

__all__ = ["Network", "parse_networks", "address_refusal"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """CIDR ranges (``10.0.0.0/8``, ``fd00::/8``, or a single address).

    Raises ValueError naming the first entry that is not one.
    """
    out = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an address range: {entry[:80]!r} (write it like 10.0.0.0/8)") from None
    return tuple(out)


def address_refusal(address: str, *, allowed: Sequence[Network] = ()) -> Refused | None:
    """May outbound federation connect to ``address`` (an IP literal)? ``None`` means yes."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return Refused(Code.ADDRESS_BLOCKED, f"not an IP address: {address[:80]!r}")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_global and not ip.is_multicast:
        return None
    if any(ip in network for network in allowed if network.version == ip.version):
        return None
    return Refused(Code.ADDRESS_BLOCKED, f"{ip} is not a public address (pin the name with SCAIWAVE_RESOLVE, "
                                         f"or allow its range with SCAIWAVE_OUTBOUND_ALLOW)")
