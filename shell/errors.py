"""The one table from core refusal codes to HTTP statuses, and error bodies.

The core decides (a :class:`Refused` with a code); the shell only maps the
code to a status here. Every refusal body is ``{"error": {"code", "message"}}``:
JSON on client and admin endpoints, CBOR on federation endpoints.
"""

from __future__ import annotations

from scaiwave_federation.core import Code, Refused
from scaiwave_federation.core.handshake import refusal_body

from .http import Response

__all__ = ["STATUS", "status_for", "json_error", "cbor_error", "INTERNAL"]

STATUS: dict[Code, int] = {
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

INTERNAL = Response.json(500, {"error": {"code": "internal_error", "message": "internal error (see the server log)"}})


def status_for(refusal: Refused) -> int:
    """The HTTP status of a refusal."""
    return STATUS[refusal.code]


def json_error(refusal: Refused, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """A client/admin error response."""
    return Response.json(status_for(refusal), {"error": refusal.as_dict()}, headers)


def cbor_error(refusal: Refused) -> Response:
    """A federation error response (CBOR body)."""
    return Response.cbor(status_for(refusal), refusal_body(refusal))
