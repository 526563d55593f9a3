"""schemathesis against a real daemon process (issue 13 item 2).

Every operation of the OpenAPI document is fuzzed with valid and invalid
input (schemathesis' positive and negative modes) over real TLS, with its
standard checks: no server error, status codes, content types and response
bodies as documented, and 405 with ``Allow`` for a method a path does not take.
Bounded and derandomized: ``SCAIWAVE_API_FUZZ_EXAMPLES``
examples per operation (default 12, well under a minute in all);
``make api-fuzz`` runs 500 with fresh randomness.

The daemon is set up so that every endpoint has something to work on (a key,
a tenant, two users and a room), and valid generated ids are pointed at them
(see ``Fuzzed.pin``). Valid names of *other* servers are pointed at
``dead.test``, which ``SCAIWAVE_RESOLVE`` pins to a loopback port where
nothing listens: handshakes, descriptor fetches and backfills then fail at
once (``peer_unreachable``) instead of reaching for whatever host a generated
name happens to resolve to. Values that are not valid are sent as generated.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote, unquote

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from scaiwave_federation.core.names import local_of, server_of, valid_server_name
from scaiwave_federation.shell.http.errors import STATUS
from scaiwave_federation.shell.http.openapi import document_bytes
from scaiwave_federation.shell.demo.testbed import Server, Testbed, free_port

EXAMPLES = int(os.environ.get("SCAIWAVE_API_FUZZ_EXAMPLES", "12"))
RANDOM = os.environ.get("SCAIWAVE_API_FUZZ_RANDOM") == "1"
#: 502 and 504 report a *peer's* failure (bad gateway, gateway timeout: our
#: daemon worked); any other 5xx, or these statuses with another code, is ours.
PEER_FAILURES = {code.value for code, status in STATUS.items() if status in (502, 504)}


@schemathesis.check
def no_server_error(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case):
    """schemathesis' not_a_server_error, except for a peer's failure reported as such."""
    if response.status_code in (502, 504) and response.json()["error"]["code"] in PEER_FAILURES:
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [no_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          unsupported_method]
#: The generated values that may name another server (and so cause outbound traffic).
NAME_PARAMS = {"peer", "participant_id", "room_id", "server", "to", "user"}

schema = schemathesis.openapi.from_dict(json.loads(document_bytes()))


class Fuzzed:
    def __init__(self, server: Server, dead: str, user_token: str, room_id: str) -> None:
        self.server, self.dead, self.user_token, self.room_id = server, dead, user_token, room_id
        self.base_url = f"https://127.0.0.1:{server.port}"

    def headers(self, path: str) -> dict[str, str]:
        token = self.server.admin_token if path.startswith("/v1/admin/") else self.user_token
        return {"authorization": f"Bearer {token}"}

    def pin(self, value: Any) -> Any:
        """Point a valid name at something real: a room id at the room made
        here (so writes and reads get past "no such room"), a user id at bob
        here or at dead.test (by the length of what was generated), a server
        name at dead.test. Anything else stays as generated."""
        if not isinstance(value, str) or self.server.server_name in value:
            return value
        if value[:1] == "!" and server_of(value) is not None:
            return self.room_id
        if value[:1] == "@" and server_of(value) is not None:
            return f"@bob:{self.server.server_name}" if len(value) % 2 else f"@{local_of(value)}:{self.dead}"
        return self.dead if valid_server_name(value) else value


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory):
    bed = Testbed(tmp_path_factory.mktemp("fuzz"))
    dead_port = free_port()
    server = bed.add("your-host.test", extra={"SCAIWAVE_LOG_LEVEL": "WARNING"})
    # schemathesis connects to 127.0.0.1: the certificate covers that address too.
    cert = bed.ca.issue_cert("your-host.test", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(server.root / "key.pem"))
    (server.root / "cert.pem").write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    server.env["SCAIWAVE_RESOLVE"] += f",dead.test:{dead_port}:127.0.0.1"
    server.start()
    try:
        assert server.admin("POST", "/v1/admin/federation/key/generate")[0] == 200
        assert server.admin("POST", "/v1/admin/tenants", {"name": "acme"})[0] == 200
        status, user = server.admin("POST", "/v1/admin/users", {"name": "alice", "tenant": "acme"})
        assert status == 200 and server.admin("POST", "/v1/admin/users", {"name": "bob", "tenant": "acme"})[0] == 200
        status, room = server.request("POST", "/v1/rooms", {"room_type": "group"}, token=user["access_token"])
        assert status == 200
        yield Fuzzed(server, f"dead.test:{dead_port}", user["access_token"], room["room_id"])
        assert server.proc is not None and server.proc.poll() is None, "the daemon died under the fuzzer"
    finally:
        bed.stop()


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=not RANDOM, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_api(case: schemathesis.Case, fuzzed: Fuzzed) -> None:
    # schemathesis hands path parameters over percent-encoded (so every run
    # also checks the daemon's decoding); a pinned one is encoded likewise.
    for name in set(case.path_parameters or {}) & NAME_PARAMS:
        value = case.path_parameters[name]
        pinned = fuzzed.pin(unquote(value))
        case.path_parameters[name] = value if pinned == unquote(value) else quote(pinned, safe="")
    for name in set(case.query or {}) & NAME_PARAMS:
        case.query[name] = fuzzed.pin(case.query[name])
    if isinstance(case.body, dict):
        for name in set(case.body) & NAME_PARAMS:
            case.body[name] = fuzzed.pin(case.body[name])
    case.call_and_validate(base_url=fuzzed.base_url, headers=fuzzed.headers(case.path), checks=CHECKS,
                           verify=str(fuzzed.server.ca_path), timeout=30)
