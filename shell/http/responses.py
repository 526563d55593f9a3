"""JSON Schemas of what the client and admin APIs answer with ``200``.

The route table (:mod:`.routes`) names one of these per endpoint; the OpenAPI
document publishes them and schemathesis checks every answer of a real daemon
against them (tests/test_api_fuzz.py).
"""

from __future__ import annotations

from typing import Any

from scaiwave_federation.core import MODES, ROOM_TYPES

__all__ = [
    "obj", "DESCRIPTOR", "PEERS", "HANDSHAKE", "RETRY", "POLICY", "REFRESH", "KEYRING", "BACKFILL_JOB",
    "TENANT", "TENANTS", "USERS", "NEW_USER", "ROOM", "ROOMS", "NOTIFICATIONS", "MEMBERSHIP", "DM", "INVITE",
    "POSTED", "MESSAGES", "OPENAPI", "POLICY_CHANGE", "PEER", "FORGOTTEN", "USER", "TOKEN",
]

STR: dict[str, Any] = {"type": "string"}
INT: dict[str, Any] = {"type": "integer"}
MS: dict[str, Any] = {"type": "integer", "description": "milliseconds since the Unix epoch"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(required: dict[str, Any], optional: dict[str, Any] | None = None, *, closed: bool = True) -> dict[str, Any]:
    """An object schema: these fields always present, ``optional`` ones maybe."""
    out: dict[str, Any] = {"type": "object", "properties": {**required, **(optional or {})}, "required": sorted(required)}
    if closed:
        out["additionalProperties"] = False
    return out


def array(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": item}


_ERROR_VIEW = obj({"code": STR, "message": STR, "at": MS})
_OLD_KEY = obj({"key_id": STR, "public_key": STR, "expired_at": nullable(INT)})

DESCRIPTOR = obj({"server_name": STR, "protocol_versions": array(STR), "federation_endpoint": STR,
                  "public_key": STR, "key_id": STR, "valid_until": INT, "old_keys": array(_OLD_KEY),
                  "signature": STR}, closed=False)
PEER = obj({"server_name": STR, "state": STR, "protocol_version": nullable(STR), "key_id": nullable(STR),
            "last_seen": nullable(MS), "last_error": nullable(_ERROR_VIEW), "failures": INT,
            "retry_at": nullable(MS), "pending": INT, "paused": {"type": "boolean"}})
PEERS = obj({"peers": array(PEER)})
HANDSHAKE = obj({"server_name": STR, "state": {"const": "active"}, "protocol_version": STR, "key_id": STR})
RETRY = obj({"server_name": STR, "requeued": INT})
POLICY = obj({"default_mode": {"enum": list(MODES)}, "allowed_peers": array(STR), "blocked_peers": array(STR)})
POLICY_CHANGE = obj({"policy": POLICY, "changed": {"type": "boolean"}, "dry_run": {"type": "boolean"},
                     "changes": array(STR), "cut_off": array(obj({"server_name": STR, "code": STR, "message": STR}))})
FORGOTTEN = obj({"server_name": STR, "dropped": INT})
REFRESH = obj({"server_name": STR, "key_id": nullable(STR), "old_keys": array(STR)})
KEYRING = obj({"key_id": nullable(STR), "public_key": STR, "created_at": nullable(MS),
               "rotation_due_at": nullable(MS), "old_keys": array(_OLD_KEY)})
BACKFILL_JOB = obj({"id": INT, "room_id": STR, "peer": STR, "limit": INT, "stored": INT,
                    "state": {"enum": ["running", "done", "failed"]}, "error": nullable(obj({"code": STR, "message": STR})),
                    "refused": array(obj({"code": STR, "message": STR}, closed=False)), "reached_start": {"type": "boolean"},
                    "catch_up": {"type": "boolean"}, "expected": nullable(INT)})
TENANT = obj({"name": STR, "federation_enabled": {"type": "boolean"}})
TENANTS = obj({"tenants": array(TENANT)})
USER = obj({"user_id": STR, "name": STR, "tenant": STR, "deactivated_at": nullable(MS)})
USERS = obj({"users": array(USER)})
TOKEN = obj({"user_id": STR, "access_token": STR})
NEW_USER = obj({"user_id": STR, "tenant": STR, "access_token": STR})
ROOM = obj({"room_id": STR, "room_type": {"enum": list(ROOM_TYPES)}})
ROOMS = obj({"rooms": array(obj({"room_id": STR, "room_type": STR, "host": STR, "tenant": nullable(STR),
                                 "creator": STR, "created_at": MS, "membership": STR}, closed=False))})
NOTIFICATIONS = obj({"notifications": array(obj({"type": {"const": "invite"}, "room_id": STR, "room_type": STR,
                                                 "inviter": STR, "origin": STR, "at": MS}))})
MEMBERSHIP = obj({"room_id": STR, "membership": {"enum": ["join", "decline", "leave"]}, "event_id": STR})
#: GET /v1/admin/federation/limits (see core.limits: its view's fields).
LIMITS = {"type": "object", "required": ["settings", "tracked", "descriptor_fetches", "busy", "limited"]}
DM = obj({"room_id": STR, "to": STR, "invite": STR})
INVITE = obj({"room_id": STR, "user": STR, "invite": STR})
POSTED = obj({"event_id": STR, "depth": INT})
MESSAGES = obj({"room_id": STR, "events": INT,
                "messages": array(obj({"event_id": STR, "depth": INT, "sender": STR, "body": nullable(STR), "ts": MS}))})
OPENAPI = {"type": "object", "required": ["openapi", "paths"]}
