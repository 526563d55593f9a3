"""Server descriptors: what ``GET /.well-known/scaiwave`` publishes, and how a peer checks it.

The descriptor is JSON so an admin can read it with curl. It is signed by the
server's current key over the canonical CBOR encoding of every field except
``signature`` (with ``Domain.DESCRIPTOR``). JSON has no canonical form, so this
is the one object the verifier re-encodes; the mapping from the JSON fields to
CBOR is fixed (text, integers, lists, maps), so both sides get the same bytes.

Fields: ``server_name``, ``protocol_versions``, ``federation_endpoint``,
``public_key`` and ``key_id`` of the current key (empty strings until a key is
generated), ``valid_until`` (ms: when the current key is due to rotate),
``old_keys`` (each ``key_id``, ``public_key``, ``expired_at``), ``signature``.
"""

from __future__ import annotations

import json
from typing import Any

from .codes import Code, LocalProtocolError, Refused
from .keys import Domain, KeyRing, OldKey, ServerKeys, key_id_for, sign, verify
from .wire import b64d, b64e, encode

__all__ = ["PROTOCOL_VERSIONS", "build_descriptor", "parse_descriptor", "MAX_DESCRIPTOR_BYTES"]

#: Protocol versions this implementation speaks, best first.
PROTOCOL_VERSIONS: tuple[str, ...] = ("scaiwave-fed/1",)
MAX_DESCRIPTOR_BYTES = 64 * 1024
_MAX_OLD_KEYS = 256

_FIELDS = (
    "server_name",
    "protocol_versions",
    "federation_endpoint",
    "public_key",
    "key_id",
    "valid_until",
    "old_keys",
)


def build_descriptor(
    server_name: str,
    keyring: KeyRing,
    *,
    federation_endpoint: str,
    protocol_versions: tuple[str, ...] = PROTOCOL_VERSIONS,
) -> dict[str, Any]:
    """Our descriptor as a JSON-ready dict, signed by the current key.

    Without a key, ``public_key``/``key_id``/``signature`` are empty strings
    and ``valid_until`` is 0: the descriptor then says "not federating yet".
    """
    cur = keyring.current
    body: dict[str, Any] = {
        "server_name": server_name,
        "protocol_versions": list(protocol_versions),
        "federation_endpoint": federation_endpoint,
        "public_key": b64e(cur.public_key) if cur else "",
        "key_id": cur.key_id if cur else "",
        "valid_until": keyring.rotation_due_at() or 0,
        "old_keys": [
            {"key_id": o.key_id, "public_key": b64e(o.public_key), "expired_at": o.expired_at}
            for o in keyring.old
        ],
    }
    body["signature"] = b64e(sign(cur, Domain.DESCRIPTOR, encode(body))) if cur else ""
    return body


def parse_descriptor(data: bytes, expected_server: str) -> tuple[ServerKeys, tuple[str, ...], dict[str, Any]] | Refused:
    """Check a fetched descriptor and return ``(keys, protocol_versions, fields)``.

    ``data`` is the raw response body; ``expected_server`` is the name we asked
    for. Refuses with ``too_large``, ``invalid_descriptor`` (shape, missing
    key, bad self-signature) or ``server_name_mismatch``.
    """
    if len(data) > MAX_DESCRIPTOR_BYTES:
        return Refused(Code.TOO_LARGE, f"descriptor is {len(data)} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return Refused(Code.INVALID_DESCRIPTOR, f"descriptor is not JSON: {str(exc)[:80]}")
    shape = _check_shape(doc)
    if shape is not None:
        return shape
    if doc["server_name"] != expected_server:
        return Refused(
            Code.SERVER_NAME_MISMATCH,
            f"asked {expected_server}, descriptor names {doc['server_name'][:100]}",
        )
    if not doc["public_key"]:
        return Refused(Code.INVALID_DESCRIPTOR, f"{expected_server} has no federation key yet")
    public_key = b64d(doc["public_key"])
    signature = b64d(doc["signature"])
    if public_key is None or len(public_key) != 32 or signature is None:
        return Refused(Code.INVALID_DESCRIPTOR, "public_key or signature is not base64url")
    if key_id_for(public_key) != doc["key_id"]:
        return Refused(Code.INVALID_DESCRIPTOR, "key_id does not match public_key")
    old: list[OldKey] = []
    for entry in doc["old_keys"]:
        pk = b64d(entry["public_key"])
        if pk is None or len(pk) != 32 or key_id_for(pk) != entry["key_id"]:
            return Refused(Code.INVALID_DESCRIPTOR, f"old key {entry['key_id'][:40]} is malformed")
        old.append(OldKey(entry["key_id"], pk, entry["expired_at"]))
    signed = {k: doc[k] for k in _FIELDS}
    try:
        signed_bytes = encode(signed)
    except LocalProtocolError:
        # JSON admits lone surrogates (the escape \ud800) that have no UTF-8, hence no CBOR, form.
        return Refused(Code.INVALID_DESCRIPTOR, "descriptor text is not valid Unicode")
    if not verify(public_key, Domain.DESCRIPTOR, signed_bytes, signature):
        return Refused(Code.INVALID_DESCRIPTOR, "descriptor self-signature does not verify")
    keys = ServerKeys(expected_server, doc["key_id"], public_key, tuple(old))
    return keys, tuple(doc["protocol_versions"]), doc


def _is_int(v: object) -> bool:
    return type(v) is int and 0 <= v < 1 << 63


def _check_shape(doc: object) -> Refused | None:
    bad = Refused(Code.INVALID_DESCRIPTOR, "descriptor fields are missing or of the wrong type")
    if not isinstance(doc, dict) or set(doc) != set(_FIELDS) | {"signature"}:
        return bad
    for name in ("server_name", "federation_endpoint", "public_key", "key_id", "signature"):
        if not isinstance(doc[name], str) or len(doc[name]) > 1024:
            return bad
    versions = doc["protocol_versions"]
    if not isinstance(versions, list) or not versions or len(versions) > 32:
        return bad
    if not all(isinstance(v, str) and 0 < len(v) <= 64 for v in versions):
        return bad
    if not _is_int(doc["valid_until"]):
        return bad
    olds = doc["old_keys"]
    if not isinstance(olds, list) or len(olds) > _MAX_OLD_KEYS:
        return bad
    for entry in olds:
        if not isinstance(entry, dict) or set(entry) != {"key_id", "public_key", "expired_at"}:
            return bad
        if not (isinstance(entry["key_id"], str) and isinstance(entry["public_key"], str)):
            return bad
        if not _is_int(entry["expired_at"]):
            return bad
    return None
