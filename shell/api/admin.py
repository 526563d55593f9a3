"""Admin endpoints (``/v1/admin/*``, bearer ``SCAIWAVE_ADMIN_TOKEN``).

Each endpoint registers in the route table (:mod:`.routes`) with its typed
input; the handlers below get checked values (``call.params``, ``call.query``,
``call.body``).
"""

from __future__ import annotations

import hmac
import os
from typing import Any

from scaiwave_federation.core import Code, Policy, Refused
from scaiwave_federation.core import MAX_PULL
from scaiwave_federation.core import parse_descriptor
from scaiwave_federation.core import server_of, user_id, valid_server_name
from scaiwave_federation.core import EDITS, MODES, edit_policy, policy_change

from ..http import responses as R
from .client import token_hash
from ..http.errors import json_error
from ..http.server import Request, Response
from ..http.inputs import PARTICIPANT, ROOM_ID, SERVER_NAME, TENANT_NAME, USER_ID, Array, Bool, Enum, Int, Obj, Str
from ..http.routes import API, ApiFailure, Auth, Call
from ..runtime.context import Ctx
from ..runtime.service import describe_keyring

__all__ = ["peer_views", "ADMIN"]


class _Fail(ApiFailure):
    def __init__(self, code: Code, message: str) -> None:
        super().__init__(Refused(code, message))


async def _admin_caller(ctx: Ctx, request: Request) -> None:
    if not _authorized(ctx, request):
        raise _Fail(Code.UNAUTHORIZED, "admin endpoints need Authorization: Bearer $SCAIWAVE_ADMIN_TOKEN")


ADMIN = Auth("admin", _admin_caller, "The daemon's SCAIWAVE_ADMIN_TOKEN as a bearer token.")


def _authorized(ctx: Ctx, request: Request) -> bool:
    header = request.header("authorization") or ""
    scheme, _, token = header.partition(" ")
    expected = ctx.runtime.config.admin_token.encode()
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)


async def peer_views(ctx: Ctx) -> list[dict[str, Any]]:
    out = []
    for p in await ctx.store.list_peers():
        error = None
        if p.get("last_error_code"):
            error = {"code": p["last_error_code"], "message": p["last_error_message"], "at": p["last_error_at"]}
        out.append({"server_name": p["server_name"], "state": p.get("state") or "known",
                    "protocol_version": p.get("protocol_version"), "key_id": p.get("key_id"),
                    "last_seen": p.get("last_seen"), "last_error": error, "failures": p.get("failures") or 0,
                    "retry_at": p.get("retry_at"), "pending": await ctx.store.pending_count(p["server_name"]),
                    "paused": bool(p.get("paused"))})
    return out


# -- federation --------------------------------------------------------------------------

FED = "/v1/admin/federation"
_PEER = {"peer": SERVER_NAME}


async def _list_peers(call: Call) -> Response:
    return Response.json(200, {"peers": await peer_views(call.ctx)})


async def _limits(call: Call) -> Response:
    return Response.json(200, call.ctx.runtime.limits.view())


async def _handshake(call: Call) -> Response:
    peer = call.params["peer"]
    result = await call.ctx.runtime.handshake(peer)
    if isinstance(result, Refused):
        return json_error(result)
    return Response.json(200, {"server_name": peer, "state": "active", "protocol_version": result.protocol_version,
                               "key_id": result.key_id})


async def _retry(call: Call) -> Response:
    peer = call.params["peer"]
    return Response.json(200, {"server_name": peer, "requeued": await call.ctx.runtime.retry_now(peer)})


async def _descriptor(call: Call) -> Response:
    ctx, server = call.ctx, call.query.get("server")
    if server is None:
        return Response.json(200, ctx.node.descriptor(ctx.runtime.federation_endpoint))
    data = await ctx.runtime.fetch_descriptor(server)
    if isinstance(data, Refused):
        return json_error(data)
    parsed = parse_descriptor(data, server)
    if isinstance(parsed, Refused):
        return json_error(parsed)
    return Response.json(200, parsed[2])


async def _get_policy(call: Call) -> Response:
    return Response.json(200, call.ctx.node.policy.as_dict())


async def _put_policy(call: Call) -> Response:
    # PUT replaces the whole policy, so all three fields are required: an empty
    # or partial body is refused (bad_request) and changes nothing.
    policy = Policy.from_dict(call.body)
    async with call.ctx.runtime.policy_lock:  # never between an edit's read and its write
        await call.ctx.runtime.set_policy(policy)
    return Response.json(200, policy.as_dict())


async def _change_policy(call: Call, edit, dry_run: bool) -> Response:
    """Apply ``edit(policy) -> policy`` (or only show it, ``dry_run``): what
    changed and which active peers the new policy cuts off (core.policy)."""
    ctx = call.ctx
    async with ctx.runtime.policy_lock:
        before = ctx.node.policy
        after = edit(before)
        active = [p["server_name"] for p in await ctx.store.list_peers() if p.get("state") == "active"]
        change = policy_change(before, after, active)
        if change.changed and not dry_run:
            await ctx.runtime.set_policy(after)
    return Response.json(200, {**change.as_dict(), "dry_run": dry_run})


async def _preview_policy(call: Call) -> Response:
    # Only ever shows: the CLI's `policy set` asks here first, then PUTs.
    return await _change_policy(call, lambda _: Policy.from_dict(call.body), True)


def _policy_editor(verb: str):
    async def handler(call: Call) -> Response:
        return await _change_policy(call, lambda policy: edit_policy(policy, verb, call.body["peers"]),
                                    bool(call.body.get("dry_run")))

    handler.__name__ = f"_policy_{verb}"
    return handler


async def _pause_peer(call: Call) -> Response:
    await call.ctx.runtime.set_paused(call.params["peer"], True)
    return await _peer_view(call)


async def _resume_peer(call: Call) -> Response:
    await call.ctx.runtime.set_paused(call.params["peer"], False)
    return await _peer_view(call)


async def _peer_view(call: Call) -> Response:
    peer = call.params["peer"]
    view = next((p for p in await peer_views(call.ctx) if p["server_name"] == peer), None)
    if view is None:  # forgotten meanwhile
        raise _Fail(Code.NOT_FOUND, f"no peer {peer!r} (see `peers`)")
    return Response.json(200, view)


async def _forget_peer(call: Call) -> Response:
    peer = call.params["peer"]
    dropped = await call.ctx.runtime.forget_peer(peer, force=bool(call.query.get("force")))
    return Response.json(200, {"server_name": peer, "dropped": dropped})


async def _refresh_foreign(call: Call) -> Response:
    participant = call.params["participant_id"]  # canonical (inputs.PARTICIPANT)
    server = server_of(participant) or (participant if valid_server_name(participant) else None)
    if server is None:
        raise _Fail(Code.BAD_REQUEST, "participant_id is @user:server (or a server name)")
    refusal = await call.ctx.runtime.learn_descriptor(server, force=True)
    if refusal is not None:
        return json_error(refusal)
    keys = call.ctx.node.keys.keys(server)
    if keys is None:  # learned, then forgotten under us (a concurrent `peers forget`)
        return json_error(Refused(Code.UNKNOWN_KEY, f"{server} has no keys cached now: refresh again"))
    return Response.json(200, {"server_name": server, "key_id": keys.key_id,
                               "old_keys": [o.key_id for o in keys.old]})


async def _get_key(call: Call) -> Response:
    return Response.json(200, describe_keyring(call.ctx.node.keyring))


async def _generate_key(call: Call) -> Response:
    if call.ctx.node.keyring.current is not None:
        raise _Fail(Code.CONFLICT, "a key exists already: use `key rotate`")
    return Response.json(200, describe_keyring(await call.ctx.runtime.generate_key()))


async def _rotate_key(call: Call) -> Response:
    if call.ctx.node.keyring.current is None:
        raise _Fail(Code.OWN_KEY_MISSING, "no key to rotate: run `key generate` first")
    return Response.json(200, describe_keyring(await call.ctx.runtime.rotate_key()))


async def _start_backfill(call: Call) -> Response:
    room_id, body = call.params["room_id"], call.body
    peer: str = body.get("peer") or server_of(room_id) or ""  # room ids are canonical (inputs.ROOM_ID)
    if peer == call.ctx.server_name:  # not a peer's refusal: say what the admin asked
        raise _Fail(Code.BAD_REQUEST, f"the peer to pull from is this server ({peer}): " + (
            "name another server" if body.get("peer") else f"{room_id} is hosted here, its history is already here"))
    job = await call.ctx.runtime.start_backfill(call.nursery, room_id, peer, body.get("limit", MAX_PULL))
    if body.get("wait"):
        await job.done.wait()
    return Response.json(200, job.view())


async def _get_backfill(call: Call) -> Response:
    view = await call.ctx.runtime.job_view(call.params["job_id"])
    if view is None:
        raise _Fail(Code.NOT_FOUND, f"no backfill job {call.params['job_id']}")
    return Response.json(200, view)


# -- tenants and users ---------------------------------------------------------------------


async def _list_tenants(call: Call) -> Response:
    return Response.json(200, {"tenants": await call.ctx.store.list_tenants()})


async def _create_tenant(call: Call) -> Response:
    name = call.body["name"]
    if await call.ctx.store.get_tenant(name):
        raise _Fail(Code.CONFLICT, f"tenant {name} exists")
    return Response.json(200, await call.ctx.store.create_tenant(name, call.body.get("federation", True)))


async def _update_tenant(call: Call) -> Response:
    name = call.params["name"]
    if await call.ctx.store.get_tenant(name) is None:
        raise _Fail(Code.NOT_FOUND, f"no tenant {name}")
    await call.ctx.store.set_tenant_federation(name, call.body["federation"])
    return Response.json(200, await call.ctx.store.get_tenant(name))


def _user_view(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("user_id", "name", "tenant", "deactivated_at")}


async def _list_users(call: Call) -> Response:
    return Response.json(200, {"users": [_user_view(u) for u in await call.ctx.store.list_users()]})


async def _deactivate_user(call: Call) -> Response:
    # The token stops working at once (every request looks the token up);
    # memberships and rooms stay (README: Users).
    return Response.json(200, _user_view(await call.ctx.store.deactivate_user(call.params["user_id"],
                                                                                  call.ctx.now())))


async def _reissue_token(call: Call) -> Response:
    token = _new_token()
    row = await call.ctx.store.set_token_hash(call.params["user_id"], token_hash(token))
    return Response.json(200, {"user_id": row["user_id"], "access_token": token})


def _new_token() -> str:
    return "swu_" + os.urandom(24).hex()


def _user_name_problem(name: str) -> str | None:
    try:
        user_id(name, "x")
    except ValueError as exc:
        return str(exc)
    return None


async def _create_user(call: Call) -> Response:
    ctx, name, tenant = call.ctx, call.body["name"], call.body["tenant"]
    uid = user_id(name, ctx.server_name)
    if await ctx.store.get_tenant(tenant) is None:
        raise _Fail(Code.NOT_FOUND, f"no tenant {tenant}: create it first")
    if await ctx.store.get_user(uid):
        raise _Fail(Code.CONFLICT, f"user {uid} exists")
    token = _new_token()
    await ctx.store.create_user(uid, name, tenant, token_hash(token))
    return Response.json(200, {"user_id": uid, "tenant": tenant, "access_token": token})


# -- the table -----------------------------------------------------------------------------

_PEER_NAMES = Array(SERVER_NAME, description="Server names.")
_FETCH = (Code.NO_DESCRIPTOR, Code.INVALID_DESCRIPTOR, Code.SERVER_NAME_MISMATCH, Code.TLS_FAILURE,
          Code.PEER_UNREACHABLE, Code.TOO_LARGE)
_HANDSHAKE = (*_FETCH, Code.PEER_BLOCKED, Code.PEER_NOT_ALLOWED, Code.FEDERATION_CLOSED, Code.OWN_KEY_MISSING,
              Code.HANDSHAKE_FAILED, Code.PROTOCOL_VERSION_MISMATCH, Code.UNKNOWN_KEY, Code.BAD_SIGNATURE,
              Code.EXPIRED_KEY, Code.CLOCK_SKEW, Code.UNAUTHORIZED, Code.MALFORMED, Code.TIMEOUT, Code.INTERNAL_ERROR,
              Code.REPLAYED_REQUEST, Code.WRONG_DESTINATION, Code.NON_CANONICAL)


def _admin(method: str, path: str, handler, summary: str, response: dict, **options: Any) -> None:
    API.add(method, "/v1/admin" + path, handler, auth=ADMIN, summary=summary, response=response, tag="admin",
            **options)


_admin("GET", "/federation/peers", _list_peers, "Peers with state, last_seen, last_error and queue.", R.PEERS)
_admin("GET", "/federation/limits", _limits, "Who is being limited: inbound origins and descriptor fetches.",
       R.LIMITS)
_admin("POST", "/federation/peers/{peer}/handshake", _handshake, "Peer with a server now.", R.HANDSHAKE,
       params=_PEER, errors=_HANDSHAKE)
_admin("POST", "/federation/peers/{peer}/retry", _retry, "Make a peer's queued transactions due now.", R.RETRY,
       params=_PEER)
_admin("GET", "/federation/descriptor", _descriptor, "Our signed descriptor, or a peer's after checking it.",
       R.DESCRIPTOR, query=Obj({"server": SERVER_NAME}), errors=_FETCH)
_admin("GET", "/federation/policy", _get_policy, "The federation policy.", R.POLICY)
_admin("PUT", "/federation/policy", _put_policy, "Replace the federation policy (all three fields required).",
       R.POLICY, body=Obj({"default_mode": Enum(MODES), "allowed_peers": _PEER_NAMES, "blocked_peers": _PEER_NAMES},
                          required={"default_mode", "allowed_peers", "blocked_peers"}))
_POLICY_FIELDS = {"default_mode": Enum(MODES), "allowed_peers": _PEER_NAMES, "blocked_peers": _PEER_NAMES}
_DRY_RUN = Bool(description="Only show what would change and whom it would cut off.")
_admin("POST", "/federation/policy/preview", _preview_policy,
       "What replacing the policy would change, and which active peers it would cut off (changes nothing).",
       R.POLICY_CHANGE, body=Obj(_POLICY_FIELDS, required=set(_POLICY_FIELDS)))
for _verb, (_list, _add) in EDITS.items():
    _admin("POST", f"/federation/policy/{_verb}", _policy_editor(_verb),
           f"{'Add' if _add else 'Remove'} servers {'to' if _add else 'from'} {_list}; says what changed and which "
           "active peers it cuts off.", R.POLICY_CHANGE,
           body=Obj({"peers": _PEER_NAMES, "dry_run": _DRY_RUN}, required={"peers"}))
_admin("POST", "/federation/peers/{peer}/pause", _pause_peer,
       "Stop delivering to a peer; its queue is kept.", R.PEER, params=_PEER, errors=(Code.NOT_FOUND,))
_admin("POST", "/federation/peers/{peer}/resume", _resume_peer,
       "Resume delivery to a paused peer: its queue goes out in order.", R.PEER, params=_PEER,
       errors=(Code.NOT_FOUND,))
_admin("DELETE", "/federation/peers/{peer}", _forget_peer,
       "Forget a peer: its row, cached keys and (with force) queued transactions.", R.FORGOTTEN, params=_PEER,
       query=Obj({"force": Bool(description="Also drop the transactions queued for it.")}),
       errors=(Code.NOT_FOUND, Code.CONFLICT))
_admin("POST", "/federation/foreign/{participant_id}/refresh", _refresh_foreign,
       "Re-fetch the keys of a participant's server.", R.REFRESH, params={"participant_id": PARTICIPANT},
       errors=(*_FETCH, Code.EXPIRED_KEY))
_admin("GET", "/federation/key", _get_key, "This server's federation key (public part).", R.KEYRING)
_admin("POST", "/federation/key/generate", _generate_key, "Create the first federation key.", R.KEYRING,
       errors=(Code.CONFLICT,))
_admin("POST", "/federation/key/rotate", _rotate_key, "Rotate the federation key.", R.KEYRING,
       errors=(Code.OWN_KEY_MISSING,))
_admin("POST", "/federation/rooms/{room_id}/backfill", _start_backfill, "Pull a room's history from a peer.",
       R.BACKFILL_JOB, params={"room_id": ROOM_ID},
       body=Obj({"peer": SERVER_NAME, "limit": Int(1, MAX_PULL, description="Most events to pull."),
                 "wait": Bool(description="Answer when the job has finished.")}))
_admin("GET", "/federation/backfills/{job_id}", _get_backfill, "A backfill job's progress.", R.BACKFILL_JOB,
       params={"job_id": Int(1, 2**31 - 1)})
_admin("GET", "/tenants", _list_tenants, "Every tenant.", R.TENANTS)
_admin("POST", "/tenants", _create_tenant, "Create a tenant.", R.TENANT, errors=(Code.CONFLICT,),
       body=Obj({"name": TENANT_NAME, "federation": Bool(description="Federation on (default) or off.")},
                required={"name"}))
_admin("PUT", "/tenants/{name}", _update_tenant, "Turn a tenant's federation on or off.", R.TENANT,
       params={"name": TENANT_NAME}, body=Obj({"federation": Bool()}, required={"federation"}))
_admin("GET", "/users", _list_users, "Every local user (no tokens).", R.USERS)
_admin("POST", "/users/{user_id}/deactivate", _deactivate_user,
       "Deactivate a user: its token stops working at once; its memberships stay.", R.USER,
       params={"user_id": USER_ID}, errors=(Code.NOT_FOUND,))
_admin("POST", "/users/{user_id}/token", _reissue_token,
       "Give a user a new access token (answered once); the old one stops working.", R.TOKEN,
       params={"user_id": USER_ID}, errors=(Code.NOT_FOUND, Code.CONFLICT))
_admin("POST", "/users", _create_user, "Create a local user; answers its access token once.", R.NEW_USER,
       errors=(Code.CONFLICT,),
       body=Obj({"name": Str(max_len=64, check=_user_name_problem, pattern=r"^[a-z0-9._=/-]{1,64}$", example="alice"),
                 "tenant": TENANT_NAME}, required={"name", "tenant"}))
