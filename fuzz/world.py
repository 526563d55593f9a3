"""The fixed world the harnesses run in, and valid seed inputs made by the core itself.

Three servers, fixed seeds, a fixed clock:

- ``your-host.test`` (LOCAL): the receiver. It has learned the others'
  descriptors, so valid inputs get all the way to the signature checks.
- ``peer.test`` (HOST): hosts the rooms. Its key was rotated ten days ago, so
  its early events are signed by an old key (the event-time rule) and its
  old key is still inside the 30-day request grace.
- ``third.test:8449`` (THIRD): a member's server; it sends proposals that the
  host chains with a ``source``.

Everything here is deterministic: the same world every run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from scaiwave_federation.core import (
    Federation,
    Head,
    Initiator,
    KeyRing,
    Policy,
    Refused,
    chain_event,
    make_event,
    sign_request,
    verify_batch,
)
from scaiwave_federation.core.backfill import build_page
from scaiwave_federation.core.codes import Code
from scaiwave_federation.core.events import Event
from scaiwave_federation.core.handshake import answer_hello, refusal_body
from scaiwave_federation.core.keycache import KeyCache
from scaiwave_federation.core.keys import DAY_MS, SigningKey
from scaiwave_federation.core.requests import Authenticated
from scaiwave_federation.core.rooms import encode_events_body

__all__ = ["World", "build_world", "NOW", "LOCAL", "HOST", "THIRD", "ROOM", "DM_ROOM", "TXN_TARGET", "TXN_BODY",
           "CountingVerifier"]

NOW = 1_764_000_000_000
LOCAL = "your-host.test"
HOST = "peer.test"
THIRD = "third.test:8449"
ROOM = "!grp:peer.test"
DM_ROOM = "!dm1:peer.test"
ALICE = "@alice:your-host.test"
BOB = "@bob:peer.test"
CAROL = "@carol:third.test:8449"
TXN_TARGET = "/_scaiwave/federation/v1/send/txn1"
TXN_BODY = b"\xa1fevents\x80"
ENDPOINT = "https://{}/_scaiwave/federation/v1"
HELLO_NONCE = bytes(range(16))


class CountingVerifier:
    """A :data:`~scaiwave_federation.core.keys.BatchVerifier` that counts the
    signatures it checks, so the time budget can allow for them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bool]:
        self.count += len(items)
        return verify_batch(items)


def descriptor_bytes(node: Federation) -> bytes:
    """A node's descriptor as its HTTP body."""
    return json.dumps(node.descriptor(ENDPOINT.format(node.server_name))).encode()


@dataclass
class World:
    """The servers, keys and seed inputs (see module doc)."""

    local: Federation
    host: Federation
    third: Federation
    host_old_key: SigningKey
    counter: CountingVerifier
    initiator: Initiator
    signers: dict[str, tuple[str, SigningKey]]  # key_id -> (server, key)
    room_events: list[Event]
    dm_events: list[Event]
    proposals: list[Event]
    auth_host: Authenticated
    auth_third: Authenticated
    seeds: dict[str, list[bytes]] = field(default_factory=dict)

    def key_for(self, key_id: Any) -> tuple[str, SigningKey] | None:
        """The signer of ``key_id``, if it is one of the world's keys."""
        return self.signers.get(key_id) if isinstance(key_id, str) else None

    def key_of_server(self, server: Any) -> SigningKey | None:
        """A server's current signing key, if it is one of the world's servers."""
        for name, key in self.signers.values():
            if name == server and key is not self.host_old_key:
                return key
        return None


def build_world() -> World:
    """Build the world and its seed corpus (a few dozen signatures; ~20 ms)."""
    counter = CountingVerifier()
    host_old = SigningKey.from_seed(b"\x02" * 32, NOW - 400 * DAY_MS)
    host_ring = KeyRing().generate(b"\x02" * 32, NOW - 400 * DAY_MS).rotate(b"\x03" * 32, NOW - 10 * DAY_MS)
    local = Federation(LOCAL, keyring=KeyRing().generate(b"\x01" * 32, NOW - 30 * DAY_MS),
                       policy=Policy("open"), verifier=counter)
    host = Federation(HOST, keyring=host_ring, policy=Policy("invite_only", frozenset({LOCAL, THIRD})),
                      verifier=counter)
    third = Federation(THIRD, keyring=KeyRing().generate(b"\x04" * 32, NOW - 90 * DAY_MS), policy=Policy("open"))
    # Learned a minute ago: unknown key ids may still trigger one refetch (NeedKeys).
    for node in (host, third):
        learned = local.learn_descriptor(node.server_name, descriptor_bytes(node), NOW - 60_000)
        assert not isinstance(learned, Refused), learned
    host.learn_descriptor(LOCAL, descriptor_bytes(local), NOW - 60_000)
    host.learn_descriptor(THIRD, descriptor_bytes(third), NOW - 60_000)

    hk, tk, lk = host.keyring.current, third.keyring.current, local.keyring.current
    assert hk and tk and lk
    signers = {hk.key_id: (HOST, hk), host_old.key_id: (HOST, host_old), tk.key_id: (THIRD, tk), lk.key_id: (LOCAL, lk)}

    # The group room: early events under the rotated-out key, then proposals
    # from third.test chained with their source.
    events: list[Event] = []
    proposals: list[Event] = []

    def add(key: SigningKey, sender: str, etype: str, ts: int, content: dict, source: bytes | None = None) -> None:
        head = Head(events[-1].depth, events[-1].event_id) if events else None
        events.append(chain_event(key, head=head, room_id=ROOM, room_type="group", sender=sender, type=etype,
                                  ts=ts, content=content, source=source))

    add(host_old, BOB, "m.create", NOW - 20 * DAY_MS, {"creator": BOB, "room_type": "group"})
    add(host_old, BOB, "m.member", NOW - 20 * DAY_MS + 1, {"membership": "join", "user": BOB})
    add(hk, BOB, "m.message", NOW - 5 * DAY_MS, {"body": "hello from the host"})
    add(hk, BOB, "m.member", NOW - 5 * DAY_MS + 1, {"membership": "invite", "user": CAROL})
    for i, (etype, content) in enumerate([("m.member", {"membership": "join", "user": CAROL}),
                                          ("m.message", {"body": "hi, carol here"})]):
        proposal = make_event(tk, room_id=ROOM, room_type="group", depth=0, prev=None, origin=THIRD,
                              sender=CAROL, type=etype, ts=NOW - 4 * DAY_MS + i, content=content)
        proposals.append(proposal)
        add(hk, CAROL, etype, NOW - 4 * DAY_MS + 10 + i, content, source=proposal.envelope)
    for i in range(6):
        add(hk, BOB, "m.message", NOW - 3 * DAY_MS + i, {"body": f"message {i} " + "lorem ipsum " * i})

    dm: list[Event] = []
    dm.append(chain_event(hk, head=None, room_id=DM_ROOM, room_type="dm", sender=BOB, type="m.create",
                          ts=NOW - 1000, content={"creator": BOB, "room_type": "dm"}))
    dm.append(chain_event(hk, head=Head(1, dm[0].event_id), room_id=DM_ROOM, room_type="dm", sender=BOB,
                          type="m.member", ts=NOW - 999, content={"membership": "invite", "user": ALICE}))

    initiator = Initiator(server_name=LOCAL, peer=HOST, keyring=local.keyring, policy=local.policy, keys=KeyCache())
    initiator.start(HELLO_NONCE)
    hello = initiator.descriptor_received(descriptor_bytes(host), NOW)[0].body  # type: ignore[union-attr]

    world = World(
        local=local, host=host, third=third, host_old_key=host_old, counter=counter, initiator=initiator,
        signers=signers, room_events=events, dm_events=dm, proposals=proposals,
        auth_host=Authenticated(HOST, hk.key_id, b"\x00" * 32, NOW + 120_000),
        auth_third=Authenticated(THIRD, tk.key_id, b"\x01" * 32, NOW + 120_000),
    )

    # -- seeds, per harness --------------------------------------------------------
    no_key = Federation("nokey.test")
    world.seeds["descriptor"] = [descriptor_bytes(n) for n in (host, third, local, no_key)] + [
        json.dumps(host.descriptor("https://elsewhere.test/"), indent=1, sort_keys=True).encode(),
    ]
    world.seeds["event"] = [e.envelope for e in events + dm + proposals]
    headers = []
    for key, origin in ((hk, HOST), (host_old, HOST), (tk, THIRD), (lk, LOCAL)):
        headers.append(sign_request(key, origin=origin, destination=LOCAL, method="PUT", target=TXN_TARGET,
                                    body=TXN_BODY, now=NOW - 1000))
    headers.append(sign_request(hk, origin=HOST, destination=LOCAL, method="GET",
                                target="/_scaiwave/federation/v1/rooms/!grp:peer.test/backfill?limit=5",
                                body=b"", now=NOW))
    headers.append(sign_request(hk, origin=HOST, destination=THIRD, method="PUT", target=TXN_TARGET,
                                body=TXN_BODY, now=NOW))
    world.seeds["request"] = [h.encode("latin-1") for h in headers]
    welcome = answer_hello(origin=LOCAL, body=hello, server_name=HOST, key=hk, policy=host.policy)
    assert not isinstance(welcome, Refused), welcome
    world.seeds["handshake"] = [
        hello,
        welcome[0],
        refusal_body(Refused(Code.PEER_NOT_ALLOWED, "not in allowed_peers")),
        refusal_body(Refused(Code.PROTOCOL_VERSION_MISMATCH)),
    ]
    desc = list(reversed(events))
    world.seeds["page"] = [
        build_page(ROOM, None, [e.envelope for e in desc[:5]], [e.depth for e in desc[:5]]),
        build_page(ROOM, 8, [e.envelope for e in desc[5:10]], [e.depth for e in desc[5:10]]),
        build_page(ROOM, 3, [e.envelope for e in desc[10:]], [e.depth for e in desc[10:]]),
        build_page(ROOM, None, [e.envelope for e in desc], [e.depth for e in desc]),
        build_page(ROOM, 2, [], []),
    ]
    world.seeds["txn"] = [
        encode_events_body([e.envelope for e in events[-3:]]),
        encode_events_body([p.envelope for p in proposals]),
        encode_events_body([dm[-1].envelope]),  # an invite: the one m.member invite event
        encode_events_body([e.envelope for e in dm]),
        encode_events_body([e.envelope for e in events]),
    ]
    return world
