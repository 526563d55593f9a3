"""Refusal codes: the one table of stable error codes, and the values that carry them.

Bad remote data and policy decisions become values (:class:`Refused`), never
exceptions and never HTTP statuses: the shell maps codes to statuses in its own
table. Exceptions are kept for caller misuse (:class:`LocalProtocolError`).

The codes are part of the outside contract (docs/protocol.md lists them); a
code's string never changes once released.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Code", "Refused", "LocalProtocolError", "DESCRIPTIONS", "RETRYABLE", "HTTP_STATUS", "ABOUT_THE_REQUEST"]


class Code(str, enum.Enum):
    """Every stable refusal code. The value is the wire string."""

    # Rooms that never leave their server (guide: "What can't be federated").
    ROOM_INCOGNITO = "room_incognito"
    ROOM_BRIDGE = "room_bridge"
    ROOM_SIDEKICK = "room_sidekick"
    TENANT_FEDERATION_DISABLED = "tenant_federation_disabled"
    # Policy.
    FEDERATION_CLOSED = "federation_closed"
    PEER_NOT_ALLOWED = "peer_not_allowed"
    PEER_BLOCKED = "peer_blocked"
    NOT_PEERED = "not_peered"
    # Descriptors and transport.
    NO_DESCRIPTOR = "no_descriptor"
    INVALID_DESCRIPTOR = "invalid_descriptor"
    SERVER_NAME_MISMATCH = "server_name_mismatch"
    TLS_FAILURE = "tls_failure"
    PEER_UNREACHABLE = "peer_unreachable"
    # Signatures and keys.
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED_KEY = "expired_key"
    PROTOCOL_VERSION_MISMATCH = "protocol_version_mismatch"
    OWN_KEY_MISSING = "own_key_missing"
    # Requests.
    CLOCK_SKEW = "clock_skew"
    REPLAYED_REQUEST = "replayed_request"
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    NON_CANONICAL = "non_canonical"
    WRONG_DESTINATION = "wrong_destination"
    UNAUTHORIZED = "unauthorized"
    # Events and history.
    BAD_HASH = "bad_hash"
    CHAIN_BROKEN = "chain_broken"
    WRONG_ROOM = "wrong_room"
    HANDSHAKE_FAILED = "handshake_failed"
    NO_PROGRESS = "no_progress"
    RATE_LIMITED = "rate_limited"
    # Local resources (client and admin API).
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    FORBIDDEN = "forbidden"
    CONFLICT = "conflict"
    BAD_REQUEST = "bad_request"
    TIMEOUT = "timeout"
    INTERNAL_ERROR = "internal_error"
    # Trust boundaries (room authorization, sender authenticity, where we connect).
    NOT_MEMBER = "not_member"
    FORGED_SENDER = "forged_sender"
    ADDRESS_BLOCKED = "address_blocked"
    # Local storage.
    STORAGE_UNAVAILABLE = "storage_unavailable"


#: One line per code: what it means for an admin. Rendered into docs/protocol.md.
DESCRIPTIONS: dict[Code, str] = {
    Code.ROOM_INCOGNITO: "incognito rooms never leave their server",
    Code.ROOM_BRIDGE: "bridge rooms never leave their server",
    Code.ROOM_SIDEKICK: "rooms with room_type=sidekick never leave their server",
    Code.TENANT_FEDERATION_DISABLED: "the room's owner tenant has federation disabled tenant-wide",
    Code.FEDERATION_CLOSED: "this server's policy is closed: it refuses all federation",
    Code.PEER_NOT_ALLOWED: "policy is invite_only and the peer is not in allowed_peers",
    Code.PEER_BLOCKED: "the peer is in blocked_peers",
    Code.NOT_PEERED: "the servers have not completed a handshake",
    Code.NO_DESCRIPTOR: "the server publishes no /.well-known/scaiwave descriptor",
    Code.INVALID_DESCRIPTOR: "the descriptor is malformed, unsigned, badly signed or expired",
    Code.SERVER_NAME_MISMATCH: "the descriptor names another server than the one asked",
    Code.TLS_FAILURE: "the peer's TLS certificate chain or name did not verify",
    Code.PEER_UNREACHABLE: "the peer could not be reached (connection refused, timeout)",
    Code.UNKNOWN_KEY: "signed with a key id the signer's descriptor does not list",
    Code.BAD_SIGNATURE: "the signature does not verify",
    Code.EXPIRED_KEY: "signed with a rotated-out key past its validity",
    Code.PROTOCOL_VERSION_MISMATCH: "the two servers share no protocol version",
    Code.OWN_KEY_MISSING: "this server has no federation key: run `scaiwave admin federation key generate`",
    Code.CLOCK_SKEW: "the request's time is outside the accepted skew window",
    Code.REPLAYED_REQUEST: "this signed request was already seen inside the window",
    Code.TOO_LARGE: "the body or object exceeds its size limit",
    Code.MALFORMED: "the bytes are not a well-formed object of the expected shape",
    Code.NON_CANONICAL: "the object is not in canonical CBOR encoding",
    Code.WRONG_DESTINATION: "the request was signed for another server, method or path",
    Code.UNAUTHORIZED: "missing or wrong credentials",
    Code.BAD_HASH: "the event id is not the hash of its content",
    Code.CHAIN_BROKEN: "the event does not link to the previous event of the room",
    Code.WRONG_ROOM: "the event belongs to another room than the one asked",
    Code.HANDSHAKE_FAILED: "the peer's handshake answer did not prove its key",
    Code.NO_PROGRESS: "the peer's backfill pages stopped moving the pull (a page that links no event, or more pages "
                      "than the pull's budget)",
    Code.RATE_LIMITED: "too many requests from this origin at once or per second: retry later",
    Code.NOT_FOUND: "no such resource",
    Code.METHOD_NOT_ALLOWED: "the path exists but not with this method (the Allow header lists those it takes)",
    Code.FORBIDDEN: "the caller may not do this",
    Code.CONFLICT: "the resource already exists or is in another state",
    Code.BAD_REQUEST: "the request's fields are missing or wrong",
    Code.TIMEOUT: "the request was not read or answered in time",
    Code.INTERNAL_ERROR: "an unexpected failure on this server (see its log); nothing was half-stored",
    Code.NOT_MEMBER: "the user (or, for a server, every one of its users) is not a joined member of the room",
    Code.FORGED_SENDER: "a server spoke for a user of another server without that server's signed proposal",
    Code.ADDRESS_BLOCKED: "the peer's name leads to a loopback, private or link-local address, which federation "
                          "does not connect to unless pinned with SCAIWAVE_RESOLVE or allowed by SCAIWAVE_OUTBOUND_ALLOW",
    Code.STORAGE_UNAVAILABLE: "the server's disk is full or failing: nothing was stored; retry later (the admin "
                              "frees space, the daemon keeps running)",
}

#: Refusals worth retrying later, unchanged (with backoff): they describe the
#: moment, not the request. The receiver has not fetched the sender's new key
#: yet, is restarting, has no key yet, is not peered yet (its admin has not
#: reciprocated), a descriptor or TLS fetch failed, clocks disagree, the
#: receiver is limiting the sender's rate (``rate_limited``). Any other
#: refusal is final: the same request gets the same answer, so a sender drops
#: it (and reports it). Rendered into docs/protocol.md.
RETRYABLE: frozenset[Code] = frozenset({
    Code.NOT_PEERED, Code.NO_DESCRIPTOR, Code.INVALID_DESCRIPTOR, Code.SERVER_NAME_MISMATCH, Code.TLS_FAILURE,
    Code.PEER_UNREACHABLE, Code.UNKNOWN_KEY, Code.OWN_KEY_MISSING, Code.CLOCK_SKEW, Code.REPLAYED_REQUEST,
    Code.HANDSHAKE_FAILED, Code.TIMEOUT, Code.INTERNAL_ERROR, Code.ADDRESS_BLOCKED, Code.RATE_LIMITED,
    Code.STORAGE_UNAVAILABLE,
})


#: Refusals about what a request asked for (a room that does not exist, a
#: user who is not a member, a field that is wrong), not about the traffic
#: between two servers: the peer read our signed request and answered it, so
#: the link works. A peer's ``last_error`` records only the other refusals
#: (transport, TLS, authentication, policy, the peer's own failures), so an
#: admin's typo never marks a healthy peer as failing.
ABOUT_THE_REQUEST: frozenset[Code] = frozenset({
    Code.NOT_FOUND, Code.NOT_MEMBER, Code.FORBIDDEN, Code.ROOM_INCOGNITO, Code.ROOM_BRIDGE, Code.ROOM_SIDEKICK,
    Code.TENANT_FEDERATION_DISABLED, Code.WRONG_ROOM, Code.CONFLICT, Code.BAD_REQUEST, Code.METHOD_NOT_ALLOWED,
})


#: The HTTP status every host answers a refusal with (a transport mapping,
#: kept apart from the decisions: the core decides with codes, never statuses).
#: Rendered into docs/protocol.md with the codes.
HTTP_STATUS: dict[Code, int] = {
    Code.ROOM_INCOGNITO: 403,
    Code.ROOM_BRIDGE: 403,
    Code.ROOM_SIDEKICK: 403,
    Code.TENANT_FEDERATION_DISABLED: 403,
    Code.FEDERATION_CLOSED: 403,
    Code.PEER_NOT_ALLOWED: 403,
    Code.PEER_BLOCKED: 403,
    Code.NOT_PEERED: 403,
    Code.NO_DESCRIPTOR: 502,
    Code.INVALID_DESCRIPTOR: 502,
    Code.SERVER_NAME_MISMATCH: 502,
    Code.TLS_FAILURE: 502,
    Code.PEER_UNREACHABLE: 504,
    Code.UNKNOWN_KEY: 401,
    Code.BAD_SIGNATURE: 401,
    Code.EXPIRED_KEY: 401,
    Code.PROTOCOL_VERSION_MISMATCH: 400,
    Code.OWN_KEY_MISSING: 503,
    Code.CLOCK_SKEW: 401,
    Code.REPLAYED_REQUEST: 409,
    Code.TOO_LARGE: 413,
    Code.MALFORMED: 400,
    Code.NON_CANONICAL: 400,
    Code.WRONG_DESTINATION: 421,
    Code.UNAUTHORIZED: 401,
    Code.BAD_HASH: 400,
    Code.CHAIN_BROKEN: 409,
    Code.WRONG_ROOM: 400,
    Code.HANDSHAKE_FAILED: 502,
    Code.NO_PROGRESS: 502,
    Code.RATE_LIMITED: 429,
    Code.NOT_FOUND: 404,
    Code.METHOD_NOT_ALLOWED: 405,
    Code.FORBIDDEN: 403,
    Code.CONFLICT: 409,
    Code.BAD_REQUEST: 400,
    Code.TIMEOUT: 408,
    Code.INTERNAL_ERROR: 500,
    Code.NOT_MEMBER: 403,
    Code.FORGED_SENDER: 403,
    Code.ADDRESS_BLOCKED: 502,
    Code.STORAGE_UNAVAILABLE: 503,
}


@dataclass(frozen=True, slots=True)
class Refused:
    """A decision not to accept something, with a stable :class:`Code`.

    ``detail`` is a human sentence for logs and admins; it may change between
    releases, the code may not.
    """

    code: Code
    detail: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.code, Code):
            raise LocalProtocolError(f"Refused needs a Code, got {self.code!r}")

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed later (see :data:`RETRYABLE`)."""
        return self.code in RETRYABLE

    @property
    def about_the_request(self) -> bool:
        """Whether this says nothing about the link to the peer (see :data:`ABOUT_THE_REQUEST`)."""
        return self.code in ABOUT_THE_REQUEST

    def as_dict(self) -> dict[str, str]:
        """The wire form: ``{"code": ..., "message": ...}``."""
        return {"code": self.code.value, "message": self.detail or DESCRIPTIONS[self.code]}

    def __str__(self) -> str:
        return f"{self.code.value}: {self.detail or DESCRIPTIONS[self.code]}"


class LocalProtocolError(Exception):
    """The caller used the core wrongly (a bug in the embedding host, not the peer)."""
