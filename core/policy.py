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
from .names import canonical_server_name, server_name_problem, valid_server_name

__all__ = ["MODES", "Policy", "room_refusal", "mutual_refusal", "ROOM_TYPES", "FEDERABLE_ROOM_TYPES", "EDITS",
           "PolicyChange", "edit_policy", "policy_change"]

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
            raise LocalProtocolError(f"default_mode must be one of {', '.join(MODES)}, not {str(self.default_mode)[:40]!r}")
        # Entries are kept in their canonical spelling, so `admits` compares
        # like with like: blocking "Evil.Test:443" blocks "evil.test".
        object.__setattr__(self, "allowed_peers", _canonical_set(self.allowed_peers, "allowed_peers"))
        object.__setattr__(self, "blocked_peers", _canonical_set(self.blocked_peers, "blocked_peers"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Policy":
        """Build from the API/TOML form ``{default_mode, allowed_peers, blocked_peers}``.

        Every field is required to have its type: ``default_mode`` a string,
        the lists lists of server names (any spelling; kept canonical).
        """
        if not isinstance(data, Mapping):
            raise LocalProtocolError("a policy is an object {default_mode, allowed_peers, blocked_peers}")
        unknown = set(data) - {"default_mode", "allowed_peers", "blocked_peers"}
        if unknown:
            raise LocalProtocolError(f"unknown policy fields: {', '.join(sorted(map(str, unknown)))[:200]}")
        mode = data.get("default_mode", "invite_only")
        if not isinstance(mode, str):
            raise LocalProtocolError("default_mode is a string: open, invite_only or closed")
        lists = []
        for name in ("allowed_peers", "blocked_peers"):
            value = data.get(name, [])
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise LocalProtocolError(f"{name} is a list of server names")
            lists.append(value)
        return cls(mode, frozenset(lists[0]), frozenset(lists[1]))

    def as_dict(self) -> dict[str, Any]:
        """The API form, with sorted lists (stable output)."""
        return {
            "default_mode": self.default_mode,
            "allowed_peers": sorted(self.allowed_peers),
            "blocked_peers": sorted(self.blocked_peers),
        }

    def admits(self, peer: str) -> Refused | None:
        """Does this policy let ``peer`` federate with us? ``None`` means yes.

        ``peer`` is compared in its canonical spelling; a string that is no
        server name at all is refused (``malformed``).
        """
        name = peer if valid_server_name(peer) else canonical_server_name(peer)  # the first is cached
        if name is None:
            return Refused(Code.MALFORMED, f"not a server name: {str(peer)[:100]!r}")
        # Rule 1: a block wins over every mode and over allowed_peers.
        if name in self.blocked_peers:
            return Refused(Code.PEER_BLOCKED, f"{name} is in blocked_peers")
        # Rule 2.
        if self.default_mode == "closed":
            return Refused(Code.FEDERATION_CLOSED, "federation policy is closed")
        # Rule 3.
        if self.default_mode == "invite_only" and name not in self.allowed_peers:
            return Refused(Code.PEER_NOT_ALLOWED, f"{name} is not in allowed_peers (mode invite_only)")
        # Rule 4.
        return None


def _canonical_set(names: Any, what: str) -> frozenset[str]:
    if isinstance(names, (str, bytes)) or not isinstance(names, (set, frozenset, list, tuple)):
        raise LocalProtocolError(f"{what} is a list of server names")
    out = set()
    for name in names:
        canonical = canonical_server_name(name)
        if canonical is None:
            raise LocalProtocolError(f"{what}: not a server name: {str(name)[:100]!r} ({server_name_problem(name)})")
        out.add(canonical)
    return frozenset(out)


def mutual_refusal(a_name: str, a: Policy, b_name: str, b: Policy) -> Refused | None:
    """Rule 5: both policies must admit the other. ``a``'s own refusal is reported first."""
    return a.admits(b_name) or b.admits(a_name)


#: The admin's one-entry edits: verb -> (list, add or remove).
EDITS = {"allow": ("allowed_peers", True), "disallow": ("allowed_peers", False),
         "block": ("blocked_peers", True), "unblock": ("blocked_peers", False)}


def edit_policy(policy: Policy, verb: str, peers: Any) -> Policy:
    """``policy`` with ``peers`` added to or removed from one list (:data:`EDITS`).

    Names are compared canonically (``Peer.Test:443`` is ``peer.test``);
    removing a name that is not listed changes nothing. Raises
    :class:`LocalProtocolError` for an unknown verb or a name that is no server name.
    """
    if verb not in EDITS:
        raise LocalProtocolError(f"unknown policy edit {str(verb)[:40]!r}: one of {', '.join(EDITS)}")
    which, add = EDITS[verb]
    names = _canonical_set(peers, "peers")
    current: frozenset[str] = getattr(policy, which)
    lists = {"allowed_peers": policy.allowed_peers, "blocked_peers": policy.blocked_peers,
             which: current | names if add else current - names}
    return Policy(policy.default_mode, lists["allowed_peers"], lists["blocked_peers"])


@dataclass(frozen=True, slots=True)
class PolicyChange:
    """What replacing ``before`` by ``after`` does: the entries added and
    removed, the mode change, and which currently active peers the new policy
    refuses (``cut_off``: name and the refusal they would now get)."""

    before: Policy
    after: Policy
    cut_off: tuple[tuple[str, Refused], ...]

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def lines(self) -> list[str]:
        """What changed, one line per change, for an admin; ``no change`` if nothing."""
        out = []
        if self.before.default_mode != self.after.default_mode:
            out.append(f"default_mode: {self.before.default_mode} -> {self.after.default_mode}")
        for which in ("allowed_peers", "blocked_peers"):
            old, new = getattr(self.before, which), getattr(self.after, which)
            out += [f"{which}: + {name}" for name in sorted(new - old)]
            out += [f"{which}: - {name}" for name in sorted(old - new)]
        return out or ["no change"]

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.after.as_dict(), "changed": self.changed, "changes": self.lines(),
                "cut_off": [{"server_name": name, **refusal.as_dict()} for name, refusal in self.cut_off]}


def policy_change(before: Policy, after: Policy, active_peers: Any) -> PolicyChange:
    """Compare two policies for the peers we are currently peered with.

    A peer is cut off when ``before`` admits it and ``after`` does not: the
    warning an admin sees before (``--dry-run``) or after the change.
    """
    cut = []
    for name in sorted({n for n in (canonical_server_name(p) for p in active_peers) if n is not None}):
        refusal = after.admits(name)
        if refusal is not None and before.admits(name) is None:
            cut.append((name, refusal))
    return PolicyChange(before, after, tuple(cut))


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
