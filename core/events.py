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
from typing import Any, Callable, NamedTuple, Sequence

from .codes import Code, Refused
from .layouts import read_event
from .keys import BatchVerifier, Domain, ServerKeys, SigningKey, sign, verify_batch
from .names import server_of
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
    content: dict[str, Any]
    source: bytes | None = None

    @property
    def id_text(self) -> str:
        """The event id as text: ``$`` + base64url of the hash."""
        return event_id_text(self.event_id)

    def as_record(self) -> dict[str, Any]:
        """The fields storage keeps for this event (with ``proposal_id``, the
        id of the proposal it chains, when it carries a ``source``)."""
        record = {
            "event_id": self.event_id,
            "depth": self.depth,
            "sender": self.sender,
            "origin": self.origin,
            "type": self.type,
            "ts": self.ts,
            "envelope": self.envelope,
        }
        if self.source is not None:
            proposal = decode_event(self.source)
            if isinstance(proposal, Event):
                record["proposal_id"] = proposal.event_id
        return record


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
    content: dict[str, Any],
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


_new_event = tuple.__new__  # Event(*fields) without NamedTuple's Python-level __new__


def decode_event(envelope: bytes, *, max_size: int = MAX_EVENT_BYTES) -> Event | Refused:
    """Strictly decode an envelope and its body; compute the event id.

    Refuses with ``too_large``, ``malformed`` or ``non_canonical``.

    An envelope in the one common layout (see :mod:`.layouts`) is read
    without a CBOR decoder; anything else goes through
    :func:`_decode_event_generic`, which gives every verdict. The shortcut
    only ever accepts, and a property test and the fuzz harness check that
    it accepts exactly what the generic decoder accepts, as the same event.
    """
    if type(envelope) is bytes and len(envelope) <= max_size:
        fields = read_event(envelope)
        if fields is not None:
            return _new_event(Event, fields)
    return _decode_event_generic(envelope, max_size=max_size)


def _decode_event_generic(envelope: bytes, *, max_size: int = MAX_EVENT_BYTES) -> Event | Refused:
    """:func:`decode_event` for any input: every check, every verdict."""
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
    body_bytes, key_id, signature = outer
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
_UNSEEN = object()


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
        # decode_event, inlined: this loop is the hot path of every ingest.
        fields = read_event(envelope) if type(envelope) is bytes and len(envelope) <= MAX_EVENT_BYTES else None
        if fields is not None:
            event = _new_event(Event, fields)
        else:
            generic = _decode_event_generic(envelope)
            if type(generic) is not Event:
                results.append(generic)
                continue
            event = generic
        origin = event.origin
        keys: Any = known.get(origin, _UNSEEN)
        if keys is _UNSEEN:
            keys = known[origin] = lookup(origin)
        # The common case inline: signed by the current key (any ts).
        if keys is not None and event.key_id == keys.key_id and keys.public_key is not None:
            job: tuple[bytes, bytes, bytes] | Refused | NeedKeys = (keys.public_key, _EVENT_DOMAIN + event.body,
                                                                    event.signature)
        else:
            job = _signature_job(event, lookup)
            if type(job) is not tuple:
                results.append(job)  # type: ignore[arg-type]
                continue
        if event.source is None and event.depth > 0:
            # Sender authenticity: a host speaks for its own users only. A
            # chained event whose sender is on another server (a third server,
            # or the receiver itself) must carry that server's signed proposal.
            sender_server = server_of(event.sender)
            if sender_server != event.origin:
                results.append(Refused(Code.FORGED_SENDER, f"{event.origin[:100]} may not speak for "
                                                           f"{event.sender[:100]} without its proposal (source)"))
                continue
        index = len(results)
        results.append(event)
        jobs.append(job)  # type: ignore[arg-type]
        owners.append(index)
        if event.source is not None:
            proposal_job = _proposal_job(event, lookup)
            if type(proposal_job) is not tuple:
                results[index] = proposal_job  # type: ignore[assignment]
                continue
            jobs.append(proposal_job)
            owners.append(index)
    if jobs:
        verdicts = list(verifier(jobs))  # a list: read twice below
        if not all(verdicts):
            for ok, index in zip(verdicts, owners):
                if not ok and not isinstance(results[index], Refused):
                    results[index] = Refused(Code.BAD_SIGNATURE,
                                             f"event {_describe(results[index])} signature does not verify")
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
        and proposal.room_type == event.room_type
        and proposal.sender == event.sender
        and proposal.type == event.type
        and proposal.origin == server_of(event.sender)
        # Field for field: content compared as canonical bytes (1, 1.0 and
        # True are equal Python values, not equal words).
        and encode(proposal.content) == encode(event.content)
    ):
        return Refused(Code.MALFORMED, f"event {event.id_text} does not match its source proposal")
    # The host's signature over the chained event vouches that the proposal was
    # live when chained: its key must be listed and its signature verify, but a
    # later expired_at of that key cannot cut history short (docs/protocol.md,
    # "Keys' past"). Its signer picks its ts anyway, so checking ts against
    # expired_at here would protect nothing.
    keys = lookup(proposal.origin)
    public_key = keys.listed(proposal.key_id) if keys is not None else None
    if public_key is None:
        return NeedKeys(proposal.origin, proposal.key_id)
    return (public_key, Domain.EVENT + proposal.body, proposal.signature)
