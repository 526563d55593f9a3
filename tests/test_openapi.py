"""The OpenAPI 3.1 document (docs/openapi.json, served at /v1/openapi.json).

It is valid OpenAPI 3.1 (openapi-spec-validator), the committed copy is what
the daemon serves, it lists exactly the route table's operations, and every
refusal it documents is the one error shape with every code enumerated.
"""

from __future__ import annotations

import json
from pathlib import Path

from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from shellhelpers import InMemory
from scaiwave_federation.core import Code
from scaiwave_federation.shell.http.errors import STATUS
from scaiwave_federation.shell.http.openapi import document_bytes
from scaiwave_federation.shell.http.routes import all_routes

COMMITTED = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"


def committed() -> dict:
    return json.loads(COMMITTED.read_text(encoding="utf-8"))


def test_document_is_valid_openapi_3_1() -> None:
    doc = committed()
    assert doc["openapi"].startswith("3.1.")
    validate(doc, cls=OpenAPIV31SpecValidator)


def test_committed_copy_is_current() -> None:
    assert COMMITTED.read_bytes() == document_bytes(), \
        "docs/openapi.json is stale: python -m scaiwave_federation.shell.http.openapi > docs/openapi.json"


def test_document_and_route_table_list_the_same_operations() -> None:
    in_document = {(method.upper(), path) for path, ops in committed()["paths"].items() for method in ops}
    in_table = {(r.method, r.template) for r in all_routes().routes}
    assert in_document == in_table
    ids = [op["operationId"] for ops in committed()["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))


def test_every_refusal_is_the_error_shape_with_every_code() -> None:
    doc = committed()
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error"] and error["properties"]["error"]["required"] == ["code", "message"]
    assert error["properties"]["error"]["properties"]["code"]["enum"] == [c.value for c in Code]
    statuses = set(STATUS.values())
    others = {(r.template, r.method.lower()): {str(s) for s in r.other} for r in all_routes().routes}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "200" in op["responses"], (method, path)
            for status, response in op["responses"].items():
                if status == "200":
                    continue
                assert int(status) in statuses | {431}, (method, path, status)
                error = {"$ref": "#/components/schemas/Error"}
                schema = response["content"]["application/json"]["schema"]
                if status in others[(path, method)]:
                    # A status that is also a non-refusal answer (/readyz's 503): either shape.
                    assert error in schema["oneOf"], (method, path, status)
                else:
                    assert response["content"] == {"application/json": {"schema": error}}
            if op["security"]:
                assert "401" in op["responses"], (method, path)


def test_authentication_is_documented_per_route() -> None:
    doc = committed()
    for route in all_routes().routes:
        op = doc["paths"][route.template][route.method.lower()]
        expected = ("admin" if route.template.startswith("/v1/admin/") or route.template == "/metrics"
                    else "user" if route.tag == "client" else None)
        assert op["security"] == ([{expected: []}] if expected else []), route.template
    assert set(doc["components"]["securitySchemes"]) == {"admin", "user"}


async def test_the_daemon_serves_the_document_without_a_token(daemon: InMemory) -> None:
    status, headers, data = await daemon.exchange("GET", "/v1/openapi.json")
    assert (status, headers["content-type"]) == (200, "application/json")
    assert data == COMMITTED.read_bytes()
