"""Federation policy: who may federate with us, and which rooms may leave the server.

The rules, numbered as in the contract ("Semantics: Policy"):

1. ``blocked_peers`` always refuses, whatever the mode (``peer_blocked``).
2. ``closed`` refuses everyone (``federation_closed``).
3. ``invite_only`` accepts only peers in ``allowed_peers`` (``peer_not_allowed``).
4. ``open`` accepts any peer not blocked.
5. Both sides apply their own policy to the other; a peering needs both.

Rooms (contract "Rooms", guide "What can't be federated"): incognito, bridge
and sidekick rooms and rooms of a tenant with federation disabled never leave
their server; every federation path (invite, send, backfill) asks
:func:`room_refusal` on both sides.

Policy results carry codes, never HTTP statuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .codes import Code, LocalProtocolError, Refused
from .names import valid_server_name

__all__ = ["MODES", "Policy", "room_refusal", "mutual_refusal", "ROOM_TYPES", "FEDERABLE_ROOM_TYPES"]

MODES = ("open", "invite_only", "closed")
ROOM_TYPES = ("dm", "group", "incognito", "bridge", "sidekick")
FEDERABLE_ROOM_TYPES = frozenset({"dm", "group"})
_ROOM_REFUSALS = {
    "incognito": Code.ROOM_INCOGNITO,
    "bridge": Code.ROOM_BRIDGE,
    "sidekick": Code.ROOM_SIDEKICK,
}


@dataclass(frozen=True, slots=True)
class Policy:
    """A server's federation policy. Validated on construction.

    Raises :class:`LocalProtocolError` for an unknown mode or a peer entry
    that is not a server name (the admin API turns that into ``bad_request``).
    """

    default_mode: str = "invite_only"
    allowed_peers: frozenset[str] = field(default_factory=frozenset)
    blocked_peers: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.default_mode not in MODES:
            raise LocalProtocolError(f"default_mode must be one of {', '.join(MODES)}, not {self.default_mode!r}")
        for name in (*self.allowed_peers, *self.blocked_peers):
            if not valid_server_name(name):
                raise LocalProtocolError(f"not a server name: {name!r}")
        object.__setattr__(self, "allowed_peers", frozenset(self.allowed_peers))
        object.__setattr__(self, "blocked_peers", frozenset(self.blocked_peers))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Policy":
        """Build from the API/TOML form ``{default_mode, allowed_peers, blocked_peers}``."""
        unknown = set(data) - {"default_mode", "allowed_peers", "blocked_peers"}
        if unknown:
            raise LocalProtocolError(f"unknown policy fields: {', '.join(sorted(unknown))}")
        allowed = data.get("allowed_peers", [])
        blocked = data.get("blocked_peers", [])
        if not isinstance(allowed, (list, tuple)) or not isinstance(blocked, (list, tuple)):
            raise LocalProtocolError("allowed_peers and blocked_peers are lists of server names")
        return cls(str(data.get("default_mode", "invite_only")), frozenset(allowed), frozenset(blocked))

    def as_dict(self) -> dict[str, Any]:
        """The API form, with sorted lists (stable output)."""
        return {
            "default_mode": self.default_mode,
            "allowed_peers": sorted(self.allowed_peers),
            "blocked_peers": sorted(self.blocked_peers),
        }

    def admits(self, peer: str) -> Refused | None:
        """Does this policy let ``peer`` federate with us? ``None`` means yes."""
        # Rule 1: a block wins over every mode and over allowed_peers.
        if peer in self.blocked_peers:
            return Refused(Code.PEER_BLOCKED, f"{peer} is in blocked_peers")
        # Rule 2.
        if self.default_mode == "closed":
            return Refused(Code.FEDERATION_CLOSED, "federation policy is closed")
        # Rule 3.
        if self.default_mode == "invite_only" and peer not in self.allowed_peers:
            return Refused(Code.PEER_NOT_ALLOWED, f"{peer} is not in allowed_peers (mode invite_only)")
        # Rule 4.
        return None


def mutual_refusal(a_name: str, a: Policy, b_name: str, b: Policy) -> Refused | None:
    """Rule 5: both policies must admit the other. ``a``'s own refusal is reported first."""
    return a.admits(b_name) or b.admits(a_name)


def room_refusal(room_type: str, *, tenant_federates: bool = True) -> Refused | None:
    """May a room of ``room_type`` (owned by a tenant) leave its server? ``None`` means yes."""
    code = _ROOM_REFUSALS.get(room_type)
    if code is not None:
        return Refused(code, f"{room_type} rooms are never federated")
    if room_type not in FEDERABLE_ROOM_TYPES:
        return Refused(Code.MALFORMED, f"unknown room type {room_type[:40]!r}")
    if not tenant_federates:
        return Refused(Code.TENANT_FEDERATION_DISABLED, "the room's tenant has federation disabled")
    return None
