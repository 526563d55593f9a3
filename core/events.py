"""Events: the signed, hash-chained units of room history.

Wire form. An event travels as an *envelope*, the canonical CBOR array
``[body, key_id, signature]``: ``body`` is the canonical CBOR bytes of the
event's fields, ``signature`` is ed25519 over ``Domain.EVENT + body`` by the
origin server's key ``key_id``. The event id is ``sha256(body)``: a content
hash, so the signature is checked over exactly the bytes received and the id
never depends on a re-encoding.

Body fields: ``v`` (1), ``room_id``, ``room_type``, ``depth`` (the host's
order: 1 for the room's first event, 0 for a *proposal*, below), ``prev``
(the 32-byte id of the event at ``depth - 1``; ``null`` at depth 1 and on
proposals), ``origin`` (the signing server), ``sender`` (``@name:server``),
``type``, ``ts`` (ms), ``content`` (a map), and on chained events optionally
``source``.

Proposals. A room lives on its host server, which orders its events. A user
on another server writes to the room by sending the host a *proposal*: an
event with depth 0 signed by the user's own server. The host chains it as a
new event whose ``source`` is the proposal's envelope, so anyone can check
that the sender's server really wrote what the host relayed: the host can
order and refuse, but cannot forge a foreign user's words.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from operator import itemgetter

import cbor2
from typing import Any, Callable, NamedTuple, Sequence

from .codes import Code, Refused
from .keys import BatchVerifier, Domain, ServerKeys, SigningKey, sign, verify_batch
from .names import server_of
from . import wire
from .wire import b64e, decode, encode

__all__ = [
    "Event",
    "NeedKeys",
    "make_event",
    "decode_event",
    "verify_events",
    "event_id_text",
    "MAX_EVENT_BYTES",
    "FEDERATED_EVENT_TYPES",
]

MAX_EVENT_BYTES = 64 * 1024
FEDERATED_EVENT_TYPES = frozenset({"m.create", "m.member", "m.message"})
_REQUIRED = frozenset({"v", "room_id", "room_type", "depth", "prev", "origin", "sender", "type", "ts", "content"})
_OPTIONAL = frozenset({"source"})
_ALLOWED = _REQUIRED | _OPTIONAL
# The two key sequences a decoded body can have: decoding guarantees canonical
# order, so comparing the tuple of keys checks "required + optional, nothing else".
_BODY_KEYS = tuple(sorted(_REQUIRED, key=lambda k: (len(k), k)))
_BODY_KEYS_SOURCE = tuple(sorted(_ALLOWED, key=lambda k: (len(k), k)))
_MAX_INT = 1 << 63


@dataclass(frozen=True, slots=True)
class NeedKeys:
    """Effect: the keys of ``server`` (its descriptor) are needed to go on.

    ``key_id`` is the id that was not found (``None``: nothing known of the
    server at all). Feed the fetched descriptor back and retry.
    """

    server: str
    key_id: str | None = None


class Event(NamedTuple):
    """A decoded event whose id is the hash of its body. Immutable.

    Decoding does not check the signature; :func:`verify_events` does.
    (A NamedTuple, not a frozen dataclass: building one is 5x cheaper, and
    ingest builds one per received event.)
    """

    event_id: bytes
    envelope: bytes
    body: bytes
    key_id: str
    signature: bytes
    room_id: str
    room_type: str
    depth: int
    prev: bytes | None
    origin: str
    sender: str
    type: str
    ts: int
    content: dict
    source: bytes | None = None

    @property
    def id_text(self) -> str:
        """The event id as text: ``$`` + base64url of the hash."""
        return event_id_text(self.event_id)

    def as_record(self) -> dict[str, Any]:
        """The fields storage keeps for this event."""
        return {
            "event_id": self.event_id,
            "depth": self.depth,
            "sender": self.sender,
            "origin": self.origin,
            "type": self.type,
            "ts": self.ts,
            "envelope": self.envelope,
        }


def event_id_text(event_id: bytes) -> str:
    """Text form of a raw 32-byte event id."""
    return "$" + b64e(event_id)


def make_event(
    key: SigningKey,
    *,
    room_id: str,
    room_type: str,
    depth: int,
    prev: bytes | None,
    origin: str,
    sender: str,
    type: str,
    ts: int,
    content: dict,
    source: bytes | None = None,
) -> Event:
    """Build and sign an event; ``depth=0`` with ``prev=None`` makes a proposal.

    Raises :class:`~.codes.LocalProtocolError` if the fields cannot be encoded.
    """
    fields: dict[str, Any] = {
        "v": 1,
        "room_id": room_id,
        "room_type": room_type,
        "depth": depth,
        "prev": prev,
        "origin": origin,
        "sender": sender,
        "type": type,
        "ts": ts,
        "content": content,
    }
    if source is not None:
        fields["source"] = source
    body = encode(fields)
    signature = sign(key, Domain.EVENT, body)
    envelope = encode([body, key.key_id, signature])
    event = decode_event(envelope)
    if isinstance(event, Refused):
        # Our own fields failed our own schema: a caller bug, not remote data.
        from .codes import LocalProtocolError

        raise LocalProtocolError(f"cannot build event: {event}")
    return event


def _split_envelope(envelope: bytes) -> tuple[bytes, str, bytes] | None:
    """Fast path: split the one canonical shape an envelope can have.

    ``[body, key_id, signature]`` with a body of 24 to 65535 bytes, a key id
    of 1 to 64 characters and a 64-byte signature, every head minimal and
    nothing after. Returns ``None`` for anything else, which then goes
    through the generic :func:`~.wire.decode` (same verdicts, just slower).
    """
    size = len(envelope)
    if size < 70 or envelope[0] != 0x83:
        return None
    head = envelope[1]
    if head == 0x58:
        length, pos = envelope[2], 3
        if length < 24:
            return None
    elif head == 0x59:
        length, pos = (envelope[2] << 8) | envelope[3], 4
        if length < 256:
            return None
    else:
        return None
    body = envelope[pos:pos + length]
    pos += length
    if pos + 68 > size:
        return None
    head = envelope[pos]
    if 0x61 <= head <= 0x77:
        key_len, pos = head - 0x60, pos + 1
    elif head == 0x78 and 24 <= envelope[pos + 1] <= 64:
        key_len, pos = envelope[pos + 1], pos + 2
    else:
        return None
    if pos + key_len + 66 != size or envelope[pos + key_len:pos + key_len + 2] != b"\x58\x40":
        return None
    try:
        key_id = envelope[pos:pos + key_len].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return body, key_id, envelope[pos + key_len + 2:]


_FIELDS = itemgetter("v", "room_id", "room_type", "depth", "origin", "sender", "type", "ts", "content", "prev")
_FIELD_TYPES = (int, str, str, int, str, str, str, int, dict)
_KEY_ORDERS = frozenset({_BODY_KEYS, _BODY_KEYS_SOURCE})
_STRICT = dict(wire.STRICT_OPTIONS, max_depth=wire.MAX_DEPTH)
_loads, _dumps, _sha256 = cbor2.loads, cbor2.dumps, hashlib.sha256


def decode_event(envelope: bytes, *, max_size: int = MAX_EVENT_BYTES) -> Event | Refused:
    """Strictly decode an envelope and its body; compute the event id.

    Refuses with ``too_large``, ``malformed`` or ``non_canonical``.

    The usual event (canonical envelope, small canonical body of the right
    shape, a chained event of its host) takes a fast path that makes the
    same checks with fewer Python steps; anything it does not accept goes
    through :func:`_decode_event_generic`, which gives every verdict. A
    property test checks that both accept exactly the same events.
    """
    split = _split_envelope(envelope) if type(envelope) is bytes and len(envelope) <= max_size else None
    if split is not None:
        body_bytes = split[0]
        if len(body_bytes) <= wire.PRESCAN_ABOVE or wire.prescan(body_bytes, wire.MAX_DEPTH) is None:
            try:
                body = _loads(body_bytes, **_STRICT)
            except Exception:
                body = None
            if type(body) is dict and tuple(body) in _KEY_ORDERS:
                f = _FIELDS(body)
                v, room_id, room_type, depth, origin, sender, etype, ts, content, prev = f
                source = body.get("source")
                if (
                    tuple(map(type, f[:9])) == _FIELD_TYPES
                    and v == 1
                    and 1 < depth < _MAX_INT
                    and 0 <= ts < _MAX_INT
                    and type(prev) is bytes
                    and len(prev) == 32
                    and (source is None or type(source) is bytes)
                    and origin == server_of(room_id)
                    and origin is not None
                    and server_of(sender) is not None
                    and wire.maps_in_order(content)
                    and _dumps(body) == body_bytes
                    and not (b"\xfb" in body_bytes and wire.has_float(body))
                ):
                    return Event(_sha256(body_bytes).digest(), envelope, body_bytes, split[1], split[2], room_id,
                                 room_type, depth, prev, origin, sender, etype, ts, content, source)
    return _decode_event_generic(envelope, max_size=max_size, split=split)


def _decode_event_generic(envelope: bytes, *, max_size: int = MAX_EVENT_BYTES,
                          split: tuple[bytes, str, bytes] | None = None) -> Event | Refused:
    """:func:`decode_event` for any input: every check, every verdict."""
    if split is None:
        outer = decode(envelope, max_size=max_size, max_depth=2)
        if isinstance(outer, Refused):
            return outer
        if not (
            type(outer) is list
            and len(outer) == 3
            and type(outer[0]) is bytes
            and type(outer[1]) is str
            and type(outer[2]) is bytes
            and len(outer[2]) == 64
            and 0 < len(outer[1]) <= 64
        ):
            return Refused(Code.MALFORMED, "an event envelope is [body, key_id, signature]")
        split = outer[0], outer[1], outer[2]
    body_bytes, key_id, signature = split
    body = decode(body_bytes, max_size=max_size)
    if type(body) is not dict:
        return body if isinstance(body, Refused) else Refused(Code.MALFORMED, "an event body is a map")
    keys = tuple(body)
    if keys != _BODY_KEYS and keys != _BODY_KEYS_SOURCE:
        return Refused(Code.MALFORMED, "event body fields are missing or unknown")
    room_id, room_type, depth, prev = body["room_id"], body["room_type"], body["depth"], body["prev"]
    origin, sender, etype, ts = body["origin"], body["sender"], body["type"], body["ts"]
    source = body.get("source")
    if not (
        type(body["v"]) is int
        and body["v"] == 1
        and type(room_id) is str
        and type(room_type) is str
        and type(origin) is str
        and type(sender) is str
        and type(etype) is str
        and type(depth) is int
        and type(ts) is int
        and 0 <= depth < _MAX_INT
        and 0 <= ts < _MAX_INT
        and type(body["content"]) is dict
        and (source is None or (type(source) is bytes and depth > 0))
    ):
        return Refused(Code.MALFORMED, "event body fields have the wrong types")
    if depth <= 1:
        if prev is not None:
            return Refused(Code.MALFORMED, "the first event and proposals have no prev")
    elif type(prev) is not bytes or len(prev) != 32:
        return Refused(Code.MALFORMED, "prev is a 32-byte event id")
    host, sender_server = server_of(room_id), server_of(sender)
    if host is None or sender_server is None:
        return Refused(Code.MALFORMED, "sender and room_id carry a server name")
    # The host orders (and signs) the chain; a proposal is signed by the
    # sender's own server.
    if origin != (host if depth > 0 else sender_server):
        return Refused(Code.MALFORMED, f"event origin {origin[:80]} may not sign this event")
    # Positional: keyword passing of 15 fields costs ~0.7 us per event (in field order).
    return Event(hashlib.sha256(body_bytes).digest(), envelope, body_bytes, key_id, signature, room_id, room_type,
                 depth, prev, origin, sender, etype, ts, body["content"], source)


KeyLookup = Callable[[str], ServerKeys | None]
_EVENT_DOMAIN = Domain.EVENT


def verify_events(
    envelopes: Sequence[bytes],
    lookup: KeyLookup,
    *,
    verifier: BatchVerifier = verify_batch,
) -> list[Event | Refused | NeedKeys]:
    """Decode and signature-check a batch of envelopes, one result per input.

    ``lookup(server)`` returns what is known of a server's keys, or ``None``.
    Each event must be signed by its ``origin`` under the key that was current
    at its ``ts``; a chained event carrying a ``source`` proposal must match
    it field for field, and the proposal must be signed by the sender's server.
    An unknown key yields :class:`NeedKeys` for that event. All signatures of
    the batch go to ``verifier`` in one call, so the shell can spread them over
    threads. Chain links are checked elsewhere (they need the neighbours).
    """
    results: list[Event | Refused | NeedKeys] = []
    jobs: list[tuple[bytes, bytes, bytes]] = []
    owners: list[int] = []  # result index each signature job belongs to
    known: dict[str, ServerKeys | None] = {}  # lookups, once per server per batch
    for envelope in envelopes:
        index = len(results)
        event = decode_event(envelope)
        if type(event) is not Event:
            results.append(event)
            continue
        origin = event.origin
        keys = known[origin] if origin in known else known.setdefault(origin, lookup(origin))
        # The common case inline: signed by the current key (any ts).
        if keys is not None and event.key_id == keys.key_id and keys.public_key is not None:
            job: tuple[bytes, bytes, bytes] | Refused | NeedKeys = (keys.public_key, _EVENT_DOMAIN + event.body,
                                                                    event.signature)
        else:
            job = _signature_job(event, lookup)
        if type(job) is not tuple:
            results.append(job)  # type: ignore[arg-type]
            continue
        results.append(event)
        jobs.append(job)  # type: ignore[arg-type]
        owners.append(index)
        if event.source is not None:
            proposal_job = _proposal_job(event, lookup)
            if not isinstance(proposal_job, tuple):
                results[index] = proposal_job
                continue
            jobs.append(proposal_job)
            owners.append(index)
    if jobs:
        for ok, index in zip(verifier(jobs), owners):
            if not ok and not isinstance(results[index], Refused):
                results[index] = Refused(Code.BAD_SIGNATURE, f"event {_describe(results[index])} signature does not verify")
    return results


def _describe(event: object) -> str:
    if isinstance(event, Event):
        return f"{event.id_text} (depth {event.depth})"
    return "?"


def _signature_job(event: Event, lookup: KeyLookup) -> tuple[bytes, bytes, bytes] | Refused | NeedKeys:
    keys = lookup(event.origin)
    if keys is None:
        return NeedKeys(event.origin, event.key_id)
    public_key = keys.for_event(event.key_id, event.ts)
    if public_key is None:
        return NeedKeys(event.origin, event.key_id)
    if isinstance(public_key, Refused):
        return public_key
    return (public_key, Domain.EVENT + event.body, event.signature)


def _proposal_job(event: Event, lookup: KeyLookup) -> tuple[bytes, bytes, bytes] | Refused | NeedKeys:
    proposal = decode_event(event.source or b"")
    if isinstance(proposal, Refused):
        return Refused(proposal.code, f"source proposal: {proposal.detail}")
    if not (
        proposal.depth == 0
        and proposal.room_id == event.room_id
        and proposal.sender == event.sender
        and proposal.type == event.type
        and proposal.content == event.content
        and proposal.origin == server_of(event.sender)
    ):
        return Refused(Code.MALFORMED, f"event {event.id_text} does not match its source proposal")
    return _signature_job(proposal, lookup)
