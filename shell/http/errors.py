"""The one table from core refusal codes to HTTP statuses, and error bodies.

The core decides (a :class:`Refused` with a code) and owns the one table
from codes to HTTP statuses (``core.codes.HTTP_STATUS``), so every host (this
daemon, the embedding examples) answers a refusal with the same status.
Every refusal body is ``{"error": {"code", "message"}}``:
JSON on client and admin endpoints, CBOR on federation endpoints.
"""

from __future__ import annotations

from scaiwave_federation.core import Refused
from scaiwave_federation.core import HTTP_STATUS
from scaiwave_federation.core import refusal_body

from .server import Response

__all__ = ["STATUS", "status_for", "json_error", "cbor_error", "INTERNAL"]

#: The core's table (core.codes.HTTP_STATUS), which every host uses.
STATUS = HTTP_STATUS

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
