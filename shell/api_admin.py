"""Admin endpoints (``/v1/admin/*``, bearer ``SCAIWAVE_ADMIN_TOKEN``)."""

from __future__ import annotations

import hmac
import json
import os
from typing import Any

import trio

from scaiwave_federation.core import Code, LocalProtocolError, Policy, Refused
from scaiwave_federation.core.backfill import MAX_PULL
from scaiwave_federation.core.descriptor import parse_descriptor
from scaiwave_federation.core.names import (
    canonical_room_id,
    canonical_server_name,
    canonical_user_id,
    server_name_problem,
    server_of,
    user_id,
)

from .api_client import token_hash
from .errors import json_error
from .http import Request, Response
from .service import Service, describe_keyring

__all__ = ["handle_admin"]


class _Fail(Exception):
    def __init__(self, code: Code, message: str) -> None:
        self.refusal = Refused(code, message)


def _body(request: Request) -> dict[str, Any]:
    try:
        value = json.loads(request.body or b"{}")
    except ValueError:
        raise _Fail(Code.BAD_REQUEST, "body is not JSON")
    if not isinstance(value, dict):
        raise _Fail(Code.BAD_REQUEST, "body is a JSON object")
    return value


def _server(value: object, field: str) -> str:
    """A server name from an admin, in its canonical spelling (``Peer.Test:443`` is ``peer.test``)."""
    name = canonical_server_name(value)
    if name is None:
        raise _Fail(Code.BAD_REQUEST, f"{field}: not a server name: {str(value)[:100]!r} ({server_name_problem(value)})")
    return name


def _authorized(service: Service, request: Request) -> bool:
    header = request.header("authorization") or ""
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), service.config.admin_token.encode())


async def peer_views(service: Service) -> list[dict[str, Any]]:
    out = []
    for p in await service.store.list_peers():
        error = None
        if p.get("last_error_code"):
            error = {"code": p["last_error_code"], "message": p["last_error_message"], "at": p["last_error_at"]}
        out.append({"server_name": p["server_name"], "state": p.get("state") or "known",
                    "protocol_version": p.get("protocol_version"), "key_id": p.get("key_id"),
                    "last_seen": p.get("last_seen"), "last_error": error, "failures": p.get("failures") or 0,
                    "retry_at": p.get("retry_at"), "pending": await service.store.pending_count(p["server_name"])})
    return out


async def handle_admin(service: Service, request: Request, nursery: trio.Nursery) -> Response:
    """Serve ``/v1/admin/...``."""
    if not _authorized(service, request):
        return json_error(Refused(Code.UNAUTHORIZED, "admin endpoints need Authorization: Bearer $SCAIWAVE_ADMIN_TOKEN"))
    try:
        return await _dispatch(service, request, nursery)
    except _Fail as fail:
        return json_error(fail.refusal)
    except LocalProtocolError as exc:
        return json_error(Refused(Code.BAD_REQUEST, str(exc)))


async def _dispatch(service: Service, request: Request, nursery: trio.Nursery) -> Response:
    parts = request.path.strip("/").split("/")[2:]  # drop "v1/admin"
    m = request.method
    fed = parts[1:] if parts[:1] == ["federation"] else None
    if fed == ["peers"] and m == "GET":
        return Response.json(200, {"peers": await peer_views(service)})
    if fed == ["limits"] and m == "GET":
        return Response.json(200, service.limits.view())
    if fed and len(fed) == 3 and fed[0] == "peers" and m == "POST":
        peer = _server(fed[1], "peer")
        if fed[2] == "handshake":
            result = await service.handshake(peer)
            if isinstance(result, Refused):
                return json_error(result)
            return Response.json(200, {"server_name": peer, "state": "active", "protocol_version": result.protocol_version,
                                       "key_id": result.key_id})
        if fed[2] == "retry":
            return Response.json(200, {"server_name": peer, "requeued": await service.retry_now(peer)})
    if fed == ["descriptor"] and m == "GET":
        server = request.query.get("server")
        if not server:
            return Response.json(200, service.node.descriptor(service.federation_endpoint))
        server = _server(server, "server")
        data = await service.fetch_descriptor(server)
        if isinstance(data, Refused):
            return json_error(data)
        parsed = parse_descriptor(data, server)
        if isinstance(parsed, Refused):
            return json_error(parsed)
        return Response.json(200, parsed[2])
    if fed == ["policy"]:
        if m == "GET":
            return Response.json(200, service.node.policy.as_dict())
        if m == "PUT":
            policy = Policy.from_dict(_body(request))
            await service.set_policy(policy)
            return Response.json(200, policy.as_dict())
    if fed and len(fed) == 3 and fed[0] == "foreign" and fed[2] == "refresh" and m == "POST":
        participant = canonical_user_id(fed[1])
        server = server_of(participant) if participant else canonical_server_name(fed[1])
        if server is None:
            raise _Fail(Code.BAD_REQUEST, "participant_id is @user:server (or a server name)")
        refusal = await service.learn_descriptor(server, force=True)
        if refusal is not None:
            return json_error(refusal)
        keys = service.node.keys.keys(server)
        return Response.json(200, {"server_name": server, "key_id": keys.key_id,
                                   "old_keys": [o.key_id for o in keys.old]})
    if fed and fed[0] == "key":
        if fed == ["key"] and m == "GET":
            return Response.json(200, describe_keyring(service.node.keyring))
        if fed == ["key", "generate"] and m == "POST":
            if service.node.keyring.current is not None:
                raise _Fail(Code.CONFLICT, "a key exists already: use `key rotate`")
            return Response.json(200, describe_keyring(await service.generate_key()))
        if fed == ["key", "rotate"] and m == "POST":
            if service.node.keyring.current is None:
                raise _Fail(Code.OWN_KEY_MISSING, "no key to rotate: run `key generate` first")
            return Response.json(200, describe_keyring(await service.rotate_key()))
    if fed and len(fed) == 3 and fed[0] == "rooms" and fed[2] == "backfill" and m == "POST":
        body = _body(request)
        room_id = canonical_room_id(fed[1])
        if room_id is None:
            raise _Fail(Code.BAD_REQUEST, f"room_id: not a room id like !abc:peer.acme.com: {fed[1][:100]!r}")
        peer = _server(body.get("peer") or server_of(room_id), "peer")
        limit = body.get("limit", MAX_PULL)
        if type(limit) is not int or not 0 < limit <= MAX_PULL:
            raise _Fail(Code.BAD_REQUEST, f"limit is 1 to {MAX_PULL}")
        job = service.start_backfill(nursery, room_id, peer, limit)
        if body.get("wait"):
            await job.done.wait()
        return Response.json(200, job.view())
    if fed and len(fed) == 2 and fed[0] == "backfills" and m == "GET":
        job = service.jobs.get(int(fed[1])) if fed[1].isdigit() else None
        if job is None:
            raise _Fail(Code.NOT_FOUND, f"no backfill job {fed[1]}")
        return Response.json(200, job.view())
    if parts == ["tenants"]:
        if m == "GET":
            return Response.json(200, {"tenants": await service.store.list_tenants()})
        if m == "POST":
            body = _body(request)
            name = body.get("name")
            if not isinstance(name, str) or not name:
                raise _Fail(Code.BAD_REQUEST, "name is required")
            if await service.store.get_tenant(name):
                raise _Fail(Code.CONFLICT, f"tenant {name} exists")
            return Response.json(200, await service.store.create_tenant(name, bool(body.get("federation", True))))
    if parts[:1] == ["tenants"] and len(parts) == 2 and m == "PUT":
        if await service.store.get_tenant(parts[1]) is None:
            raise _Fail(Code.NOT_FOUND, f"no tenant {parts[1]}")
        await service.store.set_tenant_federation(parts[1], bool(_body(request).get("federation", True)))
        return Response.json(200, await service.store.get_tenant(parts[1]))
    if parts == ["users"]:
        if m == "GET":
            users = [{k: v for k, v in u.items() if k != "token_hash"} for u in await service.store.list_users()]
            return Response.json(200, {"users": users})
        if m == "POST":
            body = _body(request)
            name, tenant = body.get("name"), body.get("tenant")
            try:
                uid = user_id(str(name), service.config.server_name)
            except ValueError as exc:
                raise _Fail(Code.BAD_REQUEST, str(exc))
            if not isinstance(tenant, str) or await service.store.get_tenant(tenant) is None:
                raise _Fail(Code.NOT_FOUND, f"no tenant {tenant}: create it first")
            if await service.store.get_user(uid):
                raise _Fail(Code.CONFLICT, f"user {uid} exists")
            token = "swu_" + os.urandom(24).hex()
            await service.store.create_user(uid, str(name), tenant, token_hash(token))
            return Response.json(200, {"user_id": uid, "tenant": tenant, "access_token": token})
    raise _Fail(Code.NOT_FOUND, f"no admin endpoint {m} {request.path[:100]}")
