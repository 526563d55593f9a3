"""A hostile federation server the shell tests run: real TLS (a trustme
certificate for its name), its own small h11 server, and a real core node so
it speaks the protocol well enough to be peered with, host rooms, invite
users, chain their proposals and sign what it sends. Then it misbehaves on
demand: pages with moved cursors, answers trickled a byte at a time,
proposals chained twice, a descriptor that rewrites its keys' past.

``daemon(...)`` starts one real ``scaiwave serve`` in this process whose
``SCAIWAVE_RESOLVE`` also sends the rogue hosts' names to loopback.
"""

from __future__ import annotations

import json
import ssl
import time
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Awaitable, Callable

import h11
import httpx
import trio
import trustme

from shellhelpers import Remote, make_env, trusting
from scaiwave_federation.core import (
    Authenticated, Event, Federation, Head, KeyRing, NeedKeys, Policy, Refused, chain_event, make_event,
)
from scaiwave_federation.core.backfill import build_page, parse_query
from scaiwave_federation.core.handshake import refusal_body
from scaiwave_federation.core.rooms import decode_events_body, encode_events_body
from scaiwave_federation.core.wire import decode, encode
from scaiwave_federation.shell.http.client import PeerClient
from scaiwave_federation.shell.config import load_config
from scaiwave_federation.shell.runtime.daemon import serve
from scaiwave_federation.shell.demo.testbed import free_port

FED = "/_scaiwave/federation/v1/"

#: A backfill behaviour: (room_id, before, limit) -> (status, body), or None for the honest page.
Backfill = Callable[[str, "int | None", int], Awaitable["tuple[int, bytes] | None"]]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def read_request(conn: h11.Connection, stream: trio.abc.Stream) -> tuple[h11.Request, bytes] | None:
    """Read one whole request from ``stream`` (``None`` if the client went away first)."""
    request, body = None, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, body
        else:
            return None


class RogueHost:
    """One rogue server named ``host:port`` on 127.0.0.1."""

    def __init__(self, ca: trustme.CA, host: str, *, seed: bytes = b"\x66" * 32) -> None:
        self.ca, self.host, self.seed = ca, host, seed
        self.port = free_port()
        self.node = Federation(self.server_name, keyring=KeyRing().generate(seed, now_ms() - 3_600_000),
                               policy=Policy.from_dict({"default_mode": "open"}))
        self.resolve: dict[tuple[str, int], str] = {(host, self.port): "127.0.0.1"}
        self.client: PeerClient | None = None
        self.rooms: dict[str, list[Event]] = {}  # rooms it hosts: their chains
        self.invites: list[Event] = []  # invites it received (as a member server)
        self.seen: list[tuple[str, str]] = []  # (method, target) of every request
        self.backfill: Backfill | None = None  # misbehaviour of the backfill endpoint
        self.trickle: float = 0.0  # seconds per byte of every answer body
        self.chain_twice = False  # chain every proposal twice
        self.descriptor_override: bytes | None = None

    @property
    def server_name(self) -> str:
        return f"{self.host}:{self.port}"

    def knows(self, remote: Remote) -> None:
        """Talk to a daemon by its name over loopback."""
        self.resolve[(remote.host, remote.port)] = "127.0.0.1"
        if self.client is not None:
            self.client._resolve[(remote.host, remote.port)] = "127.0.0.1"

    async def start(self, nursery: trio.Nursery) -> "RogueHost":
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(self.host).configure_cert(ctx)
        await nursery.start(partial(trio.serve_ssl_over_tcp, self._connection, self.port, ctx, host="127.0.0.1"))
        self.client = PeerClient(ssl_context=trusting(self.ca), resolve=self.resolve, timeout=10)
        return self

    # -- serving --------------------------------------------------------------------------

    async def _connection(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            read = await read_request(conn, stream)
            if read is None:
                return
            request, body = read
            method, target = request.method.decode(), request.target.decode()
            headers = {k.decode().lower(): v.decode() for k, v in request.headers}
            self.seen.append((method, target))
            status, reply, kind = await self._answer(method, target, headers.get("authorization"), body)
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=[
                ("content-type", kind), ("content-length", str(len(reply))), ("connection", "close")])))
            if self.trickle:
                for i in range(len(reply)):
                    await trio.sleep(self.trickle)
                    await stream.send_all(conn.send(h11.Data(data=reply[i:i + 1])))
            elif reply:
                await stream.send_all(conn.send(h11.Data(data=reply)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        finally:
            with trio.move_on_after(0.5):
                await stream.aclose()

    def rewrite_past(self, new_seed: bytes, expired_at: int) -> None:
        """Rotate to a new key, and publish the old one as rotated out at ``expired_at``
        (in 1970, say), signed by the new key: a lie about the key's past."""
        from scaiwave_federation.core import SigningKey, build_descriptor
        from scaiwave_federation.core.keys import OldKey

        old = self.node.keyring.current
        ring = KeyRing(current=SigningKey.from_seed(new_seed, now_ms()),
                       old=(OldKey(old.key_id, old.public_key, expired_at),))
        self.descriptor_override = json.dumps(build_descriptor(
            self.server_name, ring, federation_endpoint=f"https://{self.server_name}{FED.rstrip('/')}")).encode()

    def descriptor(self) -> bytes:
        if self.descriptor_override is not None:
            return self.descriptor_override
        return json.dumps(self.node.descriptor(f"https://{self.server_name}{FED.rstrip('/')}")).encode()

    async def _answer(self, method: str, target: str, authorization: str | None,
                      body: bytes) -> tuple[int, bytes, str]:
        if target == "/.well-known/scaiwave":
            return 200, self.descriptor(), "application/json"
        path, _, query = target.partition("?")
        route = self.node.route(method, path)
        if isinstance(route, Refused):
            return 404, refusal_body(route), "application/cbor"
        auth = await self.authenticate(method, target, authorization, body)
        if isinstance(auth, Refused):
            return 401, refusal_body(auth), "application/cbor"
        if route.endpoint == "handshake":
            result = self.node.on_handshake(auth, body)
            return (403, refusal_body(result), "application/cbor") if isinstance(result, Refused) else \
                (200, result[0], "application/cbor")
        if route.endpoint == "invite":
            envelopes, _ = decode_events_body(body)
            self.invites.append(self.verify(envelopes)[0])
            return 200, encode({"ok": True}), "application/cbor"
        if route.endpoint == "send":
            return 200, self._send(auth, body), "application/cbor"
        room_id = route.param or ""
        before, limit = parse_query(dict(p.split("=", 1) for p in query.split("&") if "=" in p))
        if self.backfill is not None:
            answer = await self.backfill(room_id, before, limit)
            if answer is not None:
                return answer[0], answer[1], "application/cbor"
        return 200, self.page(room_id, before, limit), "application/cbor"

    async def authenticate(self, method, target, authorization, body) -> Authenticated | Refused:
        args = dict(method=method, target=target, authorization=authorization, body=body)
        auth = self.node.authenticate(**args, now=now_ms())
        if isinstance(auth, NeedKeys):
            data = await self.client.fetch_descriptor(auth.server)
            self.node.learn_descriptor(auth.server, data, now_ms())
            auth = self.node.authenticate(**args, now=now_ms())
        return auth

    def page(self, room_id: str, before: int | None, limit: int) -> bytes:
        part = [e for e in reversed(self.rooms.get(room_id, [])) if before is None or e.depth < before][:limit]
        return build_page(room_id, before, [e.envelope for e in part], [e.depth for e in part])

    def _send(self, auth: Authenticated, body: bytes) -> bytes:
        envelopes, _ = decode_events_body(body)
        results, chained = [], []
        for event in self.verify(envelopes):
            if not isinstance(event, Event) or event.depth != 0 or event.room_id not in self.rooms:
                results.append({"ok": True})  # a chained event of a room hosted elsewhere: not our concern
                continue
            made = [self.chain(event.room_id, event.sender, event.type, event.content, source=event.envelope)
                    for _ in range(2 if self.chain_twice else 1)]
            chained += made
            results.append({"event_id": event.id_text, "ok": True, "chained": made[0].id_text})
        return encode({"results": results, "events": [e.envelope for e in chained]})

    def verify(self, envelopes: list[bytes]) -> list[Any]:
        from scaiwave_federation.core import verify_events

        return verify_events(envelopes, self.node.lookup)

    # -- acting ----------------------------------------------------------------------------

    def user(self, name: str) -> str:
        return f"@{name}:{self.server_name}"

    def create_room(self, local: str = "grp", room_type: str = "group", creator: str = "mallory") -> str:
        room_id = f"!{local}:{self.server_name}"
        self.rooms[room_id] = []
        self.chain(room_id, self.user(creator), "m.create", {"creator": self.user(creator), "room_type": room_type})
        self.chain(room_id, self.user(creator), "m.member", {"membership": "join", "user": self.user(creator)})
        return room_id

    def chain(self, room_id: str, sender: str, type: str, content: dict, source: bytes | None = None) -> Event:
        chain = self.rooms[room_id]
        head = Head(chain[-1].depth, chain[-1].event_id) if chain else None
        event = chain_event(self.node.keyring.current, head=head, room_id=room_id, room_type="group", sender=sender,
                            type=type, ts=now_ms(), content=content, source=source)
        chain.append(event)
        return event

    def propose(self, room_id: str, sender: str, type: str, content: dict) -> Event:
        return make_event(self.node.keyring.current, room_id=room_id, room_type="group", depth=0, prev=None,
                          origin=self.server_name, sender=self.user(sender), type=type, ts=now_ms(),
                          content=content)

    async def signed(self, peer: str, method: str, target: str, body: bytes = b"",
                     origin_node: Federation | None = None) -> tuple[int, Any]:
        node = origin_node or self.node
        auth = node.sign(destination=peer, method=method, target=target, body=body, now=now_ms())
        resp = await self.client.request(peer, method, target, body=body,
                                         headers={"authorization": auth, "content-type": "application/cbor"})
        return resp.status, (decode(resp.body, max_size=1 << 22) if resp.body else None)

    async def invite(self, remote: Remote, room_id: str, user_id: str) -> tuple[int, Any]:
        event = self.chain(room_id, self.user("mallory"), "m.member", {"membership": "invite", "user": user_id})
        return await self.signed(remote.server_name, "PUT", f"{FED}invite/{room_id}", encode_events_body([event.envelope]))

    async def send(self, remote: Remote, envelopes: list[bytes], txn: str | None = None) -> tuple[int, Any]:
        txn = txn or f"rogue-{now_ms()}-{len(self.seen)}-{id(envelopes)}"
        return await self.signed(remote.server_name, "PUT", f"{FED}send/{txn}", encode_events_body(envelopes))


def resolve_entries(*hosts: RogueHost) -> str:
    return ",".join(f"{h.host}:{h.port}:127.0.0.1" for h in hosts)


@asynccontextmanager
async def daemon(tmp_path: Path, ca: tuple[trustme.CA, Path], host: str, *rogues: RogueHost,
                 resolve: str = "", port: int | None = None, **env: str):
    """One ``scaiwave serve`` named ``host:port`` that reaches the rogues by name: a :class:`Remote`."""
    authority, ca_path = ca
    port = port or free_port()
    entries = ",".join(x for x in (f"{host}:{port}:127.0.0.1", resolve_entries(*rogues), resolve) if x)
    config = load_config(make_env(tmp_path / host, ca_path, authority, host, port, entries, **env))
    async with trio.open_nursery() as nursery, httpx.AsyncClient(verify=trusting(authority), trust_env=False,
                                                                 timeout=30) as http:
        await nursery.start(serve, config)
        remote = Remote(http, host, port)
        for rogue in rogues:
            rogue.knows(remote)
        yield remote
        nursery.cancel_scope.cancel()


async def set_up(remote: Remote, *allowed: str, mode: str = "invite_only") -> str:
    """Key, a policy allowing ``allowed``, tenant acme and user bob; bob's token."""
    assert (await remote.admin("POST", "/v1/admin/federation/key/generate"))[0] == 200
    policy = {"default_mode": mode, "allowed_peers": list(allowed), "blocked_peers": []}
    assert (await remote.admin("PUT", "/v1/admin/federation/policy", policy))[0] == 200
    assert (await remote.admin("POST", "/v1/admin/tenants", {"name": "acme"}))[0] == 200
    return (await remote.admin("POST", "/v1/admin/users", {"name": "bob", "tenant": "acme"}))[1]["access_token"]


async def join_rogue_room(remote: Remote, rogue: RogueHost, token: str, local: str = "grp", history: int = 0) -> str:
    """Peer ``remote`` with ``rogue``; the rogue hosts a room with ``history``
    messages and invites bob, who joins."""
    status, body = await remote.admin("POST", f"/v1/admin/federation/peers/{rogue.server_name}/handshake")
    assert status == 200, body
    room_id = rogue.create_room(local)
    for i in range(history):
        rogue.chain(room_id, rogue.user("mallory"), "m.message", {"body": f"m{i}"})
    status, body = await rogue.invite(remote, room_id, f"@bob:{remote.server_name}")
    assert status == 200, body
    status, body = await remote.request("POST", f"/v1/invites/{room_id}/accept", token=token)
    assert status == 200, body
    return room_id


async def messages(remote: Remote, room_id: str, token: str) -> list[str]:
    status, body = await remote.request("GET", f"/v1/rooms/{room_id}/messages", token=token)
    assert status == 200, body
    return [m["body"] for m in body["messages"]]


@asynccontextmanager
async def in_rogue_room(tmp_path: Path, ca: tuple[trustme.CA, Path], history: int):
    """A real daemon, peer.test, whose bob joined a room rogue.test hosts with
    ``history`` messages: yields ``(rogue, daemon, room_id)``."""
    async with trio.open_nursery() as nursery:
        rogue = await RogueHost(ca[0], "rogue.test").start(nursery)
        async with daemon(tmp_path, ca, "peer.test", rogue) as remote:
            token = await set_up(remote, rogue.server_name)
            yield rogue, remote, await join_rogue_room(remote, rogue, token, history=history)
        nursery.cancel_scope.cancel()
