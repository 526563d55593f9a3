"""The OpenAPI 3.1 document of the client and admin APIs and the descriptor.

It is built from the route table (:mod:`.routes`): paths, methods, typed
parameters and bodies (:mod:`.inputs`), answers (:mod:`.responses`), and
every refusal in the one error shape ``{"error": {"code", "message"}}`` with
``code`` enumerated from :class:`~scaiwave_federation.core.codes.Code` and the
statuses of :data:`.errors.STATUS`. So the document says exactly what the
daemon enforces; the daemon serves it at ``GET /v1/openapi.json``.

The repository keeps a copy, ``docs/openapi.json``, for readers and tools
that have no daemon at hand; ``python -m scaiwave_federation.shell.http.openapi``
rewrites it, and tests/test_openapi.py fails when it is stale.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from typing import Any

from scaiwave_federation.core import Code

from .errors import STATUS
from .routes import Route, RouteTable, all_routes

__all__ = ["build_document", "document_bytes", "ERROR_SCHEMA"]

VERSION = "0.1.0"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {"error": {
        "type": "object",
        "required": ["code", "message"],
        "additionalProperties": False,
        "properties": {
            "code": {"type": "string", "enum": [c.value for c in Code],
                     "description": "A stable refusal code (README: Refusal codes)."},
            "message": {"type": "string", "description": "What happened, for a human."},
        },
    }},
}

#: Answers any route may give: its input refused, a path that names nothing,
#: and the HTTP layer's own refusals (shell/http/server.py): a request too slow to
#: arrive or too large, a handler too slow, an unexpected failure, a full or failing disk (storage_unavailable).
_ANY_ROUTE = (Code.BAD_REQUEST, Code.NOT_FOUND, Code.TOO_LARGE, Code.TIMEOUT, Code.INTERNAL_ERROR,
              Code.STORAGE_UNAVAILABLE)
_HTTP_LAYER = {408: "timeout", 413: "too_large", 431: "too_large", 500: "internal_error", 503: "timeout"}

_DESCRIPTION = """\
The client API (a local user's access token) and the admin API (the daemon's
SCAIWAVE_ADMIN_TOKEN), both JSON, and the public descriptor. Federation
between servers (/_scaiwave/federation/v1, signed CBOR) is described in
docs/protocol.md, not here.

Path parameters are percent-decoded: /v1/rooms/%21abc%3Apeer.test/messages is
the room !abc:peer.test. Bodies and query strings are checked strictly: a
wrong type, an unknown or repeated field, a number out of range or a missing
required field is refused with 400 bad_request and a message naming the field,
and nothing is changed.

A path used with a method it does not take is 405 method_not_allowed, with
an Allow header listing the methods it takes.

Every refusal has the body {"error": {"code", "message"}}."""


def _statuses(route: Route) -> dict[int, list[str]]:
    codes = set(_ANY_ROUTE) | set(route.errors)
    if route.auth.check is not None:
        codes.add(Code.UNAUTHORIZED)
    out: dict[int, list[str]] = {}
    for code in sorted(codes, key=lambda c: c.value):
        out.setdefault(STATUS[code], []).append(code.value)
    for status, layer_code in _HTTP_LAYER.items():
        listed = out.setdefault(status, [])
        if layer_code not in listed:
            listed.append(layer_code)
    return dict(sorted(out.items()))


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary, "tags": [route.tag]}
    params = [{"name": name, "in": "path", "required": True, "schema": field.schema()}
              for name, field in route.params.items()]
    if route.query is not None:
        params += [{"name": name, "in": "query", "required": name in route.query.required, "schema": field.schema()}
                   for name, field in route.query.fields.items()]
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {"required": bool(route.body.required),
                             "content": {"application/json": {"schema": route.body.schema()}}}
    op["security"] = [{route.auth.scheme: []}] if route.auth.scheme else []
    responses: dict[str, Any] = {"200": {"description": "OK",
                                         "content": {route.content_type: {"schema": dict(route.response)}}}}
    for status, codes in _statuses(route).items():
        responses[str(status)] = {"description": "Refused: " + ", ".join(codes),
                                  "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for status, schema in route.other.items():
        known = responses.get(str(status))
        if known is None:
            responses[str(status)] = {"description": "Not a refusal", "content": {"application/json": {
                "schema": dict(schema)}}}
        else:
            refusal = known["content"]["application/json"]["schema"]
            known["content"]["application/json"]["schema"] = {"oneOf": [refusal, dict(schema)]}
    op["responses"] = responses
    return op


def build_document(routes: RouteTable) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes.routes:
        paths.setdefault(route.template, {})[route.method.lower()] = _operation(route)
    schemes = {r.auth.scheme: {"type": "http", "scheme": "bearer", "description": r.auth.description}
               for r in routes.routes if r.auth.scheme}
    return {
        "openapi": "3.1.0",
        "info": {"title": "ScaiWave Federation: client and admin API", "version": VERSION,
                 "description": _DESCRIPTION, "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"}},
        "tags": [{"name": "client", "description": "A local user's chat (bearer: the user's access token)."},
                 {"name": "admin", "description": "Administration (bearer: SCAIWAVE_ADMIN_TOKEN)."},
                 {"name": "public", "description": "No authentication."}],
        "paths": paths,
        "components": {"schemas": {"Error": ERROR_SCHEMA}, "securitySchemes": dict(sorted(schemes.items()))},
    }


@lru_cache(maxsize=1)
def document_bytes() -> bytes:
    """The document as the daemon serves it and docs/openapi.json holds it."""
    return (json.dumps(build_document(all_routes()), indent=2, ensure_ascii=False) + "\n").encode("utf-8")


if __name__ == "__main__":
    sys.stdout.buffer.write(document_bytes())
