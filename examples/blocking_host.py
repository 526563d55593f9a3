"""A blocking host: the ScaiWave federation core with threads, ``ssl`` and ``http.client``.

No event loop at all: the standard library's ``http.server`` (one thread per
connection, TLS by ``ssl``) answers the peer, ``http.client`` talks to it, and
the sans-IO core (``scaiwave_federation.core``) makes every decision. Against
a running ``scaiwave serve`` daemon it

1. serves ``GET /.well-known/scaiwave`` (the daemon checks our signed
   requests with it), ``PUT invite/{room_id}`` (``on_invite``) and
   ``PUT send/{txn_id}`` (``on_events`` then ``on_transaction`` over the
   snapshot of its in-memory store): the daemon's pushes of room events;
2. peers with the daemon: an :class:`Initiator` driven by the core's
   reference driver (:func:`~scaiwave_federation.core.drive`);
3. waits for an invite of its one user, joins with a signed proposal, and
   posts a message the same way (the host chains both);
4. waits for a message from one of the daemon's users (pushed to us);
5. pulls the room's whole history with a :class:`BackfillPuller`, again
   through the reference driver.

``main(...)`` does it all and returns the events it holds (verified).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from scaiwave_federation.core import (
    BackfillPuller, Code, Event, Federation, FetchDescriptor, Initiator, InviteDecision, KeyRing, NeedKeys, Party,
    PeerAgreed, Policy, Refused, SendRequest, StoreEvents, answer, drive, make_event, verify_events,
)
from scaiwave_federation.core.codes import HTTP_STATUS
from scaiwave_federation.core.handshake import decode_refusal, refusal_body
from scaiwave_federation.core.inbound import snapshot_of_chains
from scaiwave_federation.core.invites import INVITE_ACCEPTED
from scaiwave_federation.core.names import split_server_name
from scaiwave_federation.core.rooms import encode_events_body
from scaiwave_federation.core.wire import decode

MAX_BODY = 8 * 1024 * 1024
IO_TIMEOUT = 30.0


def now_ms() -> int:
    """The host's clock: the core never reads one."""
    return time.time_ns() // 1_000_000


class _Pinned(http.client.HTTPSConnection):
    """HTTPS to ``name`` (SNI, certificate name check) at a pinned ``address``
    (like SCAIWAVE_RESOLVE: only where the TCP connection goes changes)."""

    def __init__(self, address: str, name: str, port: int, context: ssl.SSLContext) -> None:
        super().__init__(name, port, context=context, timeout=IO_TIMEOUT)
        self._address = address
        self._ctx = context

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), IO_TIMEOUT)
        self.sock = self._ctx.wrap_socket(raw, server_hostname=self.host)


class BlockingHost:
    """One federation server on threads: a core node, an in-memory store, the I/O it asks for."""

    def __init__(self, server_name: str, *, peer: str, resolve_address: str, ca_path: str, local_user: str,
                 seed: bytes | None = None) -> None:
        ring = KeyRing().generate(seed or os.urandom(32), now_ms())
        self.node = Federation(server_name, keyring=ring, policy=Policy("invite_only", frozenset({peer})))
        self.peer, self.resolve_address, self.user = peer, resolve_address, local_user
        self.client_ctx = ssl.create_default_context(cafile=ca_path)  # peers' chains and names verified
        self.lock = threading.Lock()  # one core, many connection threads: decisions one at a time
        self.changed = threading.Condition(self.lock)
        self.peered: set[str] = set()
        self.invites: list[InviteDecision] = []
        self.rooms: dict[str, list[Event]] = {}  # our store: each joined room's chain, oldest first
        self.txns: dict[tuple[str, str], bytes] = {}  # (origin, txn_id) -> the reply we gave

    # -- outbound ------------------------------------------------------------------------------

    def http(self, server: str, method: str, target: str, headers: dict[str, str] | None = None,
             body: bytes = b"") -> tuple[int, bytes]:
        """One request to ``server`` by name (TLS checks the name; the address is pinned)."""
        host, port = split_server_name(server)
        conn = _Pinned(self.resolve_address, host, port, self.client_ctx)
        try:
            conn.request(method, target, body=body, headers={"Host": server, **(headers or {})})
            response = conn.getresponse()
            return response.status, response.read(MAX_BODY + 1)[:MAX_BODY]
        finally:
            conn.close()

    def perform(self, effect: Any) -> Any:
        """Carry out one effect of a machine (the reference driver's ``perform``)."""
        try:
            if isinstance(effect, FetchDescriptor):
                status, body = self.http(effect.server, "GET", "/.well-known/scaiwave")
                return body if status == 200 else Refused(Code.NO_DESCRIPTOR, f"HTTP {status}")
            if isinstance(effect, SendRequest):
                if effect.not_before:  # a page asked again after the host said "not now"
                    time.sleep(max(0, effect.not_before - now_ms()) / 1000)
                return self.http(effect.destination, effect.method, effect.target,
                                 {"Authorization": effect.authorization, "Content-Type": "application/cbor"},
                                 effect.body)
            if isinstance(effect, NeedKeys):  # into the key cache, if the node allows a fetch now
                with self.lock:
                    refusal = self.node.may_fetch_keys(effect.server, now_ms(), effect.key_id)
                    if refusal is not None:
                        return refusal
                    self.node.keys.fetch_attempted(effect.server, now_ms(), effect.key_id)
                status, body = self.http(effect.server, "GET", "/.well-known/scaiwave")  # no lock held during I/O
                if status != 200:
                    return Refused(Code.NO_DESCRIPTOR, f"HTTP {status}")
                with self.lock:
                    learned = self.node.learn_descriptor(effect.server, body, now_ms())
                return learned if isinstance(learned, Refused) else None
        except ssl.SSLError as exc:
            return Refused(Code.TLS_FAILURE, str(exc)[:200])
        except (OSError, http.client.HTTPException) as exc:
            return Refused(Code.PEER_UNREACHABLE, f"{exc!r}"[:200])
        if isinstance(effect, StoreEvents):
            with self.changed:
                chain = self.rooms.setdefault(effect.room_id, [])
                held = {e.event_id for e in chain}
                chain.extend(e for e in effect.events if e.event_id not in held)
                chain.sort(key=lambda e: e.depth)
                self.changed.notify_all()
        elif isinstance(effect, PeerAgreed):
            self.peered.add(effect.server)
        return None

    def handshake(self) -> None:
        machine = Initiator(server_name=self.node.server_name, peer=self.peer, keyring=self.node.keyring,
                            policy=self.node.policy, keys=self.node.keys, versions=self.node.versions)
        drive(machine, machine.start(os.urandom(16)), self.perform, now_ms)
        if self.peer not in self.peered:
            raise RuntimeError(f"handshake with {self.peer} refused: {machine.refusal}")

    def propose(self, room_id: str, room_type: str, type: str, content: dict) -> Event:
        """Send the room's host a proposal of our user's; returns the event it chained."""
        proposal = make_event(self.node.keyring.current, room_id=room_id, room_type=room_type, depth=0, prev=None,
                              origin=self.node.server_name, sender=self.user, type=type, ts=now_ms(),
                              content=content)
        body = encode_events_body([proposal.envelope])
        target = f"/_scaiwave/federation/v1/send/blocking-{os.urandom(6).hex()}"
        auth = self.node.sign(destination=self.peer, method="PUT", target=target, body=body, now=now_ms())
        result = self.perform(SendRequest(self.peer, "PUT", target, body, auth))
        if isinstance(result, Refused) or result[0] != 200:
            raise RuntimeError(f"proposal refused: {result if isinstance(result, Refused) else decode_refusal(*result)}")
        reply = decode(result[1], max_size=MAX_BODY)
        first = reply["results"][0] if isinstance(reply, dict) and reply.get("results") else {}
        if not (isinstance(first, dict) and first.get("ok") is True):
            raise RuntimeError(f"{self.peer} refused our proposal: {first!r}"[:300])
        with self.lock:
            (chained,) = verify_events(reply["events"][:1], self.node.lookup)
        if not isinstance(chained, Event) or chained.source != proposal.envelope:
            raise RuntimeError(f"{self.peer} answered with no verified chaining of our proposal: {chained!r}"[:300])
        return chained

    def backfill(self, room_id: str) -> BackfillPuller:
        puller = BackfillPuller(server_name=self.node.server_name, room_id=room_id, peer=self.peer,
                                key=self.node.keyring.current, keys=self.node.keys, lookup=self.node.lookup)
        drive(puller, puller.start(now_ms()), self.perform, now_ms)
        return puller

    # -- inbound ------------------------------------------------------------------------------

    def answer(self, method: str, target: str, authorization: str | None, body: bytes) -> tuple[int, str, bytes]:
        """``(status, content type, body)`` for one inbound request."""
        node = self.node
        if method == "GET" and target == "/.well-known/scaiwave":
            descriptor = node.descriptor(f"https://{node.server_name}/_scaiwave/federation/v1")
            return 200, "application/json", json.dumps(descriptor).encode()
        route = node.route(method, target.split("?", 1)[0])
        if isinstance(route, Refused):
            return _refusal(route)
        # Authenticate: the core's Receive machine, its one effect (NeedKeys: fetch
        # the origin's descriptor) carried out like any other, no lock held during I/O.
        inbound = node.receive(method=method, target=target, authorization=authorization, body=body)
        with self.lock:
            effects = inbound.start(now_ms())
        while effects:
            need = effects.pop(0)
            failure = self.perform(need)
            with self.lock:
                effects += answer(inbound, need, failure, now_ms())
        auth = inbound.auth
        if auth is None:
            return _refusal(inbound.refusal or Refused(Code.INTERNAL_ERROR, "undecided"))
        with self.changed:
            refusal = node.admit(auth, peered=auth.origin in self.peered)
            if refusal is not None:
                return _refusal(refusal)
            if route.endpoint == "invite":
                decision = node.on_invite(auth, route.param or "", body,
                                          local_user=lambda u: Party(u) if u == self.user else None)
                if isinstance(decision, Refused):
                    return _refusal(decision)
                self.invites.append(decision)
                self.changed.notify_all()
                return 200, "application/cbor", INVITE_ACCEPTED
            if route.endpoint == "send":
                return self._transaction(auth, route.param or "", body)
        return _refusal(Refused(Code.NOT_FOUND, f"this host does not serve {route.endpoint}"))

    def _transaction(self, auth: Any, txn_id: str, body: bytes) -> tuple[int, str, bytes]:
        """The two core calls (verify, then decide on a snapshot of our store), then store."""
        if (auth.origin, txn_id) in self.txns:
            return 200, "application/cbor", self.txns[(auth.origin, txn_id)]
        results = self.node.on_events(auth, body)
        if isinstance(results, Refused):
            return _refusal(results)
        decision = self.node.on_transaction(auth, results, snapshot_of_chains(results, self.rooms), now_ms())
        for event in decision.store:
            self.rooms[event.room_id].append(event)
        self.txns[(auth.origin, txn_id)] = decision.reply
        self.changed.notify_all()
        return 200, "application/cbor", decision.reply

    def serve(self, port: int, cert: str, key: str) -> ThreadingHTTPServer:
        """Listen on 127.0.0.1:``port`` with TLS, one thread per connection."""
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length > MAX_BODY:
                    self.send_error(413)
                    return
                body = self.rfile.read(length)
                status, content_type, payload = host.answer(self.command, self.path,
                                                            self.headers.get("authorization"), body)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_POST = _serve

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def wait(self, predicate, timeout: float, what: str) -> Any:
        with self.changed:
            if not self.changed.wait_for(predicate, timeout):
                raise RuntimeError(f"timed out waiting for {what}")
            return predicate()


def _refusal(refusal: Refused) -> tuple[int, str, bytes]:
    return HTTP_STATUS[refusal.code], "application/cbor", refusal_body(refusal)


def main(server_name: str, port: int, cert: str, key: str, ca: str, peer: str, resolve_address: str, *,
         local_user: str = "dave", text: str = "hello from a blocking host", wait_s: float = 60.0,
         seed: bytes | None = None) -> dict[str, Any]:
    """The whole flow (module doc). Returns ``{"room_id", "chain": [envelopes, oldest first], "received"}``."""
    user = f"@{local_user}:{server_name}"
    host = BlockingHost(server_name, peer=peer, resolve_address=resolve_address, ca_path=ca, local_user=user,
                        seed=seed)
    server = host.serve(port, cert, key)
    try:
        host.handshake()
        invite = host.wait(lambda: host.invites[0] if host.invites else None, wait_s, "an invite")
        room_id = invite.room_id
        with host.lock:
            host.rooms.setdefault(room_id, [])
        host.propose(room_id, invite.room_type, "m.member", {"membership": "join", "user": user})
        host.propose(room_id, invite.room_type, "m.message", {"body": text})
        # The history up to now, then a message from the daemon's side pushed to us.
        puller = host.backfill(room_id)
        if puller.done is None or puller.done.refusal is not None:
            raise RuntimeError(f"backfill refused: {puller.done}")
        # Say so in the room: the daemon's users can answer now, and we will link it.
        host.propose(room_id, invite.room_type, "m.message", {"body": "backfilled"})
        received = host.wait(lambda: [e.content.get("body") for e in host.rooms[room_id]
                                      if e.type == "m.message" and e.sender != user and e.origin == peer
                                      and e.content.get("body", "").startswith("reply")] or None,
                             wait_s, "a reply from the daemon's user")
        with host.lock:
            chain = [e.envelope for e in host.rooms[room_id]]
        return {"room_id": room_id, "chain": chain, "received": received}
    finally:
        server.shutdown()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("server-name", "cert", "key", "ca", "peer", "resolve"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", default="dave", help="our one local user, whom the daemon invites")
    a = parser.parse_args()
    result = main(a.server_name, a.port, a.cert, a.key, a.ca, a.peer, a.resolve, local_user=a.user)
    print(json.dumps({"room_id": result["room_id"], "events": len(result["chain"]), "received": result["received"]}))
