"""Helpers for the core tests: cores from fixed seeds, and two cores over a fake link.

Everything here is in memory and deterministic: keys come from fixed seeds,
the clock is an argument, and :class:`FakeLink` carries each
:class:`~scaiwave_federation.core.SendRequest` straight to the destination
core's ``route`` / ``authenticate`` / ``on_*`` methods, doing the small part
of the shell's job a test needs (key fetches, storage of hosted rooms,
codes -> HTTP statuses). No sockets, no threads, no clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Iterable
from urllib.parse import parse_qsl

from scaiwave_federation.core import (
    BackfillDone,
    BackfillPuller,
    Code,
    Event,
    Federation,
    FetchDescriptor,
    Head,
    Initiator,
    KeyRing,
    NeedKeys,
    Party,
    PeerAgreed,
    Policy,
    Refused,
    SendRequest,
    SigningKey,
    StoreEvents,
    chain_event,
    drive,
)
from scaiwave_federation.core.inbound import snapshot_of_chains
from scaiwave_federation.core.backfill import MAX_PULL, PAGE_CAP, build_page
from scaiwave_federation.core.handshake import refusal_body
from scaiwave_federation.core.rooms import encode_events_body
from scaiwave_federation.core.wire import decode, encode

#: The fixed clock of every scenario: 2025-11-24T16:00:00Z in milliseconds.
NOW = 1_764_000_000_000
A = "your-host.test"
B = "peer.test:8449"
#: The group room :func:`hosted_pair` has B host.
GROUP_ROOM = f"!grp:{B}"
C = "third.test"
DAY = 24 * 60 * 60 * 1000


def seed(n: int) -> bytes:
    """The fixed 32-byte key seed ``bytes([n]) * 32`` (0x01*32, 0x02*32, ...)."""
    return bytes([n]) * 32


def endpoint(server_name: str) -> str:
    return f"https://{server_name}/_scaiwave/federation/v1"


def make_node(
    name: str,
    seed_byte: int | None,
    *,
    mode: str = "invite_only",
    allowed: Iterable[str] = (),
    blocked: Iterable[str] = (),
    now: int = NOW,
    **kwargs,
) -> Federation:
    """A :class:`Federation` whose key comes from ``seed(seed_byte)`` (no key if ``None``)."""
    ring = KeyRing() if seed_byte is None else KeyRing().generate(seed(seed_byte), now)
    policy = Policy(mode, frozenset(allowed), frozenset(blocked))
    return Federation(name, keyring=ring, policy=policy, **kwargs)


def pair(**kwargs) -> tuple[Federation, Federation]:
    """Servers A (seed 0x01) and B (seed 0x02), each allowing the other."""
    return (
        make_node(A, 1, allowed=[B], **kwargs),
        make_node(B, 2, allowed=[A], **kwargs),
    )


def descriptor_bytes(node: Federation) -> bytes:
    """The node's ``/.well-known/scaiwave`` body, as the shell serves it."""
    return json.dumps(node.descriptor(endpoint(node.server_name))).encode()


# -- codes -> HTTP statuses (the shell keeps the real table; this one is simple) --

_STATUS = {
    Code.UNAUTHORIZED: 401,
    Code.UNKNOWN_KEY: 401,
    Code.BAD_SIGNATURE: 401,
    Code.EXPIRED_KEY: 401,
    Code.CLOCK_SKEW: 401,
    Code.REPLAYED_REQUEST: 401,
    Code.WRONG_DESTINATION: 401,
    Code.FEDERATION_CLOSED: 403,
    Code.PEER_NOT_ALLOWED: 403,
    Code.PEER_BLOCKED: 403,
    Code.NOT_PEERED: 403,
    Code.FORBIDDEN: 403,
    Code.ROOM_INCOGNITO: 403,
    Code.ROOM_BRIDGE: 403,
    Code.ROOM_SIDEKICK: 403,
    Code.TENANT_FEDERATION_DISABLED: 403,
    Code.NOT_FOUND: 404,
    Code.TOO_LARGE: 413,
    Code.OWN_KEY_MISSING: 503,
}


def status_for(refusal: Refused) -> int:
    return _STATUS.get(refusal.code, 400)


def error_reply(refusal: Refused) -> tuple[int, bytes]:
    return status_for(refusal), refusal_body(refusal)


# -- rooms ----------------------------------------------------------------------


def build_chain(
    key: SigningKey,
    room_id: str,
    n: int,
    *,
    room_type: str = "group",
    sender: str | None = None,
    ts: int = NOW,
) -> list[Event]:
    """A room chain of ``n`` events (depth 1..n): an ``m.create`` then messages ``m2``, ``m3``..."""
    host = room_id.split(":", 1)[1]
    sender = sender or f"@alice:{host}"
    events: list[Event] = []
    head: Head | None = None
    for i in range(1, n + 1):
        etype, content = ("m.create", {"creator": sender}) if i == 1 else ("m.message", {"body": f"m{i}"})
        event = chain_event(key, head=head, room_id=room_id, room_type=room_type, sender=sender,
                            type=etype, ts=ts + i, content=content)
        events.append(event)
        head = Head(event.depth, event.event_id)
    return events


def head_of(events: list[Event]) -> Head | None:
    return Head(events[-1].depth, events[-1].event_id) if events else None


def invite_event(key: SigningKey, chain: list[Event], invitee: str, *, ts: int = NOW) -> Event:
    """The host's ``m.member`` invite of ``invitee``, chained after ``chain``."""
    first = chain[0]
    return chain_event(key, head=head_of(chain), room_id=first.room_id, room_type=first.room_type,
                       sender=first.sender, type="m.member", ts=ts,
                       content={"membership": "invite", "user": invitee})


def tamper_envelope(event: Event, **content: object) -> bytes:
    """The event's envelope with its body's content changed but the old signature kept."""
    body = decode(event.body, max_size=1 << 20)
    body["content"] = {**body["content"], **content} if content else {**body["content"], "body": "forged"}
    return encode([encode(body), event.key_id, event.signature])


# -- the fake link ------------------------------------------------------------------


@dataclass
class HostedRoom:
    room_type: str
    events: list[Event]
    tenant_federates: bool = True
    member_servers: set[str] = field(default_factory=set)
    #: depth -> envelope served instead of the stored one (a lying or broken host).
    substitutes: dict[int, bytes] = field(default_factory=dict)


@dataclass
class FakeServer:
    """One core plus the little state its shell would keep."""

    node: Federation
    rooms: dict[str, HostedRoom] = field(default_factory=dict)
    users: set[str] = field(default_factory=set)
    peered: dict[str, PeerAgreed] = field(default_factory=dict)
    invites: list = field(default_factory=list)
    received: list = field(default_factory=list)
    #: The chains of rooms hosted elsewhere that this server knows (invited to), oldest first.
    chains: dict[str, list[Event]] = field(default_factory=dict)
    #: (origin, txn id) -> the reply given (a repeated transaction gets it again).
    txns: dict[tuple[str, str], bytes] = field(default_factory=dict)
    #: Served at /.well-known/scaiwave instead of our own descriptor.
    descriptor_override: bytes | None = None


@dataclass(frozen=True)
class Exchange:
    """One request and its answer, as the link carried them."""

    origin: str
    destination: str
    method: str
    target: str
    body: bytes
    authorization: str
    status: int
    reply: bytes


class FakeLink:
    """Carries requests between in-memory cores. ``log`` keeps every exchange."""

    def __init__(self, *nodes: Federation) -> None:
        self.servers = {n.server_name: FakeServer(n) for n in nodes}
        self.log: list[Exchange] = []
        self.fetches: list[str] = []

    def server(self, name: str) -> FakeServer:
        return self.servers[name]

    def fetch_descriptor(self, name: str) -> bytes | Refused:
        """What ``GET https://name/.well-known/scaiwave`` returns."""
        self.fetches.append(name)
        srv = self.servers.get(name)
        if srv is None:
            return Refused(Code.PEER_UNREACHABLE, f"no server {name}")
        return srv.descriptor_override if srv.descriptor_override is not None else descriptor_bytes(srv.node)

    def deliver(self, origin: str, req: SendRequest, now: int) -> tuple[int, bytes]:
        status, reply = self._answer(req, now)
        self.log.append(Exchange(origin, req.destination, req.method, req.target, req.body,
                                 req.authorization, status, reply))
        return status, reply

    # The destination's side: what the shell does with one inbound request.
    def _answer(self, req: SendRequest, now: int) -> tuple[int, bytes]:
        srv = self.servers.get(req.destination)
        if srv is None:
            return error_reply(Refused(Code.PEER_UNREACHABLE, req.destination))
        node = srv.node
        path, _, query = req.target.partition("?")
        route = node.route(req.method, path)
        if isinstance(route, Refused):
            return error_reply(route)
        auth = self.authenticate(srv, req, now)
        if isinstance(auth, Refused):
            return error_reply(auth)
        if route.endpoint == "handshake":
            answer = node.on_handshake(auth, req.body)
            if isinstance(answer, Refused):
                return error_reply(answer)
            reply, agreed = answer
            srv.peered[agreed.server] = agreed
            return 200, reply
        refusal = node.admit(auth, peered=auth.origin in srv.peered)
        if refusal is not None:
            return error_reply(refusal)
        if route.endpoint == "invite":
            decision = node.on_invite(auth, route.param, req.body,
                                      local_user=lambda u: Party(u) if u in srv.users else None)
            if isinstance(decision, NeedKeys):
                decision = Refused(Code.UNKNOWN_KEY, str(decision))
            if isinstance(decision, Refused):
                return error_reply(decision)
            srv.invites.append(decision)
            srv.chains.setdefault(decision.room_id, [])
            return 200, encode({})
        if route.endpoint == "send":
            # The same two core calls as the daemon: verify, then decide on a
            # snapshot of what this server holds; store what the decision says.
            txn = (auth.origin, route.param or "")
            if txn in srv.txns:
                return 200, srv.txns[txn]
            results = node.on_events(auth, req.body)
            if isinstance(results, Refused):
                return error_reply(results)
            decision = node.on_transaction(auth, results, snapshot_of_chains(results, srv.chains), now)
            for event in decision.store:
                srv.chains[event.room_id].append(event)
                srv.received.append(event)
            srv.txns[txn] = decision.reply
            return 200, decision.reply
        assert route.endpoint == "backfill"
        room = srv.rooms.get(route.param)
        answer = node.on_backfill(
            auth, route.param, dict(parse_qsl(query)),
            room_type=room.room_type if room else None,
            tenant_federates=room.tenant_federates if room else True,
            members={f"@member:{s}": "join" for s in room.member_servers} if room else {},
        )
        if isinstance(answer, Refused):
            return error_reply(answer)
        before, limit = answer
        chosen = [e for e in reversed(room.events) if before is None or e.depth < before][:limit]
        envelopes = [room.substitutes.get(e.depth, e.envelope) for e in chosen]
        return 200, build_page(route.param, before, envelopes, [e.depth for e in chosen])

    def authenticate(self, srv: FakeServer, req: SendRequest, now: int):
        """The core's :class:`~scaiwave_federation.core.Receive` machine, driven by
        the reference driver; its ``NeedKeys`` fetches the origin's descriptor."""
        node = srv.node

        def fetch_keys(need):
            if not isinstance(need, NeedKeys):
                return None
            refusal = node.may_fetch_keys(need.server, now, need.key_id)
            if refusal is not None:
                return refusal
            node.keys.fetch_attempted(need.server, now, need.key_id)
            data = self.fetch_descriptor(need.server)
            learned = data if isinstance(data, Refused) else node.learn_descriptor(need.server, data, now)
            return learned if isinstance(learned, Refused) else None

        inbound = node.receive(method=req.method, target=req.target, authorization=req.authorization, body=req.body)
        drive(inbound, inbound.start(now), fetch_keys, lambda: now)
        return inbound.auth if inbound.auth is not None else inbound.refusal


# -- drivers ----------------------------------------------------------------------------


def run_handshake(
    link: FakeLink,
    initiator: str,
    responder: str,
    *,
    nonce: bytes = b"n" * 16,
    now: int = NOW,
    reply_filter: Callable[[int, bytes], tuple[int, bytes]] | None = None,
) -> tuple[Initiator, list]:
    """Drive an :class:`Initiator` over the link; returns it and every effect it emitted."""
    srv = link.server(initiator)
    node = srv.node
    ini = Initiator(server_name=initiator, peer=responder, keyring=node.keyring, policy=node.policy,
                    keys=node.keys, versions=node.versions)
    transcript: list = []
    effects = ini.start(nonce)
    while effects:
        transcript.extend(effects)
        following: list = []
        for eff in effects:
            if isinstance(eff, FetchDescriptor):
                data = link.fetch_descriptor(eff.server)
                if isinstance(data, Refused):
                    following += ini.descriptor_failed(data)
                else:
                    following += ini.descriptor_received(data, now)
            elif isinstance(eff, SendRequest):
                status, body = link.deliver(initiator, eff, now)
                if reply_filter is not None:
                    status, body = reply_filter(status, body)
                following += ini.reply_received(status, body)
            elif isinstance(eff, PeerAgreed):
                srv.peered[eff.server] = eff
        effects = following
    return ini, transcript


@dataclass
class BackfillRun:
    stored: list[Event] = field(default_factory=list)
    effects: list = field(default_factory=list)
    cursor: bytes | None = None
    done: BackfillDone | None = None
    requests: int = 0


def run_backfill(link: FakeLink, puller: BackfillPuller, *, now: int = NOW,
                 max_requests: int | None = None) -> BackfillRun:
    """Drive a puller over the link until it is done, or cut it off after ``max_requests`` pages."""
    run = BackfillRun()
    node = link.server(puller.server_name).node
    effects = puller.start(now)
    while effects:
        run.effects.extend(effects)
        following: list = []
        for eff in effects:
            if isinstance(eff, StoreEvents):
                run.stored.extend(eff.events)
                run.cursor = eff.cursor
            elif isinstance(eff, BackfillDone):
                run.done = eff
            elif isinstance(eff, NeedKeys):
                data = link.fetch_descriptor(eff.server)
                if isinstance(data, bytes):
                    node.learn_descriptor(eff.server, data, now)
                following += puller.keys_updated(now)
            elif isinstance(eff, SendRequest):
                if max_requests is not None and run.requests >= max_requests:
                    return run  # cut off: the request is never answered
                run.requests += 1
                status, body = link.deliver(puller.server_name, eff, now)
                following += puller.page_received(status, body, now)
        effects = following
    return run


def hosted_pair(n_events: int, *, room_type: str = "group") -> tuple[FakeLink, list[Event], str]:
    """A and B peered over a link; B hosts a group room of ``n_events`` that A may read."""
    a, b = pair()
    link = FakeLink(a, b)
    ini, _ = run_handshake(link, A, B)
    assert ini.state == "peered"
    room_id = GROUP_ROOM
    chain = build_chain(b.keyring.current, room_id, n_events, room_type=room_type)
    link.server(B).rooms[room_id] = HostedRoom(room_type, chain, member_servers={A})
    return link, chain, room_id


def events_body(events: Iterable[Event]) -> bytes:
    return encode_events_body([e.envelope for e in events])


def backfill_puller(link: FakeLink, *, limit: int = MAX_PULL, page_size: int = PAGE_CAP, room_id: str = GROUP_ROOM,
                    anchor: tuple[int, bytes | None] | None = None) -> BackfillPuller:
    """A's puller of ``room_id`` (by default :func:`hosted_pair`'s room) from B."""
    a = link.server(A).node
    return BackfillPuller(server_name=A, room_id=room_id, peer=B, key=a.keyring.current, keys=a.keys,
                          limit=limit, page_size=page_size, anchor=anchor)


def assert_chain_run(stored: list[Event], chain: list[Event], count: int) -> None:
    """``stored`` is exactly the newest ``count`` events of ``chain``, newest first, linked."""
    expected = list(reversed(chain))[:count]
    assert [e.event_id for e in stored] == [e.event_id for e in expected]
    for newer, older in zip(stored, stored[1:]):
        assert newer.prev == older.event_id and newer.depth == older.depth + 1
