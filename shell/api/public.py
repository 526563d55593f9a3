"""Public endpoints: this server's descriptor and the OpenAPI document."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..http import responses as R
from ..http.server import Response
from ..http.routes import API, PUBLIC, Call
from ..runtime.service import descriptor_json

if TYPE_CHECKING:
    from ..runtime.context import Ctx

__all__: list[str] = []


#: The descriptor's last answer, for its bytes: one Response object for as long
#: as the descriptor does not change, so the HTTP layer checks and writes its
#: head once (Response.wire_head) rather than on every GET.
_answer: tuple[bytes, Response] = (b"", Response(200))


def _descriptor_answer(ctx: Ctx) -> Response:
    global _answer
    data = descriptor_json(ctx.runtime)
    if _answer[0] is not data:  # the cache holds the bytes, so "is" cannot mistake a new object for them
        _answer = (data, Response(200, data, "application/json"))
    return _answer[1]


async def _descriptor_public(call: Call) -> Response:
    return _descriptor_answer(call.ctx)


async def _openapi_document(call: Call) -> Response:
    from ..http.openapi import document_bytes

    return Response(200, document_bytes(), "application/json")


API.add("GET", "/.well-known/scaiwave", _descriptor_public, auth=PUBLIC, tag="public", response=R.DESCRIPTOR,
        static=_descriptor_answer,
        summary="This server's signed descriptor (name, keys, federation endpoint), as peers fetch it.")
API.add("GET", "/v1/openapi.json", _openapi_document, auth=PUBLIC, tag="public", response=R.OPENAPI,
        summary="This document: the client and admin APIs as OpenAPI 3.1.")
