"""An embedding host on plain asyncio: the ScaiWave federation core without Trio or httpx.

It uses only the standard library (asyncio, ssl, json) and the sans-IO core
(``scaiwave_federation.core``): the core decides, this host does the I/O.
Against a running ``scaiwave serve`` daemon it

1. serves ``GET /.well-known/scaiwave`` over TLS (``asyncio.start_server``):
   the daemon fetches this descriptor to check our signed requests;
2. peers with the daemon: an :class:`Initiator` handshake, whose requests are
   HTTP/1.1 written by hand over ``asyncio.open_connection(ssl=...)``;
3. waits for the daemon to invite ``@carol`` (our one user) into the room:
   the host answers ``PUT invite/{room_id}`` (route, authenticate, admit,
   ``on_invite``) and ``PUT send/{txn_id}`` (``on_events`` then
   ``on_transaction`` over a snapshot of its in-memory store): every
   decision is the core's;
4. accepts: sends the host carol's signed ``join`` proposal (``PUT send``);
5. pulls the room's history with a :class:`BackfillPuller` (the daemon serves
   it only to servers with a *joined* member): every event's hash, signature
   and chain link checked by the core before it is kept;
6. posts a message the same way (a proposal the host chains), and waits for
   a reply from the daemon's users, pushed to it in a transaction.

Run it (the daemon must allow this server in its policy and resolve its name)::

    python examples/asyncio_host.py --server-name asyncio.test:9449 --port 9449 \\
        --cert cert.pem --key key.pem --ca ca.pem --peer peer.test:8449 \\
        --resolve 127.0.0.1 --room '!abc:peer.test:8449'

``main(...)`` does the same from Python and returns the stored events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import time
from typing import Any

from scaiwave_federation.core import (
    BackfillDone, BackfillPuller, Code, Event, Failed, Federation, FetchDescriptor, Initiator, InviteDecision,
    KeyRing, NeedKeys, Party, PeerAgreed, Policy, Refused, SendRequest, StoreEvents, make_event,
)
from scaiwave_federation.core.codes import HTTP_STATUS
from scaiwave_federation.core.drive import answer  # the core's one code -> status table
from scaiwave_federation.core.handshake import decode_refusal, refusal_body
from scaiwave_federation.core.inbound import snapshot_of_chains
from scaiwave_federation.core.invites import INVITE_ACCEPTED
from scaiwave_federation.core.rooms import encode_events_body
from scaiwave_federation.core.names import split_server_name
from scaiwave_federation.core.wire import b64e, decode

MAX_BODY = 8 * 1024 * 1024
IO_TIMEOUT = 30.0
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           409: "Conflict", 413: "Content Too Large", 421: "Misdirected Request"}


def now_ms() -> int:
    """The host's clock: the core never reads one."""
    return time.time_ns() // 1_000_000


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return body
            body += await reader.readexactly(size + 2)
            body = body[:-2]
            if len(body) > MAX_BODY:
                raise ValueError("body too large")
    length = int(headers.get("content-length", "0"))
    if length > MAX_BODY:
        raise ValueError("body too large")
    return await reader.readexactly(length)


class AsyncioHost:
    """One federation server on asyncio: a core node plus the I/O it asks for."""

    def __init__(self, server_name: str, *, peer: str, resolve_address: str, ca_path: str,
                 local_users: set[str], seed: bytes | None = None) -> None:
        ring = KeyRing().generate(seed or os.urandom(32), now_ms())
        self.node = Federation(server_name, keyring=ring, policy=Policy("invite_only", frozenset({peer})))
        self.peer, self.resolve_address = peer, resolve_address
        self.client_ctx = ssl.create_default_context(cafile=ca_path)  # peers' chains and names verified
        self.local_users = local_users
        self.peered: dict[str, PeerAgreed] = {}
        self.invites: list[InviteDecision] = []
        self.invited = asyncio.Event()
        self.rooms: dict[str, list[Event]] = {}  # our store: each joined room's chain, oldest first
        self.txns: dict[tuple[str, str], bytes] = {}  # (origin, txn_id) -> the reply we gave
        self.pushed = asyncio.Event()

    # -- outbound HTTP/1.1 over TLS ------------------------------------------------------

    async def http(self, server: str, method: str, target: str, headers: dict[str, str] | None = None,
                   body: bytes = b"") -> tuple[int, bytes]:
        """One request to ``server`` (by name: TLS checks the name, the address comes from --resolve)."""
        host, port = split_server_name(server)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.resolve_address, port, ssl=self.client_ctx, server_hostname=host),
            IO_TIMEOUT)
        try:
            lines = [f"{method} {target} HTTP/1.1", f"Host: {server}", f"Content-Length: {len(body)}",
                     "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            status_line, response_headers = await asyncio.wait_for(_read_head(reader), IO_TIMEOUT)
            data = await asyncio.wait_for(_read_body(reader, response_headers), IO_TIMEOUT)
            return int(status_line.split(" ", 2)[1]), data
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ssl.SSLError, ConnectionError):
                pass  # a peer that skips TLS close_notify after Connection: close

    async def fetch_descriptor(self, server: str) -> bytes | Refused:
        """Carry out :class:`FetchDescriptor`: the body bytes, or the failure as a refusal."""
        try:
            status, body = await self.http(server, "GET", "/.well-known/scaiwave")
        except ssl.SSLError as exc:
            return Refused(Code.TLS_FAILURE, str(exc)[:200])
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            return Refused(Code.PEER_UNREACHABLE, f"{server}: {exc!r}"[:200])
        return body if status == 200 else Refused(Code.NO_DESCRIPTOR, f"{server} answered HTTP {status}")

    async def send(self, effect: SendRequest) -> tuple[int, bytes] | Refused:
        """Carry out :class:`SendRequest`: ``(status, body)``, or the transport failure."""
        headers = {"Authorization": effect.authorization, "Content-Type": "application/cbor"}
        if effect.not_before:  # a page asked again after the host said "not now"
            await asyncio.sleep(max(0, effect.not_before - now_ms()) / 1000)
        try:
            return await self.http(effect.destination, effect.method, effect.target, headers, effect.body)
        except ssl.SSLError as exc:
            return Refused(Code.TLS_FAILURE, str(exc)[:200])
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            return Refused(Code.PEER_UNREACHABLE, f"{effect.destination}: {exc!r}"[:200])

    # -- the two machines ------------------------------------------------------------------

    async def perform(self, effect: Any) -> Any:
        """Carry out one effect; the answer for those that need one (core.drive.answer)."""
        if isinstance(effect, FetchDescriptor):
            return await self.fetch_descriptor(effect.server)
        if isinstance(effect, SendRequest):
            return await self.send(effect)
        if isinstance(effect, NeedKeys):
            return await self.fetch_keys(effect)
        return None

    async def fetch_keys(self, need: NeedKeys) -> Refused | None:
        """``NeedKeys``: fetch the server's descriptor into the node's key cache
        (if the node allows a fetch now); ``None`` or why it failed."""
        node = self.node
        refusal = node.may_fetch_keys(need.server, now_ms(), need.key_id)
        if refusal is not None:
            return refusal
        node.keys.fetch_attempted(need.server, now_ms(), need.key_id)
        data = await self.fetch_descriptor(need.server)
        learned = data if isinstance(data, Refused) else node.learn_descriptor(need.server, data, now_ms())
        return learned if isinstance(learned, Refused) else None

    async def drive(self, machine: Any, effects: list[Any]) -> list[Any]:
        """The core's reference driver (core.drive.drive) with ``await`` around the I/O:
        every effect carried out, every answer through the one ``answer`` function."""
        finished = []
        while effects:
            effect = effects.pop(0)
            result = await self.perform(effect)
            if isinstance(effect, (FetchDescriptor, SendRequest, NeedKeys)):
                effects += answer(machine, effect, result, now_ms())
            else:
                finished.append(effect)
        return finished

    async def handshake(self, peer: str) -> PeerAgreed | Refused:
        """Peer with ``peer``: drive an :class:`Initiator` until it agrees or fails."""
        node = self.node
        machine = Initiator(server_name=node.server_name, peer=peer, keyring=node.keyring, policy=node.policy,
                            keys=node.keys, versions=node.versions)
        for effect in await self.drive(machine, machine.start(os.urandom(16))):
            if isinstance(effect, PeerAgreed):
                self.peered[peer] = effect
                return effect
            if isinstance(effect, Failed):
                return effect.refusal
        return Refused(Code.HANDSHAKE_FAILED, "the handshake ended without an answer")

    async def join(self, invite: InviteDecision, peer: str) -> Refused | None:
        """Accept ``invite``: send the host our user's ``join`` proposal."""
        return await self.propose(invite, peer, "m.member", {"membership": "join", "user": invite.invitee})

    async def propose(self, invite: InviteDecision, peer: str, type: str, content: dict) -> Refused | None:
        """Send the room's host a proposal of our invited user's (depth 0, signed
        by us); the host chains it and answers with the chained event."""
        node = self.node
        proposal = make_event(node.keyring.current, room_id=invite.room_id, room_type=invite.room_type, depth=0,
                              prev=None, origin=node.server_name, sender=invite.invitee, type=type,
                              ts=now_ms(), content=content)
        body = encode_events_body([proposal.envelope])
        target = f"/_scaiwave/federation/v1/send/proposal-{os.urandom(6).hex()}"
        auth = node.sign(destination=peer, method="PUT", target=target, body=body, now=now_ms())
        if isinstance(auth, Refused):
            return auth
        reply = await self.send(SendRequest(peer, "PUT", target, body, auth))
        if isinstance(reply, Refused):
            return reply
        if reply[0] != 200:
            return decode_refusal(*reply)
        results = decode(reply[1], max_size=1 << 20)
        first = results.get("results", [{}])[0] if isinstance(results, dict) else {}
        if not (isinstance(first, dict) and first.get("ok") is True):
            return Refused(Code.FORBIDDEN, f"{peer} refused the proposal: {first!r}"[:200])
        return None

    async def backfill(self, room_id: str, peer: str, limit: int = 1000) -> tuple[list[Event], BackfillDone]:
        """Pull ``room_id``'s history from ``peer``; returns the verified events (newest first) and the end."""
        node = self.node
        puller = BackfillPuller(server_name=node.server_name, room_id=room_id, peer=peer, key=node.keyring.current,
                                lookup=node.lookup, keys=node.keys, limit=limit)
        stored: list[Event] = []
        for effect in await self.drive(puller, puller.start(now_ms())):
            if isinstance(effect, StoreEvents):
                stored.extend(effect.events)  # a real host writes them (and effect.cursor) durably here
                self.rooms.setdefault(room_id, []).extend(effect.events)
                self.rooms[room_id].sort(key=lambda e: e.depth)
            elif isinstance(effect, BackfillDone):
                return stored, effect
        raise AssertionError("a pull always ends with BackfillDone")

    # -- inbound: the descriptor, and invites --------------------------------------------------

    async def serve(self, port: int, cert: str, key: str) -> asyncio.Server:
        """Listen on 127.0.0.1:``port`` with TLS."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        return await asyncio.start_server(self._connection, "127.0.0.1", port, ssl=ctx)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line, headers = await asyncio.wait_for(_read_head(reader), IO_TIMEOUT)
            body = await asyncio.wait_for(_read_body(reader, headers), IO_TIMEOUT)
            method, target = request_line.split(" ")[:2]
            status, content_type, payload = await self.answer(method, target, headers.get("authorization"), body)
            head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode("latin-1") + payload)
            await writer.drain()
        except (OSError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a broken client connection: nothing to answer
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ssl.SSLError, ConnectionError):
                pass

    async def answer(self, method: str, target: str, authorization: str | None, body: bytes) -> tuple[int, str, bytes]:
        """``(status, content type, body)`` for one inbound request."""
        node = self.node
        if method == "GET" and target == "/.well-known/scaiwave":
            return 200, "application/json", json.dumps(node.descriptor(f"https://{node.server_name}/_scaiwave/federation/v1")).encode()
        decision = await self._inbound(method, target, authorization, body)
        if isinstance(decision, Refused):
            return HTTP_STATUS[decision.code], "application/cbor", refusal_body(decision)
        if isinstance(decision, bytes):  # a transaction's reply
            return 200, "application/cbor", decision
        self.invites.append(decision)
        self.invited.set()
        return 200, "application/cbor", INVITE_ACCEPTED

    async def _inbound(self, method: str, target: str, authorization: str | None,
                       body: bytes) -> InviteDecision | bytes | Refused:
        node = self.node
        route = node.route(method, target.split("?", 1)[0])
        if isinstance(route, Refused):
            return route
        if route.endpoint not in ("invite", "send"):
            return Refused(Code.NOT_FOUND, f"this host answers invites and transactions only, not {route.endpoint}")
        # Authenticate: the core's Receive machine; its one effect, NeedKeys,
        # is a fetch of the origin's descriptor, answered like any effect.
        inbound = node.receive(method=method, target=target, authorization=authorization, body=body)
        effects = inbound.start(now_ms())
        while effects:
            need = effects.pop(0)
            effects += answer(inbound, need, await self.fetch_keys(need), now_ms())
        auth = inbound.auth
        if auth is None:
            return inbound.refusal or Refused(Code.INTERNAL_ERROR, "undecided")
        refusal = node.admit(auth, peered=auth.origin in self.peered)
        if refusal is not None:
            return refusal
        if route.endpoint == "send":
            return self._transaction(auth, route.param or "", body)
        return node.on_invite(auth, route.param or "", body,
                              local_user=lambda u: Party(u) if u in self.local_users else None)

    def _transaction(self, auth: Any, txn_id: str, body: bytes) -> bytes | Refused:
        """The two core calls (verify, then decide on a snapshot of our store), then store."""
        if (auth.origin, txn_id) in self.txns:
            return self.txns[(auth.origin, txn_id)]
        results = self.node.on_events(auth, body)
        if isinstance(results, Refused):
            return results
        decision = self.node.on_transaction(auth, results, snapshot_of_chains(results, self.rooms), now_ms())
        for event in decision.store:
            self.rooms[event.room_id].append(event)
        self.txns[(auth.origin, txn_id)] = decision.reply
        self.pushed.set()
        return decision.reply


async def run(server_name: str, port: int, cert: str, key: str, ca: str, peer: str, resolve_address: str,
              room_id: str, *, local_user: str = "carol", limit: int = 1000, seed: bytes | None = None,
              invite_timeout: float = 60.0) -> tuple[list[Event], list[str]]:
    """The whole flow on the running loop (see the module doc): the pulled events
    (newest first) and the replies pushed to us. Raises ``RuntimeError`` on a refusal."""
    host = AsyncioHost(server_name, peer=peer, resolve_address=resolve_address, ca_path=ca,
                       local_users={f"@{local_user}:{server_name}"}, seed=seed)
    server = await host.serve(port, cert, key)
    try:
        agreed = await host.handshake(peer)
        if isinstance(agreed, Refused):
            raise RuntimeError(f"handshake with {peer} refused: {agreed}")
        print(f"peered with {peer} ({agreed.protocol_version}); waiting for an invite to {room_id}", file=sys.stderr)
        while not any(i.room_id == room_id for i in host.invites):
            host.invited.clear()
            await asyncio.wait_for(host.invited.wait(), invite_timeout)
        invite = next(i for i in host.invites if i.room_id == room_id)
        refused = await host.join(invite, peer)
        if refused is not None:
            raise RuntimeError(f"joining {room_id} refused: {refused}")
        host.rooms.setdefault(room_id, [])
        events, done = await host.backfill(room_id, peer, limit)
        if done.refusal is not None:
            raise RuntimeError(f"backfill stopped after {done.stored} events: {done.refusal}")
        # Messages both ways: ours goes to the host as a proposal; a reply from
        # the daemon's users comes back pushed in a transaction.
        refused = await host.propose(invite, peer, "m.message", {"body": "backfilled"})
        if refused is not None:
            raise RuntimeError(f"posting refused: {refused}")
        while not (received := [e.content.get("body") for e in host.rooms[room_id]
                                if e.type == "m.message" and e.sender != invite.invitee
                                and str(e.content.get("body", "")).startswith("reply")]):
            host.pushed.clear()
            await asyncio.wait_for(host.pushed.wait(), invite_timeout)
        return events, received
    finally:
        server.close()
        await server.wait_closed()


def main(server_name: str, port: int, cert: str, key: str, ca: str, peer: str, resolve_address: str,
         room_id: str, **options) -> tuple[list[Event], list[str]]:
    """Run the flow in a fresh event loop; returns the pulled events (verified,
    newest first) and the replies the daemon pushed to us."""
    return asyncio.run(run(server_name, port, cert, key, ca, peer, resolve_address, room_id, **options))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("server-name", "cert", "key", "ca", "peer", "resolve", "room"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", default="carol", help="our local user the daemon invites")
    a = parser.parse_args()
    stored, replies = main(a.server_name, a.port, a.cert, a.key, a.ca, a.peer, a.resolve, a.room,
                           local_user=a.user)
    print(json.dumps({"events": [{"event_id": e.id_text, "depth": e.depth, "type": e.type,
                                  "envelope": b64e(e.envelope)} for e in stored], "replies": replies}, indent=2))
