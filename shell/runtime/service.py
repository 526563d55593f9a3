"""The daemon's federation service: carries out the core's effects.

It owns the running state that ties the core to the world: the
:class:`~scaiwave_federation.core.Federation` node, storage, the outbound
client, the clock and the recorder. It makes no protocol decision: it asks the
core, then fetches, sends and stores what the core says. Delivery to peers
(:mod:`.outbox`) and backfill jobs (:mod:`.backfill_jobs`) are its mixins.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import trio

from scaiwave_federation.core import (
    Code,
    Event,
    Failed,
    Federation,
    FetchDescriptor,
    Head,
    Initiator,
    KeyRing,
    KeyRotated,
    Party,
    PeerAgreed,
    Policy,
    Refused,
    RoomFacts,
    SendRequest,
    SigningKey,
)
from scaiwave_federation.core import Delivery
from scaiwave_federation.core import answer
from scaiwave_federation.core import RoomState, TxnSnapshot, held_needed, proposals_needed, rooms_needed
from scaiwave_federation.core import decode_refusal
from scaiwave_federation.core import OldKey
from scaiwave_federation.core import TIMERS

from ..http.client import PeerClient, TransportError, backoff_ms
from ..config import Config, client_ssl_context
from ..http.limits import Gate, limits_of
from ..recorder import Recorder
from ..store.async_store import AsyncStore
from ..store.store import Store, StorageError
from .timings import VerifyClock
from .verify_pool import threaded_verifier
from .context import Ctx
from .outbox import Outbox
from .backfill_jobs import BackfillJob, BackfillJobs
from .workers import Workers, new_worker_id
from ..store.lease_rows import briefly

log = logging.getLogger("scaiwave.service")

__all__ = ["Service", "BackfillJob"]

#: ``last_seen`` is written at most this often per peer (see Service.peer_seen).
SEEN_RESOLUTION_MS = 1000
#: Backfill jobs' views are kept this long after their last change (the admin API's answer).
JOBS_KEPT_MS = 7 * 86_400_000
#: How long a background loop waits after a full or failing disk before it tries again.
STORAGE_RETRY_S = 1.0


def _refusal_of(exc: TransportError) -> Refused:
    try:
        return Refused(Code(exc.code), exc.message)
    except ValueError:
        return Refused(Code.PEER_UNREACHABLE, exc.message)


class Service(Outbox, BackfillJobs, Workers):
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
        self._send_locks: dict[str, trio.Lock] = {}
        #: Held by whoever reads the policy to change it (a one-entry edit), so
        #: two admins' edits never lose one another.
        self.policy_lock = trio.Lock()
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
        self._init_workers(new_worker_id())
        #: What the handlers are given (shell/api: no reaching through the service).
        self.ctx = Ctx(store=store, node=node, now=self.now, server_name=config.server_name, runtime=self)

    # -- construction -------------------------------------------------------------

    @classmethod
    async def open(cls, config: Config) -> "Service":
        """Open storage and restore the core's state from it."""
        store = await AsyncStore.open(config.database)
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
        # This worker's leases, then a first look: the peers with queued rows
        # that no live worker delivers to are this worker's, their queues loaded.
        await service.start_worker()
        await service.look()
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
        await self.stop_worker()
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

    async def _save_keyring(self, ring: KeyRing, *, expect: int | None = None) -> None:
        """Store ``ring`` (and tell the other workers: the shared generation);
        with ``expect``, only if nothing changed since generation ``expect``
        (raises StorageError ``conflict`` otherwise)."""
        cur = ring.current
        current = {"key_id": cur.key_id, "seed": cur.seed, "public_key": cur.public_key,
                   "created_at": cur.created_at, "expired_at": None} if cur else None
        old = [{"key_id": o.key_id, "seed": None, "public_key": o.public_key, "created_at": None,
                "expired_at": o.expired_at} for o in ring.old]
        await self.shared_change(lambda store: store.save_keyring(current, old), expect=expect)
        self.node.keyring = ring
        self._descriptor = None
        self._timer_changed.set()
        self.record("own_keys", public=self.node.descriptor(self.federation_endpoint))

    async def generate_key(self) -> KeyRing:
        """``key generate``; raises LocalProtocolError if a key exists."""
        await self.refresh_shared()
        ring = self.node.keyring.generate(os.urandom(32), self.now())
        await self._save_keyring(ring)
        return ring

    async def rotate_key(self) -> KeyRing:
        """``key rotate``; raises LocalProtocolError without a key."""
        await self.refresh_shared()
        ring = self.node.keyring.rotate(os.urandom(32), self.now())
        await self._save_keyring(ring)
        log.info("federation key rotated: now %s", ring.current.key_id if ring.current else None)
        return ring

    async def set_policy(self, policy: Policy) -> None:
        await self.shared_change(lambda store: store.set_policy(policy.as_dict()))
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
        if not force and not self.alone() and await self._shared_descriptor(server, key_id):
            return None
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

    async def _shared_descriptor(self, server: str, key_id: str | None) -> bool:
        """Another worker's copy: a descriptor of ``server`` that a worker on
        this database fetched later than ours, learned from the database
        instead of the network. True if it has ``key_id`` (or any, for None)."""
        row = await self.store.get_peer(server)
        if not row or not row.get("descriptor") or row.get("descriptor_fetched_at") is None:
            return False
        cached = self.node.keys.get(server)
        if cached is not None and cached.fetched_at >= row["descriptor_fetched_at"]:
            return False
        entry = self.node.learn_descriptor(server, row["descriptor"].encode(), row["descriptor_fetched_at"])
        return not isinstance(entry, Refused) and (key_id is None or entry.keys.knows(key_id))

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
        return await self.store.run(lambda store: room_view_in(store, room_id, tenant))

    async def local_party(self, user_id: str) -> Party | None:
        """What the rules know of one of our users, or ``None`` if there is no
        such user or it is deactivated (nobody can invite it or act as it)."""
        user = await self.store.get_user(user_id)
        if user is None or user.get("deactivated_at") is not None:
            return None
        return Party(user["user_id"], user["tenant"], await self.tenant_federates(user["tenant"]))

    async def room_facts(self, room: dict[str, Any]) -> RoomFacts:
        """The facts of a stored room (see ``core.authz``), read in one storage call."""
        return await self.store.run(lambda store: _facts(store, room))

    async def txn_snapshot(self, results: list[Any]) -> TxnSnapshot:
        """The stored state a transaction's decision reads (core.inbound says which)."""
        rooms: dict[str, RoomState] = {}
        for room_id in rooms_needed(results):
            row = await self.store.get_room(room_id)
            if row is None:
                rooms[room_id] = RoomState(known=False)
                continue
            hosted = row["host"] == self.config.server_name
            facts = await self.room_facts(row) if hosted else None
            rooms[room_id] = RoomState(
                known=True, host=row["host"], head=await self.head_of(room_id),
                room_type=row["room_type"] if hosted else None,
                tenant_federates=facts.tenant_federates if facts else True,
                members=dict(facts.members) if facts else {})
        held = {}
        for room_id, depth, text in held_needed(results, rooms):
            row = await self.store.event_at(room_id, depth)
            held[text] = row["event_id"] if row else None
        chained = {(room_id, pid): await self.store.proposal_chained(room_id, pid)
                   for room_id, pid in proposals_needed(results)}
        return TxnSnapshot(rooms, held, chained)

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
        try:
            await self.store.mark_seen(server, now)
        except StorageError as exc:  # bookkeeping: the traffic itself went through
            if exc.code != "unavailable":
                raise
            return
        self._seen_written[server] = now

    async def peer_error(self, server: str, refusal: Refused) -> None:
        """Record a failure of traffic with ``server`` in its ``last_error``;
        a refusal about what we asked (``not_found`` for a room id that does
        not exist, say) is no failure of the link and is not recorded."""
        if server == self.config.server_name or refusal.about_the_request:
            return
        self._seen_written.pop(server, None)  # the next good exchange clears this error at once
        log.warning("peer %s: %s", server, refusal)
        try:
            peer = await self.store.get_peer(server)
            failures = (peer or {}).get("failures") or 0
            now = self.now()
            await self.store.mark_error(server, refusal.code.value, refusal.as_dict()["message"], now,
                                        now + backoff_ms(failures + 1))
        except StorageError as exc:  # bookkeeping: the caller still gets the refusal
            if exc.code != "unavailable":
                raise

    async def keep_running(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Run a background loop (outbox, timers) through storage faults: a full
        or failing disk stops it for ``STORAGE_RETRY_S``, then it starts over from
        what the database holds (nothing acknowledged is only in memory), so it
        catches up once space returns. A row that went away under the loop
        (``not_found``: the admin forgot a peer whose transaction was being
        delivered) also starts it over. Any other failure still propagates."""
        while True:
            try:
                return await loop()
            except StorageError as exc:
                if exc.code not in ("unavailable", "not_found"):
                    raise
                log.warning("%s paused: %s (retrying in %g s)", loop.__name__, exc, STORAGE_RETRY_S)
                await trio.sleep(STORAGE_RETRY_S)

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
        answered: Refused | None = None if resp.status == 200 else decode_refusal(resp.status, resp.body)
        if answered is None or answered.about_the_request:  # the peer read and answered us: the link works
            await self.peer_seen(effect.destination)
        else:
            await self.peer_error(effect.destination, answered)
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
                    effects += answer(machine, effect, data, now)
                    if isinstance(data, bytes) and machine.state != "failed":
                        await self.store.save_descriptor(peer, data.decode(), now)
                elif isinstance(effect, SendRequest):
                    effects += answer(machine, effect, await self.send(effect), self.now())
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

    def send_lock(self, user_id: str) -> trio.Lock:
        """One user's idempotent sends (``PUT .../send/{txn_id}``) one at a time,
        so a retry racing its first try still finds the first answer."""
        return self._send_locks.setdefault(user_id, trio.Lock())

    def room_lock(self, room_id: str) -> trio.Lock:
        """The lock of one room's chain: whoever reads its head, chains, stores and
        queues the event holds it, so concurrent writers never chain at one depth."""
        return self._room_locks.setdefault(room_id, trio.Lock())

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
            wake = self.node.poll_timeout()
            delay = 60.0 if wake is None else max(0.0, min(60.0, (wake - self.now()) / 1000))
            singleton = self.leases.holds(TIMERS, self.now())
            if not singleton:
                # Another worker runs the jobs that run once; this one only
                # forgets its own expired nonces, and looks again after a lease.
                delay = max(delay, self.config.lease_ms / 3000)
            with trio.move_on_after(delay):
                await self._timer_changed.wait()
            self._timer_changed = trio.Event()
            now = self.now()
            singleton = self.leases.holds(TIMERS, now)  # core.leases decides who runs them
            if singleton:
                await self.refresh_shared()  # a ring another worker rotated meanwhile
            generation = self._generation
            # The core fires what is due; a rotation hands back the new key ring
            # (made from the seed we draw: the core draws no randomness).
            for effect in self.node.handle_timeout(now, seed=os.urandom(32), singleton=singleton):
                if isinstance(effect, KeyRotated):
                    try:
                        await self._save_keyring(effect.keyring, expect=generation)
                    except StorageError as exc:
                        if exc.code != "conflict":
                            raise
                        log.info("key rotation left to the worker that changed the key ring first")
                        self._generation = None
                        await self.refresh_shared()
                        continue
                    log.info("federation key rotated on schedule: now %s", effect.keyring.current.key_id)
            if singleton:
                # Housekeeping: it waits at most a second for another process's
                # write lock (then the loop tries again), not the requests behind it.
                await self.store.run(lambda store, now=now: briefly(store, lambda: (
                    store.expire_nonces(now), store.prune_jobs(now - JOBS_KEPT_MS))))


def room_view_in(store: Store, room_id: str, tenant: str | None) -> tuple[dict[str, Any], RoomFacts, bool] | None:
    """:meth:`Service.room_view`'s reads, on the storage thread (for a call that reads more)."""
    room = store.get_room(room_id)
    if room is None:
        return None
    facts = _facts(store, room)
    return room, facts, facts.tenant_federates if tenant == room["tenant"] else _federates(store, tenant)


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
    from scaiwave_federation.core import b64e

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
