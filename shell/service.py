"""The daemon's federation service: carries out the core's effects.

It owns the running state that ties the core to the world: the
:class:`~scaiwave_federation.core.Federation` node, storage, the outbound
client, the clock and the recorder. It makes no protocol decision: it asks the
core, then fetches, sends and stores what the core says.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import trio

from scaiwave_federation.core import (
    MAX_PULL,
    BackfillDone,
    BackfillPuller,
    Code,
    Event,
    Failed,
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
    RoomFacts,
    SendRequest,
    SigningKey,
    StoreEvents,
)
from scaiwave_federation.core.authz import push_targets
from scaiwave_federation.core.delivery import Deferred, Delivered, Delivery, Dropped, Rehandshake, SendTransaction
from scaiwave_federation.core.handshake import decode_refusal
from scaiwave_federation.core.keys import OldKey
from scaiwave_federation.core.rooms import decode_events_body, encode_events_body

from .client import PeerClient, TransportError, backoff_ms
from .config import Config, client_ssl_context
from .limits import Gate, fetch_cause, limits_of
from .recorder import Recorder
from .storage import AsyncStore, StorageError, Store
from .timings import PageTimer, VerifyClock, Work
from .verify_pool import threaded_verifier

log = logging.getLogger("scaiwave.service")

__all__ = ["Service", "BackfillJob"]

#: ``last_seen`` is written at most this often per peer (see Service.peer_seen).
SEEN_RESOLUTION_MS = 1000
#: How long the outbox sleeps when nothing wakes it (every change does).
OUTBOX_IDLE_S = 5.0


def _refusal_of(exc: TransportError) -> Refused:
    try:
        return Refused(Code(exc.code), exc.message)
    except ValueError:
        return Refused(Code.PEER_UNREACHABLE, exc.message)


@dataclass
class BackfillJob:
    """A running or finished backfill, as the admin API shows it."""

    id: int
    room_id: str
    peer: str
    limit: int
    stored: int = 0
    state: str = "running"
    error: dict | None = None
    refused: list[dict] = field(default_factory=list)
    reached_start: bool = False
    #: Catching up: our head of the room when the gap was seen (see BackfillPuller's ``until``).
    until: tuple[int, bytes] | None = None
    done: trio.Event = field(default_factory=trio.Event, repr=False)

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "room_id": self.room_id, "peer": self.peer, "limit": self.limit,
                "stored": self.stored, "state": self.state, "error": self.error, "refused": self.refused,
                "reached_start": self.reached_start, "catch_up": self.until is not None}


class Service:
    """Everything the HTTP handlers need. Build with :meth:`open`."""

    def __init__(self, config: Config, store: AsyncStore, node: Federation, client: PeerClient,
                 recorder: Recorder | None) -> None:
        self.config = config
        self.store = store
        self.node = node
        self.client = client
        self.recorder = recorder
        self.jobs: dict[int, BackfillJob] = {}
        self.ops: Any = None  # the daemon's operator endpoints (shell.ops.Ops), set by the daemon
        self._peer_locks: dict[str, trio.Lock] = {}
        self._room_locks: dict[str, trio.Lock] = {}
        self._wake_outbox = trio.Event()
        #: What goes to which peer, in which order, when (the core decides; the outbox table mirrors it).
        self.delivery = Delivery()
        self._descriptor: tuple[KeyRing, bytes] | None = None  # see descriptor_json
        self._seen_written: dict[str, int] = {}  # peer -> when its last_seen was last written
        self._catch_ups: dict[str, BackfillJob] = {}  # room -> its catch-up, queued or running
        self._wake_catch_up = trio.Event()
        self._timer_changed = trio.Event()
        self._pool: ThreadPoolExecutor | None = None
        self.limits = Gate(limits_of(config), self.now)
        self._catch_up_slots: dict[str, trio.CapacityLimiter] = {}  # peer -> its catch-ups at once

    # -- construction -------------------------------------------------------------

    @classmethod
    async def open(cls, config: Config) -> "Service":
        """Open storage and restore the core's state from it."""
        store = await AsyncStore.open(config.data_dir)
        current, old = await store.load_keyring()
        keyring = KeyRing(
            current=SigningKey.from_seed(current["seed"], current["created_at"]) if current else None,
            old=tuple(OldKey(o["key_id"], o["public_key"], o["expired_at"]) for o in old),
        )
        policy = Policy.from_dict(await store.get_policy())
        # Signatures of a batch (a page, a transaction) are checked on a small
        # thread pool: pynacl releases the GIL while it verifies.
        pool = ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 2)), thread_name_prefix="scaiwave-verify")
        node = Federation(config.server_name, keyring=keyring, policy=policy,
                          refetch_interval_ms=config.key_refetch_interval_ms,
                          verifier=VerifyClock(threaded_verifier(pool)))
        client = PeerClient(ssl_context=client_ssl_context(config), resolve=config.resolve,
                            deadline=config.outbound_deadline_ms / 1000, per_peer=config.outbound_per_peer,
                            outbound_allow=config.outbound_allow)
        service = cls(config, store, node, client,
                      Recorder.open(config.record_path, config.server_name) if config.record_path else None)
        service._pool = pool
        now = service.now()
        for peer in await store.list_peers():
            if peer.get("descriptor"):
                node.keys.learn(peer["server_name"], peer["descriptor"].encode(), peer["descriptor_fetched_at"] or now)
        for _origin, nonce, expires in await store.live_nonces(now):
            node.requests.replay.remember(nonce, expires)
        await service._load_outbox()
        if service.recorder:
            # The state the core starts from, so a replay starts from it too:
            # policy, our public keys, peers' cached descriptors, live nonces.
            service.recorder.record("policy", now, policy=policy.as_dict())
            service.recorder.record("settings", now, refetch_interval_ms=config.key_refetch_interval_ms,
                                    skew_ms=node.requests.skew_ms)
            service.recorder.record("own_keys", now, public=node.descriptor(service.federation_endpoint))
            for peer in await store.list_peers():
                if peer.get("descriptor"):
                    service.recorder.record("descriptor", now, server=peer["server_name"],
                                            body=peer["descriptor"].encode(), cached=True,
                                            fetched_at=peer["descriptor_fetched_at"] or now)
            nonces = [[nonce, expires] for _origin, nonce, expires in await store.live_nonces(now)]
            if nonces:
                service.recorder.record("nonces", now, nonces=nonces)
        return service

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        await self.client.aclose()
        await self.store.close()
        if self.recorder:
            self.recorder.close()

    def now(self) -> int:
        """The daemon's clock in ms (shifted by the SCAIWAVE_CLOCK_OFFSET test setting)."""
        return time.time_ns() // 1_000_000 + self.config.clock_offset_ms

    @property
    def verify_clock(self) -> VerifyClock | None:
        """The timed verifier under the node's (the recording's decode/verify
        split), found through any wrappers (metrics count around it)."""
        verifier = self.node.batch_verifier
        while not isinstance(verifier, VerifyClock) and hasattr(verifier, "__wrapped__"):
            verifier = verifier.__wrapped__
        return verifier if isinstance(verifier, VerifyClock) else None

    def record(self, kind: str, **fields: Any) -> None:
        if self.recorder:
            self.recorder.record(kind, self.now(), **fields)

    # -- keys and policy ----------------------------------------------------------------

    async def _save_keyring(self, ring: KeyRing) -> None:
        cur = ring.current
        await self.store.save_keyring(
            {"key_id": cur.key_id, "seed": cur.seed, "public_key": cur.public_key, "created_at": cur.created_at,
             "expired_at": None} if cur else None,
            [{"key_id": o.key_id, "seed": None, "public_key": o.public_key, "created_at": None,
              "expired_at": o.expired_at} for o in ring.old],
        )
        self.node.keyring = ring
        self._descriptor = None
        self._timer_changed.set()
        self.record("own_keys", public=self.node.descriptor(self.federation_endpoint))

    async def generate_key(self) -> KeyRing:
        """``key generate``; raises LocalProtocolError if a key exists."""
        ring = self.node.keyring.generate(os.urandom(32), self.now())
        await self._save_keyring(ring)
        return ring

    async def rotate_key(self) -> KeyRing:
        """``key rotate``; raises LocalProtocolError without a key."""
        ring = self.node.keyring.rotate(os.urandom(32), self.now())
        await self._save_keyring(ring)
        log.info("federation key rotated: now %s", ring.current.key_id if ring.current else None)
        return ring

    async def set_policy(self, policy: Policy) -> None:
        await self.store.set_policy(policy.as_dict())
        self.node.policy = policy
        self.record("policy", policy=policy.as_dict())

    @property
    def federation_endpoint(self) -> str:
        return f"{self.config.public_base_url}/_scaiwave/federation/v1"

    # -- descriptors -------------------------------------------------------------------

    async def fetch_descriptor(self, server: str) -> bytes | Refused:
        """GET a server's descriptor over verified TLS (the raw bytes); at most as
        many at once as the limits allow (``rate_limited`` otherwise)."""
        refusal = self.limits.begin_fetch(server)
        if refusal is not None:
            log.info("descriptor fetch of %s not started: %s", server, refusal)
            return refusal
        try:
            data = await self.client.fetch_descriptor(server)
        except TransportError as exc:
            refusal = _refusal_of(exc)
            self.record("descriptor", server=server, error=refusal.as_dict())
            return refusal
        finally:
            self.limits.end_fetch(server)
        self.record("descriptor", server=server, body=data)
        return data

    async def learn_descriptor(self, server: str, *, force: bool = False, key_id: str | None = None) -> Refused | None:
        """Fetch and cache ``server``'s keys (respecting the core's rate limit unless forced)."""
        now = self.now()
        if not force:
            # Traffic never makes us fetch from a server our policy does not
            # admit (the core decides), nor more often than its rate limit.
            refusal = self.node.may_fetch_keys(server, now, key_id)
            if refusal is not None:
                return refusal
        busy = self.limits.fetch_refusal(server)
        if busy is not None:
            return busy  # before fetch_attempted: a fetch refused now may be tried again at once
        self.node.keys.fetch_attempted(server, now, key_id)
        log.info("fetching the descriptor of %s%s", server, f" (unknown key {key_id})" if key_id else "")
        data = await self.fetch_descriptor(server)
        if isinstance(data, Refused):
            await self.peer_error(server, data)
            return data
        entry = self.node.learn_descriptor(server, data, now)
        if isinstance(entry, Refused):
            await self.peer_error(server, entry)
            return entry
        await self.store.save_descriptor(server, data.decode(), now)
        await self.store.upsert_peer(server, key_id=entry.keys.key_id)
        return None

    # -- peer bookkeeping ----------------------------------------------------------------

    # -- facts the core's rules read ------------------------------------------------

    async def tenant_federates(self, tenant: str | None) -> bool:
        """The tenant's federation switch (``True`` for no tenant: rooms hosted elsewhere)."""
        return await self.store.run(lambda store: _federates(store, tenant))

    async def memberships(self, room_id: str) -> dict[str, str]:
        """The room's memberships as stored here: user id -> membership."""
        return _memberships(await self.store.members(room_id))

    async def room_view(self, room_id: str, tenant: str | None) -> tuple[dict[str, Any], RoomFacts, bool] | None:
        """A stored room, its facts and the federation switch of ``tenant`` (the
        caller's), read in one storage call (a client's post used to make
        five); None if there is no such room."""
        def read(store: Store) -> tuple[dict[str, Any], RoomFacts, bool] | None:
            room = store.get_room(room_id)
            if room is None:
                return None
            facts = _facts(store, room)
            return room, facts, facts.tenant_federates if tenant == room["tenant"] else _federates(store, tenant)

        return await self.store.run(read)

    async def local_party(self, user_id: str) -> Party | None:
        """What the rules know of one of our users, or ``None`` if there is no such user."""
        user = await self.store.get_user(user_id)
        if user is None:
            return None
        return Party(user["user_id"], user["tenant"], await self.tenant_federates(user["tenant"]))

    async def room_facts(self, room: dict[str, Any]) -> RoomFacts:
        """The facts of a stored room (see ``core.authz``), read in one storage call."""
        return await self.store.run(lambda store: _facts(store, room))

    async def peer_seen(self, server: str) -> None:
        """Record a good exchange with ``server`` (``last_seen``; clears its error).

        Written at most once a second per peer while nothing went wrong in
        between: each write is a durable commit, and a busy peer exchanges
        hundreds of requests a second. So ``last_seen`` is exact to a second."""
        now = self.now()
        written = self._seen_written.get(server)
        if written is not None and now - written < SEEN_RESOLUTION_MS:
            return
        if len(self._seen_written) >= 10_000:
            self._seen_written.clear()  # bounded, whoever authenticates
        await self.store.mark_seen(server, now)
        self._seen_written[server] = now

    async def peer_error(self, server: str, refusal: Refused) -> None:
        if server == self.config.server_name:
            return
        self._seen_written.pop(server, None)  # the next good exchange clears this error at once
        log.warning("peer %s: %s", server, refusal)
        peer = await self.store.get_peer(server)
        failures = (peer or {}).get("failures") or 0
        now = self.now()
        await self.store.mark_error(server, refusal.code.value, refusal.as_dict()["message"], now,
                                    now + backoff_ms(failures + 1))

    async def send(self, effect: SendRequest) -> tuple[int, bytes] | Refused:
        """Carry out a SendRequest; transport failures come back as refusals.
        ``last_seen``/``last_error`` follow the outcome."""
        headers = {"authorization": effect.authorization, "content-type": "application/cbor"}
        try:
            resp = await self.client.request(effect.destination, effect.method, effect.target,
                                             headers=headers, body=effect.body)
        except TransportError as exc:
            refusal = _refusal_of(exc)
            self.record("outbound", peer=effect.destination, method=effect.method, target=effect.target,
                        body=effect.body, error=refusal.as_dict())
            await self.peer_error(effect.destination, refusal)
            return refusal
        self.record("outbound", peer=effect.destination, method=effect.method, target=effect.target,
                    body=effect.body, status=resp.status, response=resp.body)
        if resp.status == 200:
            await self.peer_seen(effect.destination)
        else:
            await self.peer_error(effect.destination, decode_refusal(resp.status, resp.body))
        return resp.status, resp.body

    async def signed_request(self, peer: str, method: str, target: str, body: bytes) -> tuple[int, bytes] | Refused:
        auth = self.node.sign(destination=peer, method=method, target=target, body=body, now=self.now())
        if isinstance(auth, Refused):
            return auth
        return await self.send(SendRequest(peer, method, target, body, auth))

    # -- handshake -----------------------------------------------------------------

    async def handshake(self, peer: str) -> PeerAgreed | Refused:
        """Run the core's handshake initiator against ``peer``."""
        lock = self._peer_locks.setdefault(peer, trio.Lock())
        async with lock:
            machine = Initiator(server_name=self.config.server_name, peer=peer, keyring=self.node.keyring,
                                policy=self.node.policy, keys=self.node.keys, versions=self.node.versions)
            effects = machine.start(os.urandom(16))
            self.record("handshake_start", peer=peer, nonce=machine.nonce)
            while effects:
                effect = effects.pop(0)
                if isinstance(effect, FetchDescriptor):
                    now = self.now()
                    self.node.keys.fetch_attempted(effect.server, now)
                    data = await self.fetch_descriptor(effect.server)
                    if isinstance(data, Refused):
                        effects += machine.descriptor_failed(data)
                    else:
                        effects += machine.descriptor_received(data, now)
                        if machine.state != "failed":
                            await self.store.save_descriptor(peer, data.decode(), now)
                elif isinstance(effect, SendRequest):
                    result = await self.send(effect)
                    if isinstance(result, Refused):
                        effects += machine.reply_failed(result)
                    else:
                        effects += machine.reply_received(*result)
                elif isinstance(effect, PeerAgreed):
                    await self.store.upsert_peer(peer, state="active", protocol_version=effect.protocol_version,
                                                 key_id=effect.key_id)
                    await self.peer_seen(peer)
                    self.record("handshake_end", peer=peer, protocol_version=effect.protocol_version)
                    return effect
                elif isinstance(effect, Failed):
                    await self.peer_error(peer, effect.refusal)
                    self.record("handshake_end", peer=peer, error=effect.refusal.as_dict())
                    return effect.refusal
            refusal = Refused(Code.HANDSHAKE_FAILED, "handshake ended without an answer")
            self.record("handshake_end", peer=peer, error=refusal.as_dict())
            return refusal

    async def ensure_peered(self, peer: str) -> Refused | None:
        """Handshake with ``peer`` unless already active (and still admitted by policy)."""
        refusal = self.node.policy.admits(peer)
        if refusal is not None:
            return refusal
        row = await self.store.get_peer(peer)
        if row and row.get("state") == "active" and self.node.keys.get(peer) is not None:
            return None
        result = await self.handshake(peer)
        return result if isinstance(result, Refused) else None

    def room_lock(self, room_id: str) -> trio.Lock:
        """The lock of one room's chain: whoever reads its head, chains, stores and
        queues the event holds it, so concurrent writers never chain at one depth."""
        return self._room_locks.setdefault(room_id, trio.Lock())

    # -- pushing events to member servers -------------------------------------------------

    async def push_events(self, room_id: str, events: list[Event], *, exclude: str | None = None,
                          facts: RoomFacts | None = None, store: bool = False) -> None:
        """Queue chained events for every other server with joined members:
        durably, in one write (with ``store``, the events themselves go in
        that same write), then handed to the delivery machine, which the
        outbox worker drives. ``facts``: the room's, when the caller has them."""
        if facts is None:
            room = await self.store.get_room(room_id)
            if room is None:
                return
            facts = await self.room_facts(room)
        servers = [s for s in push_targets(facts, self.config.server_name) if s != exclude]
        now = self.now()
        envelopes = [e.envelope for e in events]
        body = encode_events_body(envelopes)
        # Outbox rows keep a unique name of their own; what goes on the wire is
        # named by the delivery machine (the hash of each transaction's body).
        tag = os.urandom(6).hex()
        items = [(server, f"{now}-{tag}-{n}", "/_scaiwave/federation/v1/send", body) for n, server in enumerate(servers)]
        if store:
            records = [e.as_record() for e in events]
            ids = await self.store.store_events_and_enqueue(room_id, records, items, now)
        elif items:
            ids = await self.store.enqueue_many(items, now)
        else:
            return
        for server, item_id in zip(servers, ids):
            self.delivery.handle_enqueue(server, item_id, envelopes)
        due = self.delivery.poll_timeout()
        if due is not None and due <= now:
            # Only when something can go now: a peer with a transaction in flight,
            # in backoff or paced is woken for by its answer or its time.
            self._wake_outbox.set()

    async def _load_outbox(self) -> None:
        """Hand the stored outbox to the delivery machine (at start, before serving)."""
        unreadable = []
        for row in await self.store.due(now=1 << 62, limit=1 << 40):
            decoded = decode_events_body(bytes(row["body"]))
            if isinstance(decoded, Refused):
                log.warning("outbox entry %s for %s is unreadable, dropped: %s", row["id"], row["peer"], decoded)
                unreadable.append(row["id"])
                continue
            self.delivery.handle_enqueue(row["peer"], row["id"], decoded[0], attempts=row.get("attempts") or 0,
                                         retry_at=row["next_attempt_at"])
        await self.store.delivered_many(unreadable)

    def peer_inbound(self, server: str) -> None:
        """A request from ``server`` verified: it is up, so a delivery waiting
        on its backoff goes now (the core decides)."""
        if self.delivery.handle_inbound(server, self.now()):
            self._wake_outbox.set()

    async def outbox_worker(self) -> None:
        """Send what the delivery machine says, when it says: one transaction
        in flight per peer, peers side by side. Each answer goes back to the
        machine, and the next batch goes out at once while the outbox rows
        of the last one are removed."""
        async with trio.open_nursery() as nursery:
            while True:
                now = self.now()
                while (txn := self.delivery.poll_transmit(now)) is not None:
                    nursery.start_soon(self._transmit, txn, nursery)
                due = self.delivery.poll_timeout()
                delay = OUTBOX_IDLE_S if due is None else min(OUTBOX_IDLE_S, max(0.0, (due - now) / 1000))
                with trio.move_on_after(delay):
                    await self._wake_outbox.wait()
                self._wake_outbox = trio.Event()

    async def _transmit(self, txn: SendTransaction, nursery: trio.Nursery) -> None:
        try:
            result = await self.signed_request(txn.peer, "PUT", txn.target, txn.body)
        except Exception as exc:  # a storage failure recording the outcome, say
            # The machine must hear an answer, or the peer's queue waits for ever:
            # an internal error is one of the moment, so the batch is retried.
            log.exception("delivery to %s failed", txn.peer)
            result = Refused(Code.INTERNAL_ERROR, f"delivery failed here: {type(exc).__name__}")
        self.delivery.handle_result(txn.peer, txn.txn_id, result, self.now())
        self._wake_outbox.set()  # the peer's next batch goes now, while we update the outbox
        while (event := self.delivery.poll()) is not None:
            try:
                if isinstance(event, Delivered):
                    await self.store.delivered_many(event.item_ids)
                elif isinstance(event, Dropped):
                    # send() has already put the refusal in the peer's last_error.
                    log.warning("transaction to %s refused, dropped: %s", event.peer, event.refusal)
                    await self.store.delivered_many(event.item_ids)
                elif isinstance(event, Deferred):
                    await self.store.mark_attempt(event.item_id, event.retry_at)
                elif isinstance(event, Rehandshake):
                    nursery.start_soon(self._rehandshake, event.peer)
            except StorageError as exc:
                # The machine has moved on; the outbox row catches up at the next
                # start (a delivered item sent again is a duplicate the peer skips).
                log.warning("outbox of %s not updated: %s", event.peer, exc)

    async def _rehandshake(self, peer: str) -> None:
        """The peer lost our peering (a restored backup, say): peer again, then retry at once."""
        if not isinstance(await self.handshake(peer), Refused):
            self.peer_inbound(peer)

    async def retry_now(self, peer: str) -> int:
        count = await self.store.reset_retry(peer, self.now())
        self.delivery.retry_now(peer, self.now())
        self._wake_outbox.set()
        return count

    # -- catching up: a member server that missed events fills the gap -----------------

    def request_catch_up(self, room_id: str, host: str, head: Head) -> None:
        """A chained event arrived above a gap over our ``head``: pull the
        missing events from the room's host (once per room at a time)."""
        if room_id in self._catch_ups:
            return
        job = BackfillJob(id=len(self.jobs) + 1, room_id=room_id, peer=host, limit=MAX_PULL,
                          until=(head.depth, head.event_id))
        self.jobs[job.id] = job
        self._catch_ups[room_id] = job
        log.info("%s: events missing above depth %s; catching up from %s (job %s)", room_id, head.depth, host, job.id)
        self._wake_catch_up.set()

    async def catch_up_worker(self) -> None:
        """Run requested catch-ups side by side, at most ``catch_ups_per_peer``
        from one host at once (the daemon starts this): a host that trickles
        its pages holds up only its own rooms, never another host's."""
        started: set[int] = set()
        async with trio.open_nursery() as nursery:
            while True:
                await self._wake_catch_up.wait()
                self._wake_catch_up = trio.Event()
                for job in list(self._catch_ups.values()):
                    if job.id not in started:
                        started.add(job.id)
                        nursery.start_soon(self._catch_up, job, started)

    async def _catch_up(self, job: BackfillJob, started: set[int]) -> None:
        slots = self._catch_up_slots.setdefault(job.peer, trio.CapacityLimiter(self.config.catch_ups_per_peer))
        try:
            async with slots:
                # Descriptor fetches this pull causes are charged to the host.
                fetch_cause.set(job.peer)
                await self._run_backfill(job)
        finally:
            self._catch_ups.pop(job.room_id, None)
            started.discard(job.id)
            if not slots.borrowed_tokens and slots.statistics().tasks_waiting == 0:
                self._catch_up_slots.pop(job.peer, None)

    # -- backfill ------------------------------------------------------------------

    def start_backfill(self, nursery: trio.Nursery, room_id: str, peer: str, limit: int) -> BackfillJob:
        job = BackfillJob(id=len(self.jobs) + 1, room_id=room_id, peer=peer, limit=limit)
        self.jobs[job.id] = job
        nursery.start_soon(self._run_backfill, job)
        return job

    async def _run_backfill(self, job: BackfillJob) -> None:
        try:
            await self._backfill(job)
        except StorageError as exc:
            # A page the store refuses (say a host that chained one proposal twice:
            # core/proposals.py): the pull stops there; what was stored stays.
            log.warning("backfill %s stopped: %s", job.id, exc)
            code = Code.CONFLICT if exc.code == "conflict" else Code.INTERNAL_ERROR
            job.state, job.error = "failed", Refused(code, str(exc)[:200]).as_dict()
        except Exception as exc:  # an unexpected failure must not kill the daemon
            log.exception("backfill %s failed", job.id)
            job.state, job.error = "failed", {"code": "internal_error", "message": str(exc)[:200]}
        finally:
            job.done.set()

    async def _backfill(self, job: BackfillJob) -> None:
        key = self.node.keyring.current
        if key is None:
            job.state, job.error = "failed", Refused(Code.OWN_KEY_MISSING).as_dict()
            return
        refusal = await self.ensure_peered(job.peer)
        if refusal is not None:
            job.state, job.error = "failed", refusal.as_dict()
            return
        saved = None if job.until is not None else await self.store.get_cursor(job.room_id, job.peer)
        if job.until is not None:
            puller = BackfillPuller(server_name=self.config.server_name, room_id=job.room_id, peer=job.peer,
                                    key=key, keys=self.node.keys, limit=job.limit, until=job.until,
                                    verifier=self.node.batch_verifier, lookup=self.node.lookup)
        elif saved is not None:
            puller = BackfillPuller.resume(saved["cursor"], server_name=self.config.server_name, key=key,
                                           keys=self.node.keys, verifier=self.node.batch_verifier, lookup=self.node.lookup)
            if puller.done is not None or puller.limit != job.limit:
                saved = None
        if saved is None and job.until is None:
            lowest = await self.store.events_after(job.room_id, None, 1)
            anchor = None
            if lowest:
                event = self.node_event(lowest[0]["envelope"])
                anchor = (event.depth, event.prev)
            puller = BackfillPuller(server_name=self.config.server_name, room_id=job.room_id, peer=job.peer,
                                    key=key, keys=self.node.keys, limit=job.limit, anchor=anchor,
                                    verifier=self.node.batch_verifier, lookup=self.node.lookup)
        self.record("backfill_start", room_id=job.room_id, peer=job.peer, limit=job.limit,
                    cursor=puller.cursor())
        base = puller.stored
        refused: StorageError | None = None
        async with trio.open_nursery() as nursery:
            try:
                await self._pull(job, puller, base, nursery)
            except StorageError as exc:
                refused = exc  # raised below, not wrapped in the nursery's exception group
            finally:
                nursery.cancel_scope.cancel()  # a page asked for ahead and not needed
        if refused is not None:
            raise refused

    async def _pull(self, job: BackfillJob, puller: BackfillPuller, base: int, nursery: trio.Nursery) -> None:
        """Drive the puller. Fetching, verifying and storing overlap: as a page
        arrives the puller names the page after it (``prefetch``), which is
        requested at once; the page is verified on a worker thread (its
        signatures on the verify pool, as always) while the page before it is
        stored (one durable write with its cursor, in page order)."""
        effects = puller.start(self.now())
        pages = PageTimer(self.verify_clock, self.record, puller)
        ahead: _Ahead | None = None
        pending: _PageStore | None = None  # the last page's events, stored while the next is verified
        while effects:
            effect = effects.pop(0)
            if not isinstance(effect, (SendRequest, StoreEvents)) or job.until is not None:
                pending = await self._store_now(pending)
            if isinstance(effect, SendRequest):
                if ahead is not None and ahead.request is effect:
                    result = await ahead.result()
                else:
                    if ahead is not None:
                        ahead.scope.cancel()  # the guess was wrong: its answer is not wanted
                    result = await self.send(effect)
                ahead = None
                if isinstance(result, Refused):
                    pending = await self._store_now(pending)
                    pages.flush()
                    effects += puller.fail(result)
                    continue
                guess = puller.prefetch(*result, self.now())
                if guess is not None:
                    ahead = _Ahead(guess)
                    nursery.start_soon(ahead.run, self.send)
                work = Work(stored=0)
                more = await trio.to_thread.run_sync(work.core, self.verify_clock, puller.page_received,
                                                     *result, self.now())
                pending = await self._store_now(pending)  # (under way since the page was checked)
                pages.begin(work)  # the last page's record, its store included
                effects += more
            elif isinstance(effect, StoreEvents) and job.until is None:
                pending = _PageStore(job, effect, pages.page, puller.stored, base, self.now())
                nursery.start_soon(pending.run, self.store)  # while the next page comes and is checked
                if not (effects and isinstance(effects[0], SendRequest)):
                    pending = await self._store_now(pending)  # no next page to overlap with
            elif isinstance(effect, StoreEvents) and job.until is not None:
                # The whole gap at once, and only onto the head it was pulled for.
                async with self.room_lock(job.room_id):
                    head = await self.head_of(job.room_id)
                    if head is not None and (head.depth, head.event_id) == job.until:
                        started = Work.store_started()
                        await self.store.store_events(job.room_id, [e.as_record() for e in effect.events])
                        pages.stored(started, len(effect.events))
                        job.stored = len(effect.events)
            elif isinstance(effect, NeedKeys):
                # Another pull may be fetching the same descriptor (catch-ups run side
                # by side): its answer is ours too.
                await self.limits.fetch_settled(effect.server)
                keys = self.node.lookup(effect.server)
                if keys is None or effect.key_id is None or not keys.knows(effect.key_id):
                    await self.learn_descriptor(effect.server, key_id=effect.key_id)
                effects += pages.more(puller.keys_updated, self.now())
            elif isinstance(effect, Failed):
                await self.peer_error(effect.server, effect.refusal)
            elif isinstance(effect, BackfillDone):
                pages.flush()
                log.info("backfill of %s from %s: %s events stored%s", job.room_id, job.peer, puller.stored - base,
                         f", stopped: {effect.refusal}" if effect.refusal else "")
                self.record("backfill_end", room_id=job.room_id, peer=job.peer, stored=effect.stored,
                            reached_start=effect.reached_start,
                            error=effect.refusal.as_dict() if effect.refusal else None)
                job.reached_start = effect.reached_start
                job.refused = [{"position": pos, **r.as_dict()} for pos, r in puller.refusals]
                if effect.refusal is not None:
                    job.state, job.error = "failed", effect.refusal.as_dict()
                else:
                    job.state = "done"
                    if job.until is None:
                        await self.store.clear_cursor(job.room_id, job.peer)
                return

    async def _store_now(self, pending: _PageStore | None) -> None:
        """Finish a page's store (if not done yet) and raise what it met."""
        if pending is not None:
            await pending.run(self.store)
            if pending.failure is not None:
                raise pending.failure

    def node_event(self, envelope: bytes) -> Event:
        """Decode an envelope from our own storage (already verified when stored)."""
        from scaiwave_federation.core import decode_event

        event = decode_event(envelope)
        assert isinstance(event, Event), event
        return event

    async def head_of(self, room_id: str) -> Head | None:
        row = await self.store.head(room_id)
        return Head(row["depth"], row["event_id"]) if row else None

    # -- timers ------------------------------------------------------------------------

    async def timer_loop(self) -> None:
        """The core's timers: yearly key rotation and the replay window's expiry."""
        while True:
            timers = self.node.timers()
            wake = min(timers.values(), default=None)
            delay = 60.0 if wake is None else max(0.0, min(60.0, (wake - self.now()) / 1000))
            with trio.move_on_after(delay):
                await self._timer_changed.wait()
            self._timer_changed = trio.Event()
            now = self.now()
            for action in self.node.handle_timer(now):
                if action == "rotate_key":
                    await self.rotate_key()
            await self.store.expire_nonces(now)


class _PageStore:
    """One backfill page's events and cursor, stored in one write (see ``Service._pull``)."""

    def __init__(self, job: BackfillJob, effect: StoreEvents, work: Work | None, stored: int, base: int,
                 now: int) -> None:
        self.job, self.effect, self.work, self.stored, self.base, self.now = job, effect, work, stored, base, now
        self.failure: StorageError | None = None
        self._started = False
        self._done = trio.Event()

    async def run(self, store: AsyncStore) -> None:
        """Store it once; a second call waits for the first."""
        if self._started:
            await self._done.wait()
            return
        self._started = True
        try:
            started = Work.store_started()
            await store.store_events(
                self.job.room_id, [e.as_record() for e in self.effect.events],
                cursor={"peer": self.job.peer, "cursor": self.effect.cursor, "stored": self.stored,
                        "updated_at": self.now})
            if self.work is not None:
                self.work.store_done(started, len(self.effect.events))
            self.job.stored = self.stored - self.base
        except StorageError as exc:
            self.failure = exc  # raised by whoever waits for it (not in a nursery's group)
        finally:
            self._done.set()


class _Ahead:
    """A page requested ahead (see ``Service._pull``): its answer, when it comes."""

    def __init__(self, request: SendRequest) -> None:
        self.request = request
        self.scope = trio.CancelScope()
        self._done = trio.Event()
        self._result: tuple[int, bytes] | Refused = Refused(Code.PEER_UNREACHABLE, "the request was not sent")

    async def run(self, send: Any) -> None:
        with self.scope:
            self._result = await send(self.request)
        self._done.set()

    async def result(self) -> tuple[int, bytes] | Refused:
        await self._done.wait()
        return self._result


def _federates(store: Store, tenant: str | None) -> bool:
    row = store.get_tenant(tenant) if tenant else None
    return bool(row["federation_enabled"]) if row else True


def _facts(store: Store, room: dict[str, Any]) -> RoomFacts:
    return RoomFacts(room["room_id"], room["room_type"], room["tenant"], _federates(store, room["tenant"]),
                     _memberships(store.members(room["room_id"])))


def _memberships(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {m["user_id"]: m["membership"] for m in rows}


def describe_keyring(ring: KeyRing) -> dict[str, Any]:
    """The admin view of our keys (no private material)."""
    from scaiwave_federation.core.wire import b64e

    cur = ring.current
    return {
        "key_id": cur.key_id if cur else None,
        "public_key": b64e(cur.public_key) if cur else "",
        "created_at": cur.created_at if cur else None,
        "rotation_due_at": ring.rotation_due_at(),
        "old_keys": [{"key_id": o.key_id, "public_key": b64e(o.public_key), "expired_at": o.expired_at}
                     for o in ring.old],
    }


def descriptor_json(service: Service) -> bytes:
    """``/.well-known/scaiwave``'s bytes. Signing and encoding them took about
    15% of the daemon's time per request; they change only with the key ring
    (a generate, a rotation), so they are cached on the ring: a new ring is a
    new object (``KeyRing`` is immutable), and the cache follows it."""
    ring = service.node.keyring
    cached = service._descriptor
    if cached is None or cached[0] is not ring:
        data = json.dumps(service.node.descriptor(service.federation_endpoint), indent=2).encode()
        cached = service._descriptor = (ring, data)
    return cached[1]
