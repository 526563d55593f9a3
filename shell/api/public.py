"""Public endpoints: this server's descriptor and the OpenAPI document."""

from __future__ import annotations

from ..http import responses as R
from ..http.server import Response
from ..http.routes import API, PUBLIC, Call
from ..runtime.service import descriptor_json

__all__: list[str] = []


async def _descriptor_public(call: Call) -> Response:
    return Response(200, descriptor_json(call.ctx.runtime), "application/json")


async def _openapi_document(call: Call) -> Response:
    from ..http.openapi import document_bytes

    return Response(200, document_bytes(), "application/json")


API.add("GET", "/.well-known/scaiwave", _descriptor_public, auth=PUBLIC, tag="public", response=R.DESCRIPTOR,
        summary="This server's signed descriptor (name, keys, federation endpoint), as peers fetch it.")
API.add("GET", "/v1/openapi.json", _openapi_document, auth=PUBLIC, tag="public", response=R.OPENAPI,
        summary="This document: the client and admin APIs as OpenAPI 3.1.")
