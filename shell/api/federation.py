"""Inbound federation endpoints: ``/_scaiwave/federation/v1/*`` (CBOR bodies).

Each request: the core routes it, authenticates it (fetching the origin's
descriptor when the core asks), then decides; this module reads the state the
decision needs from storage, stores what the core accepted (before replying),
and records the exchange.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from scaiwave_federation.core import Authenticated, Code, Event, NeedKeys, Refused, RoomFacts, answer
from scaiwave_federation.core import build_page
from scaiwave_federation.core import PAGE_BYTES
from scaiwave_federation.core import snapshot_context
from scaiwave_federation.core import invitee_of
from scaiwave_federation.core import INVITE_ACCEPTED

from ..runtime import timings
from ..http.errors import cbor_error
from ..http.server import Request, Response
from ..runtime.context import Ctx
from ..runtime.service import room_view_in
from ..store.store import StorageError, Store

log = logging.getLogger("scaiwave.federation")

__all__ = ["handle_federation"]

#: How often a transaction is decided again when another worker chained in
#: its rooms first (a fork from the host itself fails every time).
_CHAIN_ATTEMPTS = 5


async def handle_federation(ctx: Ctx, request: Request) -> Response:
    """Serve one federation request and record it."""
    context: dict[str, Any] = {}
    received_at = ctx.now()
    with ctx.runtime.limits.inbound(request.header("authorization")) as limited:
        if limited is not None:
            # Refused before anything else (no key fetch, no storage): not recorded,
            # since it reached no decision a replay could make again.
            return cbor_error(limited)
        work = timings.begin()
        started = work.store_started()
        response = await _handle(ctx, request, context)
    ctx.runtime.record("inbound", method=request.method, target=request.target,
                   authorization=request.header("authorization"), body=request.body, context=context,
                   status=response.status, response=response.body, received_at=received_at,
                   timings={**work.fields(), "total_us": (work.store_started() - started) // 1000},
                   **({} if work.stored is None else {"stored": work.stored}))
    return response


async def _handle(ctx: Ctx, request: Request, context: dict[str, Any]) -> Response:
    node = ctx.node
    # The core routes and authenticates, admitting the *claimed* origin by
    # policy before any descriptor fetch: a stranger's request leaves no trace
    # but its refusal. Its one effect, NeedKeys, is a fetch of the origin's keys.
    inbound = node.receive(method=request.method, target=request.target,
                           authorization=request.header("authorization"), body=request.body)
    effects = inbound.start(ctx.now())
    while effects:
        need = effects.pop(0)
        assert isinstance(need, NeedKeys), need
        failure = await ctx.runtime.learn_descriptor(need.server, key_id=need.key_id)
        effects += answer(inbound, need, failure, ctx.now())
    route, auth = inbound.route, inbound.auth
    if route is None or auth is None:
        undecided = inbound.refusal or Refused(Code.INTERNAL_ERROR, "the request was not decided")
        if route is not None:
            log.info("refused %s %s: %s", request.method, request.path[:120], undecided)
        return cbor_error(undecided)
    # The nonce is remembered and what the request needs read in one storage
    # call: the peer's row, and for a backfill page the room and its facts.
    backfill_room = route.param or "" if route.endpoint == "backfill" else None

    def remember_and_read(store: Store) -> tuple[bool, dict[str, Any] | None, Any]:
        fresh = store.remember_nonce(auth.origin, auth.nonce, auth.nonce_expires_at)
        if route.endpoint == "handshake" or not fresh:
            return fresh, None, None
        view = room_view_in(store, backfill_room, None) if backfill_room is not None else None
        return fresh, store.get_peer(auth.origin), view

    fresh, peer, view = await ctx.store.run(remember_and_read)
    # The database's replay window is the authority (workers share it): a
    # request another worker received already is refused here too.
    replayed = node.nonce_stored(fresh)
    if replayed is not None:
        log.info("refused %s %s: %s", request.method, request.path[:120], replayed)
        return cbor_error(replayed)
    await ctx.runtime.peer_seen(auth.origin)
    ctx.runtime.peer_inbound(auth.origin)
    if route.endpoint == "handshake":
        return await _handshake(ctx, auth, request)
    context["peered"] = bool(peer and peer.get("state") == "active")
    refusal = node.admit(auth, peered=context["peered"])
    if refusal is not None:
        return cbor_error(refusal)
    if route.endpoint == "invite":
        return await _invite(ctx, auth, route.param or "", request, context)
    if route.endpoint == "send":
        return await _send(ctx, auth, route.param or "", request, context)
    return await _backfill(ctx, auth, route.param or "", request, context, view)


async def _handshake(ctx: Ctx, auth: Authenticated, request: Request) -> Response:
    result = ctx.node.on_handshake(auth, request.body)
    if isinstance(result, Refused):
        await ctx.runtime.peer_error(auth.origin, result)
        return cbor_error(result)
    reply, agreed = result
    log.info("peered with %s at its request (%s)", auth.origin, agreed.protocol_version)
    await ctx.store.upsert_peer(auth.origin, state="active", protocol_version=agreed.protocol_version,
                                    key_id=agreed.key_id)
    return Response.cbor(200, reply)


async def _invite(ctx: Ctx, auth: Authenticated, room_id: str, request: Request,
                  context: dict[str, Any]) -> Response:
    # The decision needs what we know of the claimed invitee: look it up first.
    invitee = invitee_of(request.body)
    party = await ctx.runtime.local_party(invitee) if invitee else None
    local_users = {party.user_id: {"tenant_federates": party.tenant_federates}} if party else {}
    members = await ctx.runtime.memberships(room_id)
    context["local_users"], context["members"] = local_users, members
    decision = ctx.node.on_invite(auth, room_id, request.body, members=members,
                                      local_user=lambda user: party if party and user == party.user_id else None)
    if isinstance(decision, Refused):
        return cbor_error(decision)
    if await ctx.store.get_room(room_id) is None:
        await ctx.store.create_room(room_id=room_id, room_type=decision.room_type, host=auth.origin,
                                        tenant=None, creator=decision.inviter, created_at=ctx.now())
    await ctx.store.save_invite(room_id=room_id, user_id=decision.invitee, inviter=decision.inviter,
                                    origin=auth.origin, room_type=decision.room_type, state="pending",
                                    payload=decision.event.envelope, created_at=ctx.now())
    await ctx.store.set_membership(room_id, decision.invitee, "invite")
    return Response.cbor(200, INVITE_ACCEPTED)


async def _send(ctx: Ctx, auth: Authenticated, txn_id: str, request: Request,
                context: dict[str, Any]) -> Response:
    stored = await ctx.store.get_txn_response(auth.origin, txn_id)
    if stored is not None:
        context["replayed_txn"] = True
        return Response.cbor(200, stored)
    results = timings.current().core(ctx.runtime.verify_clock, ctx.node.on_events, auth, request.body)
    if isinstance(results, Refused):
        return cbor_error(results)
    # One writer per room chain (see Service.room_lock), taken in a fixed order
    # so that two transactions never wait on each other.
    async with contextlib.AsyncExitStack() as locks:
        for room_id in sorted({r.room_id for r in results if isinstance(r, Event)}):
            await locks.enter_async_context(ctx.runtime.room_lock(room_id))
        for attempt in range(_CHAIN_ATTEMPTS):
            try:
                return await _apply(ctx, auth, txn_id, results, context)
            except StorageError as exc:
                # Another worker chained in one of these rooms meanwhile (the
                # room lock is per process): decide again on the new heads.
                # Nothing of the failed try was stored (one transaction).
                if exc.code != "conflict" or attempt == _CHAIN_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")


async def _apply(ctx: Ctx, auth: Authenticated, txn_id: str, results: list[Any],
                 context: dict[str, Any]) -> Response:
    """Read the state the core's decision needs, ask it, carry out the answer."""
    snapshot = await ctx.runtime.txn_snapshot(results)
    context.update(snapshot_context(snapshot))
    decision = ctx.node.on_transaction(auth, results, snapshot, ctx.now())
    for need in decision.prefetch:
        await ctx.runtime.learn_descriptor(need.server)  # for the sender's retry; this answer is decided
    for refusal in decision.refused:
        log.info("refused an event of a transaction from %s: %s", auth.origin, refusal)
    if decision.refused:
        # Refused for good, never silently: in the reply, in the log, and in the
        # sending peer's last_error.
        await ctx.runtime.peer_error(auth.origin, decision.refused[0])
    # Store every room's events, the reply, the memberships and the chained
    # events' outbox rows atomically; nothing is acknowledged before it is
    # durable. Every member server, the proposer included, gets the events
    # chained from proposals in order through one channel (the outbox); the
    # copy in this reply is only a head start.
    work, started = timings.current(), timings.Work.store_started()
    outcome = await ctx.runtime.store_txn_and_push(
        auth.origin, txn_id, decision, [{**e.as_record(), "room_id": e.room_id} for e in decision.store])
    work.store_done(started, outcome.new_events)
    for catch_up in decision.catch_ups:
        await ctx.runtime.request_catch_up(catch_up.room_id, catch_up.host, catch_up.head)
    return Response.cbor(200, outcome.response)


async def _backfill(ctx: Ctx, auth: Authenticated, room_id: str, request: Request,
                    context: dict[str, Any], view: tuple[dict[str, Any], RoomFacts, bool] | None) -> Response:
    # view: the room and its facts, read with the request's nonce (_handle)
    room, facts = (view[0], view[1]) if view else (None, None)
    room_type = room["room_type"] if room and room["host"] == ctx.server_name else None
    federates = facts.tenant_federates if facts else True
    members = dict(facts.members) if facts else {}
    context.update({"room_type": room_type, "tenant_federates": federates, "members": members})
    decision = ctx.node.on_backfill(auth, room_id, request.query, room_type=room_type,
                                        tenant_federates=federates, members=members)
    if isinstance(decision, Refused):
        return cbor_error(decision)
    before, limit = decision
    depths, envelopes = await ctx.store.page_before(room_id, before, limit, PAGE_BYTES)
    page = build_page(room_id, before, envelopes, depths)
    return Response.cbor(200, page)
