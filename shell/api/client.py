"""Client endpoints (a local user's bearer token): just enough chat for the guide.

Each endpoint registers in the route table (:mod:`.routes`) at the end of this
module, with its typed input; the handlers get checked values. Who may do
what in a room is the core's decision (``core.authz``): the handlers gather
the stored facts, ask, and carry out the answer.

DMs and rooms are hosted on the server that creates them. Writes to a room
hosted elsewhere go to its host as proposals; the host chains them and the
reply carries the chained event, which is verified before it is stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import trio

from scaiwave_federation.core import Code, Event, Head, NeedKeys, Refused, decode_event, make_event
from scaiwave_federation.core import decode_refusal
from scaiwave_federation.core import Party, RoomFacts
from scaiwave_federation.core import may_answer, may_invite, may_leave, may_post, may_read
from scaiwave_federation.core import canonical_room_id, canonical_user_id, server_of
from scaiwave_federation.core import ROOM_TYPES
from scaiwave_federation.core import decode_txn_reply
from scaiwave_federation.core import chain_event, encode_events_body
from scaiwave_federation.core import verify_events

from ..http import responses as R
from ..http.server import Request, Response
from ..http.inputs import ROOM_ID, USER_ID, Enum, Obj, Str
from ..http.routes import API, ApiFailure, Auth, Call, all_routes
from ..runtime.context import Ctx
from ..runtime.service import room_view_in
from ..store.store import StorageError

log = logging.getLogger(__name__)
#: How long a user's write to a remote room waits before its one retry after a
#: refusal of the moment. A host refetches a key id it has not seen at most once
#: a second (core.keycache.NEW_KEY_FLOOR_MS): a little more than that.
RETRY_ONCE_S = 1.2

__all__ = ["token_hash", "USER"]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class _Fail(ApiFailure):
    pass


def _need(result: Any) -> Any:
    if isinstance(result, Refused):
        raise _Fail(result)
    return result


def _token_hash_of(request: Request) -> str:
    header = request.header("authorization") or ""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise _Fail(Refused(Code.UNAUTHORIZED, "send Authorization: Bearer <user access token>"))
    return token_hash(token.strip())


async def _user(ctx: Ctx, request: Request) -> dict[str, Any]:
    user = await ctx.store.user_by_token_hash(_token_hash_of(request))
    if user is None:
        raise _Fail(Refused(Code.UNAUTHORIZED, "unknown access token"))
    return user


class _Poster(dict):
    """A user row, with the room its post names as read in the same storage
    call (see :func:`_user_and_room`)."""

    room_id: str | None = None
    view: tuple[dict[str, Any], RoomFacts, bool] | None = None


async def _user_and_room(ctx: Ctx, request: Request) -> dict[str, Any]:
    """A post's caller and its room (``Service.room_view``) in one storage call:
    a post made a round trip for each. The room is read before the caller is
    known to be anyone, and used only once they are (nothing of it reaches a
    stranger, who gets the same 401 as from :func:`_user`)."""
    digest = _token_hash_of(request)
    try:
        text = all_routes().match(request.method, request.path)[1].get("room_id") or ""
    except Exception:  # noqa: BLE001 - the dispatcher matched it already; never in practice
        text = ""
    room_id = canonical_room_id(text) or text

    def read(store: Any) -> tuple[dict[str, Any] | None, Any]:
        user = store.user_by_token_hash(digest)
        if user is None or not room_id:
            return user, None
        return user, room_view_in(store, room_id, user["tenant"])

    # Reads only: may pass queued posts; the post's write follows (group commit waits for it).
    user, view = await ctx.store.run(read, early=True, write_follows=True)
    if user is None:
        raise _Fail(Refused(Code.UNAUTHORIZED, "unknown access token"))
    poster = _Poster(user)
    poster.room_id, poster.view = room_id, view
    return poster


def _key(ctx: Ctx):
    key = ctx.node.keyring.current
    if key is None:
        raise _Fail(Refused(Code.OWN_KEY_MISSING, "no federation key: run `scaiwave admin federation key generate`"))
    return key


async def _append(ctx: Ctx, room: dict[str, Any], sender: str, type: str, content: dict,
                  answer: Callable[[Event], dict[str, Any]] | None = None, facts: RoomFacts | None = None,
                  moves: dict[str, str] | None = None,
                  invite: Callable[[Event], dict[str, Any]] | None = None) -> Event:
    """Chain an event in a room we host, then store it and queue it for member
    servers in one write. ``answer``: the client txn row for this event,
    ``moves``: the memberships it changes (user id -> membership), and
    ``invite``: a local invitee's invite row for this event, stored in that
    same write. ``facts``: the room's, if the caller just read them and
    changed nothing since (else they are read again)."""
    key = _key(ctx)
    if facts is not None:
        # The head is read, the event chained and signed, stored and queued in
        # one storage call (on the storage thread, off the event loop), whose
        # commit concurrent posts share.
        heads: list[Head | None] = []

        def chain(head: Head | None) -> list[Event]:
            heads.append(head)
            return [chain_event(key, head=head, room_id=room["room_id"], room_type=room["room_type"],
                                sender=sender, type=type, ts=ctx.now(), content=content)]

        while True:
            try:
                return (await ctx.runtime.chain_and_push(room["room_id"], chain, facts, answer,
                                                     lock=ctx.runtime.room_lock(room["room_id"]),
                                                     memberships=moves, invite=invite))[-1]
            except StorageError as exc:
                # Another worker (the room lock is per process) chained on the
                # head we read, first: chain again on the new head. Each retry
                # follows another post's success, so this ends.
                if exc.code != "conflict" or not heads or await ctx.runtime.head_of(room["room_id"]) == heads[-1]:
                    raise
    async with ctx.runtime.room_lock(room["room_id"]):
        while True:
            head = await ctx.runtime.head_of(room["room_id"])
            event = chain_event(_key(ctx), head=head, room_id=room["room_id"], room_type=room["room_type"],
                                sender=sender, type=type, ts=ctx.now(), content=content)
            try:
                await ctx.runtime.push_events(room["room_id"], [event], facts=facts,
                                          client_txn=answer(event) if answer else None, memberships=moves,
                                          invite=invite(event) if invite else None)
            except StorageError as exc:
                # Another worker (the room lock is per process) chained at
                # this depth first: chain again on the new head.
                if exc.code != "conflict" or await ctx.runtime.head_of(room["room_id"]) == head:
                    raise
                continue
            return event


async def _new_room(ctx: Ctx, user: dict[str, Any], room_type: str) -> dict[str, Any]:
    """A room hosted here with its creator joined: the room, its first two
    events (chained in memory) and the membership in one write."""
    room = {"room_id": f"!{os.urandom(9).hex()}:{ctx.server_name}", "room_type": room_type,
            "host": ctx.server_name, "tenant": user["tenant"], "creator": user["user_id"], "created_at": ctx.now()}
    events, head = [], None
    for type, content in (("m.create", {"creator": user["user_id"], "room_type": room_type}),
                          ("m.member", {"membership": "join", "user": user["user_id"]})):
        event = chain_event(_key(ctx), head=head, room_id=room["room_id"], room_type=room_type,
                            sender=user["user_id"], type=type, ts=ctx.now(), content=content)
        events.append(event)
        head = Head(event.depth, event.event_id)
    await ctx.store.create_room_with(room, [e.as_record() for e in events], {user["user_id"]: "join"})
    stored = await ctx.store.get_room(room["room_id"])
    assert stored is not None  # just created
    return stored


async def _create_room(ctx: Ctx, user: dict[str, Any], body: dict[str, Any]) -> Response:
    room_type = body.get("room_type", "group")
    if room_type not in ROOM_TYPES or room_type == "dm":
        raise _Fail(Refused(Code.BAD_REQUEST, "room_type is one of group, incognito, bridge, sidekick"))
    _key(ctx)
    room = await _new_room(ctx, user, room_type)
    return Response.json(200, {"room_id": room["room_id"], "room_type": room_type})


async def _me(ctx: Ctx, user: dict[str, Any]) -> Party:
    """The caller as the rules see it, from the row its token was found by in this request."""
    return Party(user["user_id"], user["tenant"], await ctx.runtime.tenant_federates(user["tenant"]))


def _user_id(value: object, field: str) -> str:
    """A user id from a client, in its canonical spelling (``@Bob:Peer.Test:443`` is ``@bob:peer.test``)."""
    uid = canonical_user_id(value)
    if uid is None:
        raise _Fail(Refused(Code.BAD_REQUEST, f"{field} is a user id like @bob:peer.acme.com"))
    return uid


async def _room(ctx: Ctx, room_id: str) -> dict[str, Any]:
    """The stored room a client names (any spelling of its id), or ``not_found``."""
    room = await ctx.store.get_room(canonical_room_id(room_id) or room_id)
    if room is None:
        raise _Fail(Refused(Code.NOT_FOUND, f"no room {room_id[:100]}"))
    return room


async def _invitee(ctx: Ctx, to: str) -> Party | None:
    if server_of(to) == ctx.server_name:
        return await ctx.runtime.local_party(to)
    return Party(to)


async def _create_dm(ctx: Ctx, user: dict[str, Any], body: dict[str, Any]) -> Response:
    to = _user_id(body.get("to"), "to")
    me = await _me(ctx, user)
    # The rules of the room as it will be: the creator joined, nobody else yet.
    facts = RoomFacts(f"!new:{ctx.server_name}", "dm", me.tenant, me.tenant_federates,
                      {me.user_id: "join"})
    _need(may_invite(facts, server_name=ctx.server_name, inviter=me,
                     invitee=await _invitee(ctx, to), invitee_id=to))
    key = _key(ctx)
    here = ctx.server_name
    if server_of(to) != here:
        _need(await ctx.runtime.ensure_peered(server_of(to) or ""))
    # Atomic: the room's first three events are chained in memory, the invite
    # goes out first, and only an accepted invite stores the room, its events,
    # memberships and invite in one transaction. A refusal leaves nothing.
    room = {"room_id": f"!{os.urandom(9).hex()}:{here}", "room_type": "dm", "host": here,
            "tenant": user["tenant"], "creator": user["user_id"], "created_at": ctx.now()}
    events, head = [], None
    for type, content in (("m.create", {"creator": user["user_id"], "room_type": "dm"}),
                          ("m.member", {"membership": "join", "user": user["user_id"]}),
                          ("m.member", {"membership": "invite", "user": to})):
        event = chain_event(key, head=head, room_id=room["room_id"], room_type="dm", sender=user["user_id"],
                            type=type, ts=ctx.now(), content=content)
        events.append(event)
        head = Head(event.depth, event.event_id)
    if server_of(to) != here:
        status, answer = _need(await ctx.runtime.signed_request(
            server_of(to) or "", "PUT", f"/_scaiwave/federation/v1/invite/{room['room_id']}",
            encode_events_body([events[-1].envelope])))
        if status != 200:
            raise _Fail(decode_refusal(status, answer))

    invite = None if server_of(to) != here else {
        "room_id": room["room_id"], "user_id": to, "inviter": user["user_id"], "origin": here, "room_type": "dm",
        "state": "pending", "payload": events[-1].envelope, "created_at": ctx.now()}
    await ctx.store.create_room_with(room, [e.as_record() for e in events],
                                         {user["user_id"]: "join", to: "invite"}, invite)
    return Response.json(200, {"room_id": room["room_id"], "to": to, "invite": "delivered"})


async def _invite_user(ctx: Ctx, user: dict[str, Any], room: dict[str, Any], to: str) -> Event:
    """Carry out an invite the rules allowed: chain it, then deliver it."""
    server = server_of(to) or ""  # a canonical user id (inputs.USER_ID): never empty

    def local_invite(event: Event) -> dict[str, Any]:
        # Stored with the event and the membership: a failed write leaves
        # neither, so the invite can be sent again (it was a write of its own:
        # a failure between them left `invite` with no invite to accept).
        return {"room_id": room["room_id"], "user_id": to, "inviter": user["user_id"], "origin": server,
                "room_type": room["room_type"], "state": "pending", "payload": event.envelope,
                "created_at": ctx.now()}

    local = server == ctx.server_name
    event = await _append(ctx, room, user["user_id"], "m.member", {"membership": "invite", "user": to},
                          moves={to: "invite"}, invite=local_invite if local else None)
    if local:
        return event
    result = _need(await ctx.runtime.signed_request(server, "PUT", f"/_scaiwave/federation/v1/invite/{room['room_id']}",
                                                encode_events_body([event.envelope])))
    if result[0] != 200:
        await ctx.store.set_membership(room["room_id"], to, "decline")
        raise _Fail(decode_refusal(*result))
    return event


async def _invite(ctx: Ctx, user: dict[str, Any], room_id: str, to_value: object) -> Response:
    room = await _room(ctx, room_id)
    to = _user_id(to_value, "user")
    _need(may_invite(await ctx.runtime.room_facts(room), server_name=ctx.server_name,
                     inviter=await _me(ctx, user), invitee=await _invitee(ctx, to), invitee_id=to))
    if server_of(to) != ctx.server_name:
        _key(ctx)
        _need(await ctx.runtime.ensure_peered(server_of(to) or ""))
    await _invite_user(ctx, user, room, to)
    return Response.json(200, {"room_id": room["room_id"], "user": to, "invite": "delivered"})


async def _write_remote(ctx: Ctx, room: dict[str, Any], user: dict[str, Any], type: str,
                        content: dict, txn: str | None = None) -> Event:
    """Send a proposal to the room's host; store the chained event it answers with.
    ``txn``: the federation transaction id (a client's retry reuses it, so
    the host answers it from its transaction log instead of chaining twice)."""
    proposal = make_event(_key(ctx), room_id=room["room_id"], room_type=room["room_type"], depth=0, prev=None,
                          origin=ctx.server_name, sender=user["user_id"], type=type,
                          ts=ctx.now(), content=content)
    txn = txn or f"{ctx.now()}-{os.urandom(6).hex()}"
    host = room["host"]
    target, txn_body = f"/_scaiwave/federation/v1/send/{txn}", encode_events_body([proposal.envelope])
    result = await ctx.runtime.signed_request(host, "PUT", target, txn_body)
    refusal = result if isinstance(result, Refused) else None if result[0] == 200 else decode_refusal(*result)
    if refusal is not None and refusal.retryable:
        # A refusal of the moment (the host has not fetched our new key yet, is
        # restarting): the user is waiting, so try once more, a little later.
        log.info("proposal to %s refused for the moment (%s); retrying once", host, refusal.code.value)
        await trio.sleep(RETRY_ONCE_S)
        result = await ctx.runtime.signed_request(host, "PUT", target, txn_body)
    status, body = _need(result)
    if status != 200:
        raise _Fail(decode_refusal(status, body))
    decoded = _need(decode_txn_reply(body))
    outcomes, envelopes = decoded
    if not outcomes:
        raise _Fail(Refused(Code.MALFORMED, f"{host} answered the transaction without results"))
    _need(outcomes[0])  # the host refused the proposal: its code, passed on
    verified = verify_events(envelopes, ctx.node.lookup)
    if any(isinstance(r, NeedKeys) for r in verified):
        await ctx.runtime.learn_descriptor(host)
        verified = verify_events(envelopes, ctx.node.lookup)
    async with ctx.runtime.room_lock(room["room_id"]):
        # The host's chained copy is stored if it links (or starts our copy of
        # the room: our join); else it arrives in order through the host's
        # outbox. The core decides, as for any transaction from the host.
        decision = ctx.node.on_proposal_reply(host, verified, await ctx.runtime.txn_snapshot(verified),
                                                  ctx.now())
        await ctx.store.store_events(room["room_id"], [e.as_record() for e in decision.store
                                                           if e.room_id == room["room_id"]])
    events = [r for r in verified if isinstance(r, Event) and r.room_id == room["room_id"] and r.origin == host]
    if not events:
        bad = next((r for r in verified if isinstance(r, Refused)), Refused(Code.MALFORMED, "no chained event"))
        raise _Fail(bad)
    return events[-1]


async def _answer_invite(ctx: Ctx, user: dict[str, Any], room_id: str, answer: str) -> Response:
    room = await _room(ctx, room_id)
    room_id = room["room_id"]
    membership = "join" if answer == "accept" else "decline"
    _need(may_answer(await ctx.runtime.room_facts(room), user=await _me(ctx, user), answer=membership,
                     server_name=ctx.server_name))
    content = {"membership": membership, "user": user["user_id"]}
    if room["host"] == ctx.server_name:
        event = await _append(ctx, room, user["user_id"], "m.member", content, moves={user["user_id"]: membership})
    else:
        event = await _write_remote(ctx, room, user, "m.member", content)
        await ctx.store.set_membership(room_id, user["user_id"], membership)
    await ctx.store.set_invite_state(room_id, user["user_id"], "accepted" if membership == "join" else "declined")
    return Response.json(200, {"room_id": room_id, "membership": membership, "event_id": event.id_text})


async def _leave(ctx: Ctx, user: dict[str, Any], room_id: str) -> Response:
    room = await _room(ctx, room_id)
    _need(may_leave(await ctx.runtime.room_facts(room), user=await _me(ctx, user),
                    server_name=ctx.server_name))
    content = {"membership": "leave", "user": user["user_id"]}
    if room["host"] == ctx.server_name:
        # The leave and the membership in one write; the room's facts are read
        # before it, so the leave reaches every member server.
        event = await _append(ctx, room, user["user_id"], "m.member", content, moves={user["user_id"]: "leave"})
    else:
        event = await _write_remote(ctx, room, user, "m.member", content)
        await ctx.store.set_membership(room["room_id"], user["user_id"], "leave")
    return Response.json(200, {"room_id": room["room_id"], "membership": "leave", "event_id": event.id_text})


async def _post_message(ctx: Ctx, user: dict[str, Any], room_id: str, text: str,
                        txn_id: str | None = None) -> Response:
    wanted = canonical_room_id(room_id) or room_id
    if isinstance(user, _Poster) and user.room_id == wanted:
        view = user.view  # read with the caller (_user_and_room)
    else:
        view = await ctx.runtime.room_view(wanted, user["tenant"])
    if view is None:
        raise _Fail(Refused(Code.NOT_FOUND, f"no room {room_id[:100]}"))
    room, facts, federates = view
    _need(may_post(facts, user=Party(user["user_id"], user["tenant"], federates),
                   server_name=ctx.server_name))
    record = None
    if txn_id is not None:
        def record(event: Event) -> dict[str, Any]:
            return {"user_id": user["user_id"], "txn_id": txn_id, "room_id": room["room_id"],
                    "body_hash": _text_hash(text), "created_at": ctx.now(), "response": json.dumps(_posted(event))}
    if room["host"] == ctx.server_name:
        event = await _append(ctx, room, user["user_id"], "m.message", {"body": text}, record, facts)
    else:
        fed_txn = None if txn_id is None else "c" + hashlib.sha256(f"{user['user_id']}\0{txn_id}".encode()).hexdigest()[:40]
        event = await _write_remote(ctx, room, user, "m.message", {"body": text}, fed_txn)
        if record is not None:
            await ctx.store.save_client_txn(record(event))
    return Response.json(200, _posted(event))


def _posted(event: Event) -> dict[str, Any]:
    return {"event_id": event.id_text, "depth": event.depth}


def _text_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


async def _send(ctx: Ctx, user: dict[str, Any], room_id: str, txn_id: str, text: str) -> Response:
    """``PUT /v1/rooms/{room_id}/send/{txn_id}``: the first send with this txn id
    (per user) is stored; a retry gets the first answer and stores nothing. The
    same txn id for another room or another text is ``conflict``."""
    async with ctx.runtime.send_lock(user["user_id"]):
        first = await ctx.store.client_txn(user["user_id"], txn_id)
        if first is None:
            try:
                return await _post_message(ctx, user, room_id, text, txn_id)
            except StorageError as exc:
                # The same send, retried on another worker, won the race: its answer.
                first = await ctx.store.client_txn(user["user_id"], txn_id)
                if exc.code != "conflict" or first is None:
                    raise
    if first["room_id"] != room_id or bytes(first["body_hash"]) != _text_hash(text):
        raise _Fail(Refused(Code.CONFLICT, f"txn id {txn_id[:64]!r} was used for another message"))
    return Response.json(200, json.loads(first["response"]))


async def _messages(ctx: Ctx, user: dict[str, Any], room_id: str) -> Response:
    room = await _room(ctx, room_id)
    _need(may_read(await ctx.runtime.room_facts(room), user=await _me(ctx, user)))
    room_id = room["room_id"]
    rows = await ctx.store.events_after(room_id, None, 100_000)
    messages = []
    for row in rows:
        event = decode_event(row["envelope"])
        if isinstance(event, Event) and event.type == "m.message":
            messages.append({"event_id": event.id_text, "depth": event.depth, "sender": event.sender,
                             # A host may have chained any CBOR value here; show text only.
                             "body": body if isinstance(body := event.content.get("body"), str) else None,
                             "ts": event.ts})
    return Response.json(200, {"room_id": room_id, "messages": messages, "events": len(rows)})


USER = Auth("user", _user, "A local user's access token (from `scaiwave admin user create`) as a bearer token.")
#: The same for a post: the caller and the room it names are read together.
_POSTER = Auth(USER.scheme, _user_and_room, USER.description)
_ROOM = {"room_id": ROOM_ID}
#: What a write that reaches another server may be refused with (theirs or ours).
_REMOTE = (Code.PEER_BLOCKED, Code.PEER_NOT_ALLOWED, Code.FEDERATION_CLOSED, Code.NOT_PEERED, Code.OWN_KEY_MISSING,
           Code.NO_DESCRIPTOR, Code.INVALID_DESCRIPTOR, Code.SERVER_NAME_MISMATCH, Code.TLS_FAILURE,
           Code.PEER_UNREACHABLE, Code.HANDSHAKE_FAILED, Code.PROTOCOL_VERSION_MISMATCH, Code.UNKNOWN_KEY,
           Code.BAD_SIGNATURE, Code.EXPIRED_KEY, Code.CLOCK_SKEW, Code.REPLAYED_REQUEST, Code.TOO_LARGE,
           Code.MALFORMED, Code.NON_CANONICAL, Code.WRONG_DESTINATION, Code.BAD_HASH, Code.CHAIN_BROKEN,
           Code.WRONG_ROOM, Code.FORBIDDEN, Code.CONFLICT, Code.TIMEOUT, Code.INTERNAL_ERROR, Code.UNAUTHORIZED,
           Code.ROOM_INCOGNITO, Code.ROOM_BRIDGE, Code.ROOM_SIDEKICK, Code.TENANT_FEDERATION_DISABLED,
           Code.NOT_MEMBER, Code.FORGED_SENDER, Code.ADDRESS_BLOCKED, Code.RATE_LIMITED, Code.NOT_FOUND)
#: A message's text: at most 16,000 characters, so that its signed event (4
#: bytes a character at worst, plus the envelope) stays under the 64 KiB limit.
#: A client's transaction id: what Matrix clients send (letters, digits, ``.``, ``_``, ``-``, ``~``).
TXN_ID = Str(max_len=128, pattern=r"^[A-Za-z0-9._~-]{1,128}$", example="m1700000000000.0",
             check=lambda v: None if re.fullmatch(r"[A-Za-z0-9._~-]{1,128}", v) else
             "letters, digits, '.', '_', '-' or '~', at most 128",
             description="The client's id for this send, unique per user.")
MESSAGE_TEXT = Str(max_len=16_000, text=True, example="hello", description="The message's text.")


async def _dm_create(call: Call) -> Response:
    return await _create_dm(call.ctx, call.caller, call.body)


async def _room_create(call: Call) -> Response:
    return await _create_room(call.ctx, call.caller, call.body)


async def _rooms_list(call: Call) -> Response:
    return Response.json(200, {"rooms": await call.ctx.store.rooms_for_user(call.caller["user_id"])})


async def _notifications_list(call: Call) -> Response:
    invites = await call.ctx.store.pending_invites(call.caller["user_id"])
    return Response.json(200, {"notifications": [
        {"type": "invite", "room_id": i["room_id"], "room_type": i["room_type"], "inviter": i["inviter"],
         "origin": i["origin"], "at": i["created_at"]} for i in invites]})


async def _invite_accept(call: Call) -> Response:
    return await _answer_invite(call.ctx, call.caller, call.params["room_id"], "accept")


async def _invite_decline(call: Call) -> Response:
    return await _answer_invite(call.ctx, call.caller, call.params["room_id"], "decline")


async def _room_invite(call: Call) -> Response:
    return await _invite(call.ctx, call.caller, call.params["room_id"], call.body["user"])


async def _room_leave(call: Call) -> Response:
    return await _leave(call.ctx, call.caller, call.params["room_id"])


async def _message_post(call: Call) -> Response:
    return await _post_message(call.ctx, call.caller, call.params["room_id"], call.body["body"])


async def _message_send(call: Call) -> Response:
    return await _send(call.ctx, call.caller, call.params["room_id"], call.params["txn_id"], call.body["body"])


async def _messages_list(call: Call) -> Response:
    return await _messages(call.ctx, call.caller, call.params["room_id"])


def _client(method: str, path: str, handler, summary: str, response: dict, *, auth: Auth = USER,
            **options: Any) -> None:
    API.add(method, "/v1" + path, handler, auth=auth, summary=summary, response=response, tag="client", **options)


_client("POST", "/dms", _dm_create, "Open a DM with a user here or on a peer.", R.DM, errors=_REMOTE,
        body=Obj({"to": USER_ID}, required={"to"}))
_client("POST", "/rooms", _room_create, "Create a room hosted here.", R.ROOM, errors=(Code.OWN_KEY_MISSING,),
        body=Obj({"room_type": Enum(tuple(t for t in ROOM_TYPES if t != "dm"),
                                    description="The room's type (default group).")}))
_client("GET", "/rooms", _rooms_list, "The rooms the user has a membership in.", R.ROOMS)
_client("GET", "/notifications", _notifications_list, "The user's pending invites.", R.NOTIFICATIONS)
_client("POST", "/invites/{room_id}/accept", _invite_accept, "Accept an invite: join the room.", R.MEMBERSHIP,
        params=_ROOM, errors=_REMOTE)
_client("POST", "/invites/{room_id}/decline", _invite_decline, "Decline an invite.", R.MEMBERSHIP,
        params=_ROOM, errors=_REMOTE)
_client("POST", "/rooms/{room_id}/invite", _room_invite, "Invite a user (here or on a peer) to a room hosted here.",
        R.INVITE, params=_ROOM, errors=_REMOTE, body=Obj({"user": USER_ID}, required={"user"}))
_client("POST", "/rooms/{room_id}/messages", _message_post, "Post a message to a room.", R.POSTED,
        params=_ROOM, errors=_REMOTE, body=Obj({"body": MESSAGE_TEXT}, required={"body"}), auth=_POSTER)
_client("PUT", "/rooms/{room_id}/send/{txn_id}", _message_send,
        "Post a message idempotently: a retry with the same txn id (per user) answers the first result and "
        "stores nothing twice.", R.POSTED, params={**_ROOM, "txn_id": TXN_ID}, errors=(*_REMOTE, Code.CONFLICT),
        body=Obj({"body": MESSAGE_TEXT}, required={"body"}))
_client("POST", "/rooms/{room_id}/leave", _room_leave, "Leave a room the user has joined.", R.MEMBERSHIP,
        params=_ROOM, errors=_REMOTE)
_client("GET", "/rooms/{room_id}/messages", _messages_list, "A room's messages, oldest first.", R.MESSAGES,
        params=_ROOM, errors=(Code.NOT_MEMBER, Code.NOT_FOUND))
