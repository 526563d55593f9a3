"""Helpers for the shell tests: certificates from one trustme CA, a daemon's
environment, and running daemons reached over real HTTPS by name."""

from __future__ import annotations

import json
import ssl
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import cbor2
import h11
import httpx
import trio
import trio.testing
import trustme
from jsonschema import Draft202012Validator

from scaiwave_federation.shell.config import load_config
from scaiwave_federation.shell.runtime.daemon import make_handler, serve
from scaiwave_federation.shell.http.server import handle_connection
from scaiwave_federation.shell.http.openapi import ERROR_SCHEMA, document_bytes
from scaiwave_federation.shell.http.routes import all_routes
from scaiwave_federation.shell.runtime.service import Service
from scaiwave_federation.shell.demo.testbed import free_port

ADMIN_TOKEN = "admin-token-0123456789abcdef"
FED = "/_scaiwave/federation/v1"


def write_cert(ca: trustme.CA, root: Path, host: str) -> tuple[Path, Path]:
    """A certificate (chain) and key for ``host`` from ``ca``, as PEM files under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert(host)
    cert_path, key_path = root / "cert.pem", root / "key.pem"
    cert.private_key_pem.write_to_path(str(key_path))
    cert_path.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    return cert_path, key_path


def make_env(root: Path, ca_path: Path, ca: trustme.CA, host: str, port: int | None = None,
             resolve: str = "", **extra: str) -> dict[str, str]:
    """The environment of a daemon named ``host[:port]`` with its data under ``root``."""
    cert, key = write_cert(ca, root, host)
    env = {
        "SCAIWAVE_SERVER_NAME": f"{host}:{port}" if port else host,
        "SCAIWAVE_DATA_DIR": str(root / "data"),
        "SCAIWAVE_LISTEN": f"127.0.0.1:{port or 0}",
        "SCAIWAVE_TLS_CERT": str(cert),
        "SCAIWAVE_TLS_KEY": str(key),
        "SCAIWAVE_CA_BUNDLE": str(ca_path),
        "SCAIWAVE_ADMIN_TOKEN": ADMIN_TOKEN,
        "SCAIWAVE_KEY_REFETCH_INTERVAL": "1s",
    }
    if resolve:
        env["SCAIWAVE_RESOLVE"] = resolve
    env.update(extra)
    return env


class Remote:
    """A running daemon reached over HTTPS by its name (resolved to loopback, name checked by TLS)."""

    def __init__(self, client: httpx.AsyncClient, host: str, port: int) -> None:
        self.client, self.host, self.port = client, host, port

    @property
    def server_name(self) -> str:
        return f"{self.host}:{self.port}"

    async def request(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        headers = {"host": self.server_name}
        if token:
            headers["authorization"] = f"Bearer {token}"
        resp = await self.client.request(method, f"https://127.0.0.1:{self.port}{path}", json=body, headers=headers,
                                         extensions={"sni_hostname": self.host})
        conforms(method, path, resp.status_code, resp.headers.get("content-type", ""), resp.json())
        return resp.status_code, resp.json()

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await self.request(method, path, body, token=ADMIN_TOKEN)

    async def peer(self, name: str) -> dict[str, Any]:
        status, body = await self.admin("GET", "/v1/admin/federation/peers")
        assert status == 200
        return next(p for p in body["peers"] if p["server_name"] == name)


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def wait_for(predicate, timeout: float = 10.0) -> Any:
    with trio.fail_after(timeout):
        while not (value := await predicate()):
            await trio.sleep(0.05)
    return value


@asynccontextmanager
async def two_daemons(tmp_path: Path, ca: tuple[trustme.CA, Path], env_b: dict[str, str] | None = None,
                       extra_resolve: str = "", **env_a: str):
    """your-host.test and peer.test serving over TLS in this process: ``(a, b)``.
    ``extra_resolve`` adds SCAIWAVE_RESOLVE entries to both. Leaving the block stops both."""
    authority, ca_path = ca
    port_a, port_b = free_port(), free_port()
    resolve = f"your-host.test:{port_a}:127.0.0.1,peer.test:{port_b}:127.0.0.1" + (
        f",{extra_resolve}" if extra_resolve else "")
    config_a = load_config(make_env(tmp_path / "a", ca_path, authority, "your-host.test", port_a, resolve, **env_a))
    config_b = load_config(make_env(tmp_path / "b", ca_path, authority, "peer.test", port_b, resolve,
                                    **(env_b or {})))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, httpx.AsyncClient(verify=trusting(authority),
                                                                     trust_env=False, timeout=10) as http:
            await nursery.start(serve, config_a)
            await nursery.start(serve, config_b)
            yield Remote(http, "your-host.test", port_a), Remote(http, "peer.test", port_b)
            nursery.cancel_scope.cancel()


async def peer_up(a: Remote, b: Remote) -> None:
    """Keys, mutual invite_only policies, the acme tenant on both, a handshake."""
    for server, other in ((a, b), (b, a)):
        assert (await server.admin("POST", "/v1/admin/federation/key/generate"))[0] == 200
        policy = {"default_mode": "invite_only", "allowed_peers": [other.server_name], "blocked_peers": []}
        assert (await server.admin("PUT", "/v1/admin/federation/policy", policy))[0] == 200
        assert (await server.admin("POST", "/v1/admin/tenants", {"name": "acme"}))[0] == 200
    assert (await a.admin("POST", f"/v1/admin/federation/peers/{b.server_name}/handshake"))[0] == 200


async def peered_dm(a: Remote, b: Remote) -> tuple[str, str, str]:
    """:func:`peer_up`, then a DM from alice (on ``a``) that bob (on ``b``)
    has joined: ``(room_id, alice's token, bob's token)``."""
    await peer_up(a, b)
    alice = (await a.admin("POST", "/v1/admin/users", {"name": "alice", "tenant": "acme"}))[1]
    bob = (await b.admin("POST", "/v1/admin/users", {"name": "bob", "tenant": "acme"}))[1]
    status, dm = await a.request("POST", "/v1/dms", {"to": bob["user_id"]}, token=alice["access_token"])
    assert status == 200, dm
    assert (await b.request("POST", f"/v1/invites/{dm['room_id']}/accept", token=bob["access_token"]))[0] == 200
    return dm["room_id"], alice["access_token"], bob["access_token"]


def error_code(status_body: tuple[int, Any]) -> str:
    status, body = status_body
    assert status >= 400, body
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    return body["error"]["code"]


def _decode(headers: dict[str, str], body: bytes) -> Any:
    kind = headers.get("content-type", "")
    if kind == "application/json":
        return json.loads(body)
    if kind == "application/cbor":
        return cbor2.loads(body)
    return body


class InMemory:
    """The daemon's handler behind ``handle_connection``, reached over memory streams."""

    def __init__(self, service: Service, nursery: trio.Nursery) -> None:
        self.service = service
        self.handler = make_handler(service, nursery)

    async def exchange(self, method: str, target: str, *, body: bytes = b"",
                       headers: list[tuple[str, str]] = ()) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection: h11 on our side, the daemon's handler on the other."""
        client_stream, server_stream = trio.testing.memory_stream_pair()
        conn = h11.Connection(h11.CLIENT)
        all_headers = [("host", self.service.config.server_name), *headers]
        if body or method in ("POST", "PUT"):
            all_headers.append(("content-length", str(len(body))))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(handle_connection, server_stream, self.handler)
                data = conn.send(h11.Request(method=method, target=target, headers=all_headers))
                if body:
                    data += conn.send(h11.Data(data=body))
                data += conn.send(h11.EndOfMessage())
                await client_stream.send_all(data)
                events = []
                while not events or not isinstance(events[-1], h11.EndOfMessage):
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await client_stream.receive_some(65536))
                    else:
                        events.append(event)
                await client_stream.aclose()  # the server's keep-alive loop ends
        head = events[0]
        assert isinstance(head, h11.Response), head
        response_headers = {k.decode(): v.decode() for k, v in head.headers}
        return head.status_code, response_headers, b"".join(e.data for e in events if isinstance(e, h11.Data))

    async def request(self, method: str, target: str, body: Any = None, *, token: str | None = None,
                      raw: bytes | None = None) -> tuple[int, Any]:
        headers = [("authorization", f"Bearer {token}")] if token else []
        payload = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        status, headers_, data = await self.exchange(method, target, body=payload, headers=headers)
        decoded = _decode(headers_, data)
        conforms(method, target, status, headers_.get("content-type", ""), decoded)
        return status, decoded

    async def admin(self, method: str, target: str, body: Any = None) -> tuple[int, Any]:
        return await self.request(method, target, body, token=ADMIN_TOKEN)


@lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    return json.loads(document_bytes())


def conforms(method: str, target: str, status: int, content_type: str, body: Any) -> None:
    """Assert that an answer of the client, admin or public API is what the
    OpenAPI document says: a documented status, its content type and schema.
    Every shell test that talks to a daemon through these helpers checks this."""
    path = urlsplit(target).path
    if path.startswith("/_scaiwave/federation/"):
        return
    try:
        route, _ = all_routes().match(method, path)
    except Exception:  # no such route (or an undecodable path): a refusal in the error shape
        route = None
    if route is None:
        assert status in (400, 404, 405) and content_type == "application/json", (method, target, status)
        Draft202012Validator(ERROR_SCHEMA).validate(body)
        return
    responses = _document()["paths"][route.template][method.lower()]["responses"]
    assert str(status) in responses, (method, route.template, status, body)
    if status == 200 and route.content_type != "application/json":
        assert content_type.startswith(route.content_type.split(";")[0]), (method, route.template, content_type)
        return
    assert content_type == "application/json", (method, route.template, content_type)
    if status in route.other:
        Draft202012Validator({"oneOf": [ERROR_SCHEMA, dict(route.other[status])]}).validate(body)
        return
    Draft202012Validator(route.response if status == 200 else ERROR_SCHEMA).validate(body)
