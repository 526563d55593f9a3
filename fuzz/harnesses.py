"""One harness per decoder of untrusted bytes, and the check every input must pass.

A harness feeds one input to its decoder(s) and checks the *type* of what
comes back: a decoded value, a :class:`Refused`, or a documented effect
(:class:`NeedKeys`, :class:`Failed`, ...). Anything else, and any exception,
is a violation. :func:`execute` also times the input against a budget:

    budget = 20 ms + 0.5 ms per signature checked + 50 ms per MB of input

so the allowance covers the cryptography a valid input legitimately costs and
linear work on big bodies, but nothing super-linear. An input over budget is
run twice more and judged on its fastest run, so a GC pause or a busy machine
does not make a false report.

Harnesses (``HARNESSES``):

============  ==========================================================================
descriptor    ``parse_descriptor(data, "peer.test")``
event         ``decode_event``, and ``verify_events`` with the receiver's key lookup
request       ``parse_authorization(data.decode("latin-1"))`` and ``Federation.authenticate``
handshake     the responder's ``answer_hello`` and the initiator's ``reply_received``
page          ``decode_page`` and ``BackfillPuller.page_received`` (fresh and anchored)
txn           ``rooms.decode_events_body``, ``Federation.on_events`` and ``on_invite``
names         ``core.names``: the lenient and strict parsers agree, canonical forms are
              idempotent, and a policy judges every spelling of a name alike
============  ==========================================================================

Each harness also carries two input makers for the fuzzer: ``wrap`` puts a
randomly generated CBOR item where the decoder will reach it (inside an
envelope, a header, a page...), and ``structured`` mutates a seed's decoded
structure and re-signs it with the world's keys, so mutations get past the
signature checks to the rules behind them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import cbor2

from scaiwave_federation.core import (
    BackfillDone,
    BackfillPuller,
    Event,
    Failed,
    NeedKeys,
    PeerAgreed,
    Policy,
    Refused,
    SendRequest,
    StoreEvents,
    decode_event,
    decode_page,
    parse_descriptor,
    verify_events,
)
from scaiwave_federation.core.backfill import Page
from scaiwave_federation.core.events import _decode_event_generic
from scaiwave_federation.core.handshake import answer_hello
from scaiwave_federation.core.keys import Domain, ServerKeys, sign
from scaiwave_federation.core.names import (
    canonical_room_id,
    canonical_server_name,
    canonical_user_id,
    server_name_problem,
    server_of,
    valid_server_name,
)
from scaiwave_federation.core.node import InviteDecision
from scaiwave_federation.core.authz import Party
from scaiwave_federation.core.requests import SCHEME, Authenticated, ReplayGuard, SignedRequest, parse_authorization
from scaiwave_federation.core.rooms import decode_events_body
from scaiwave_federation.core.wire import b64d, b64e

from . import gen
from .world import ALICE, DM_ROOM, HOST, LOCAL, NOW, ROOM, TXN_BODY, TXN_TARGET, World, build_world

__all__ = [
    "Harness",
    "Violation",
    "Result",
    "execute",
    "make_harnesses",
    "budget_for",
    "BASE_BUDGET_S",
    "PER_SIGNATURE_S",
    "PER_MB_S",
]

BASE_BUDGET_S = 0.020
PER_SIGNATURE_S = 0.0005
PER_MB_S = 0.050


class Violation(Exception):
    """An input broke the invariant (wrong result type, exception, or too slow)."""

    def __init__(self, harness: str, data: bytes, reason: str) -> None:
        super().__init__(f"{harness}: {reason}")
        self.harness = harness
        self.data = data
        self.reason = reason


@dataclass(frozen=True)
class Harness:
    """A decoder under test. ``run`` returns an outcome string (for corpus
    feedback); the first ``|``-separated part is the primary decoder's verdict."""

    name: str
    run: Callable[[bytes], str]
    seeds: tuple[bytes, ...]
    wrap: Callable[[bytes, random.Random], bytes]
    structured: Callable[[random.Random], bytes]
    text: bool = False  # JSON/header text rather than CBOR


@dataclass(frozen=True)
class Result:
    """What one input did: its outcome, fastest run time and budget (seconds)."""

    outcome: str
    seconds: float
    budget: float
    signatures: int


class _Bad(Exception):
    """Raised inside a harness when a decoder returned a value of the wrong type."""


def budget_for(data: bytes, signatures: int) -> float:
    """The time an input may take, in seconds (see module doc)."""
    return BASE_BUDGET_S + PER_SIGNATURE_S * signatures + PER_MB_S * len(data) / (1 << 20)


def execute(harness: Harness, data: bytes, world: World, *, budget_scale: float = 1.0) -> Result:
    """Run one input through ``harness``; raise :class:`Violation` if it breaks the invariant."""
    best = None
    outcome = ""
    for _attempt in range(3):
        world.counter.count = 0
        start = time.perf_counter()
        try:
            outcome = harness.run(data)
        except _Bad as exc:
            raise Violation(harness.name, data, f"wrong result type: {exc}") from None
        except Exception:  # noqa: BLE001 - any exception is the finding
            raise Violation(harness.name, data, "exception:\n" + traceback.format_exc()) from None
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
        budget = budget_for(data, world.counter.count) * budget_scale
        if best <= budget:
            return Result(outcome, best, budget, world.counter.count)
    raise Violation(harness.name, data, f"too slow: {best * 1000:.1f} ms, budget {budget * 1000:.1f} ms "
                                        f"({world.counter.count} signatures, {len(data)} bytes)")


# -- outcome helpers -------------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]+")


def _refusal(r: Refused) -> str:
    return f"{r.code.value}:{_DIGITS.sub('#', r.detail)[:32]}"


def _expect(value: object, *types: type) -> object:
    if not isinstance(value, types):
        raise _Bad(f"got {type(value).__name__}, expected {' or '.join(t.__name__ for t in types)}: {value!r:.200}")
    return value


def _verdict(value: object, ok_type: type) -> str:
    """One result that must be ``ok_type`` or :class:`Refused`."""
    _expect(value, ok_type, Refused)
    return _refusal(value) if isinstance(value, Refused) else "ok"


def _effects(effects: object, *allowed: type) -> str:
    _expect(effects, list)
    parts = []
    for effect in effects:  # type: ignore[attr-defined]
        _expect(effect, *allowed)
        if isinstance(effect, Failed):
            _expect(effect.refusal, Refused)
            parts.append("failed:" + _refusal(effect.refusal))
        elif isinstance(effect, BackfillDone):
            parts.append(f"done:{effect.stored}:{effect.reached_start}:"
                         + (_refusal(effect.refusal) if effect.refusal else ""))
        elif isinstance(effect, StoreEvents):
            for event in effect.events:
                _expect(event, Event)
            parts.append(f"store:{len(effect.events)}")
        else:
            parts.append(type(effect).__name__)
    return ",".join(parts)


def _agree(what: str, fast: object, generic: object) -> None:
    """The fast layout readers (core.layouts) must give the generic decoder's verdict."""
    if isinstance(fast, Refused) and isinstance(generic, Refused):
        same = fast.code is generic.code
    elif isinstance(fast, Event) and isinstance(generic, Event):
        # Field by field, content by its encoding: a NaN in content is not equal to itself.
        same = fast[:13] == generic[:13] and fast.source == generic.source and (
            _enc(fast.content) == _enc(generic.content))
    else:
        same = fast == generic
    if not same:
        raise _Bad(f"{what}: the fast reader gave {str(fast)[:120]}, the generic decoder {str(generic)[:120]}")


def _enc(value: Any, canonical: bool = True) -> bytes:
    return cbor2.dumps(value, canonical=canonical)


def _loads(data: bytes) -> Any:
    return cbor2.loads(data)


def _raw_map(entries: list[tuple[bytes, bytes]]) -> bytes:
    return gen.cbor_head(5, len(entries)) + b"".join(k + v for k, v in entries)


def _raw_array(items: list[bytes]) -> bytes:
    return gen.cbor_head(4, len(items)) + b"".join(items)


def _t(text: str) -> bytes:
    return _enc(text)


def make_harnesses(world: World | None = None) -> tuple[World, dict[str, Harness]]:
    """Build the world (unless given) and the harnesses over it, by name."""
    w = world or build_world()
    harnesses = [
        _descriptor(w),
        _event(w),
        _request(w),
        _handshake(w),
        _page(w),
        _txn(w),
        _names(w),
    ]
    return w, {h.name: h for h in harnesses}


# -- event re-signing, shared by event/page/txn --------------------------------------

_EVENT_KEYS = ("v", "room_id", "room_type", "depth", "prev", "origin", "sender", "type", "ts", "content", "source")


def _resign_event(w: World, envelope: bytes, rng: random.Random) -> bytes:
    """Mutate an envelope's body and sign it again with the right world key."""
    try:
        body_bytes, key_id, _sig = _loads(envelope)
        body = _loads(body_bytes)
    except Exception:  # noqa: BLE001 - the seed may itself be a mutant
        return gen.mutate_bytes(envelope, rng)
    if isinstance(body, dict) and isinstance(body.get("source"), bytes) and rng.random() < 0.3:
        body = dict(body)
        body["source"] = _resign_event(w, body["source"], rng)
    else:
        body = gen.mutate_value(body, rng, keys=_EVENT_KEYS)
    try:
        new_body = _enc(body, canonical=rng.random() < 0.95)
    except Exception:  # noqa: BLE001 - unencodable mutant (e.g. a lone surrogate)
        return gen.mutate_bytes(envelope, rng)
    signer = w.key_for(key_id)
    if rng.random() < 0.2 and isinstance(body, dict):
        # Sign under the origin's current key instead (the event-time rule).
        key = w.key_of_server(body.get("origin"))
        signer = (None, key) if key else signer
    signature = sign(signer[1], Domain.EVENT, new_body) if signer else rng.randbytes(64)
    return _enc([new_body, signer[1].key_id if signer else key_id, signature])


def _wrap_event_body(item: bytes, rng: random.Random) -> bytes:
    """A generated item as the body (or envelope field) of an event."""
    roll = rng.random()
    if roll < 0.5:
        return _raw_array([gen.cbor_head(2, len(item)) + item, _t("ed25519:" + b64e(rng.randbytes(6))),
                           _enc(rng.randbytes(64))])
    if roll < 0.8:
        fields = {"v": _enc(1), "room_id": _t(ROOM), "room_type": _t("group"), "depth": _enc(3),
                  "prev": _enc(bytes(32)), "origin": _t(HOST), "sender": _t("@bob:peer.test"),
                  "type": _t("m.message"), "ts": _enc(NOW), "content": _enc({"body": "x"})}
        name = rng.choice(list(fields) + ["source", "extra"])
        fields[name] = item
        entries = sorted(((_t(k), v) for k, v in fields.items()), key=lambda kv: (len(kv[0]), kv[0]))
        body = _raw_map(entries)
        return _raw_array([gen.cbor_head(2, len(body)) + body, _t("ed25519:AAAAAAAA"), _enc(bytes(64))])
    return item


# -- descriptor ---------------------------------------------------------------------------

def _descriptor(w: World) -> Harness:
    def run(data: bytes) -> str:
        result = parse_descriptor(data, HOST)
        if isinstance(result, Refused):
            return _refusal(result)
        _expect(result, tuple)
        keys, versions, fields = result
        _expect(keys, ServerKeys)
        _expect(versions, tuple)
        _expect(fields, dict)
        return "ok"

    signers_by_pk = {key.public_key: key for _, key in w.signers.values()}

    def structured(rng: random.Random) -> bytes:
        try:
            doc = json.loads(rng.choice(w.seeds["descriptor"]))
        except ValueError:
            return b"{}"
        doc = gen.mutate_value(doc, rng, keys=("server_name", "old_keys", "valid_until", "key_id"))
        if isinstance(doc, dict) and rng.random() < 0.7:
            if rng.random() < 0.5:
                doc["server_name"] = HOST
            pk = b64d(doc.get("public_key", "")) if isinstance(doc.get("public_key"), str) else None
            key = signers_by_pk.get(pk or b"")
            if key is not None:
                unsigned = {k: v for k, v in doc.items() if k != "signature"}
                try:
                    doc["signature"] = b64e(sign(key, Domain.DESCRIPTOR, _enc(unsigned)))
                except Exception:  # noqa: BLE001 - unencodable mutant
                    pass
        text = json.dumps(doc, ensure_ascii=rng.random() < 0.5, default=lambda o: o.decode("latin-1"))
        return text.encode("utf-8", "surrogatepass")

    def wrap(item: bytes, rng: random.Random) -> bytes:
        roll = rng.random()
        if roll < 0.15:
            return gen.json_nasty(rng)
        if roll < 0.3:
            return item  # CBOR is not JSON: must be refused cleanly
        doc = json.loads(w.seeds["descriptor"][0])
        doc[rng.choice(list(doc) + ["extra"])] = gen.json_value(rng)
        return json.dumps(doc).encode("utf-8", "surrogatepass")

    return Harness("descriptor", run, tuple(w.seeds["descriptor"]), wrap, structured, text=True)


# -- event --------------------------------------------------------------------------------

def _event(w: World) -> Harness:
    lookup = w.local.lookup

    def run(data: bytes) -> str:
        decoded = decode_event(data)
        _agree("event", decoded, _decode_event_generic(data))
        first = _verdict(decoded, Event)
        results = verify_events([data], lookup, verifier=w.counter)
        _expect(results, list)
        if len(results) != 1:
            raise _Bad(f"verify_events gave {len(results)} results for one envelope")
        result = _expect(results[0], Event, Refused, NeedKeys)
        second = _refusal(result) if isinstance(result, Refused) else type(result).__name__
        return f"{first}|{second}"

    def structured(rng: random.Random) -> bytes:
        return _resign_event(w, rng.choice(w.seeds["event"]), rng)

    return Harness("event", run, tuple(w.seeds["event"]), _wrap_event_body, structured)


# -- request signatures ---------------------------------------------------------------------

_REQUEST_KEYS = ("origin", "destination", "method", "target", "time", "digest", "key_id")


def _request(w: World) -> Harness:
    node = w.local

    def run(data: bytes) -> str:
        text = data.decode("latin-1")
        first = _verdict(parse_authorization(text), SignedRequest)
        if len(node.requests.replay) > 10_000:
            node.requests.replay = ReplayGuard()  # keep a long run's memory flat
        auth = node.authenticate(method="PUT", target=TXN_TARGET, authorization=text, body=TXN_BODY, now=NOW)
        _expect(auth, Authenticated, Refused, NeedKeys)
        second = _refusal(auth) if isinstance(auth, Refused) else type(auth).__name__
        return f"{first}|{second}"

    def structured(rng: random.Random) -> bytes:
        header = rng.choice(w.seeds["request"]).decode("latin-1")
        scheme, _, token = header.partition(" ")
        signed_text, _, _sig = token.partition(".")
        try:
            fields = _loads(b64d(signed_text) or b"")
        except Exception:  # noqa: BLE001
            return gen.mutate_bytes(header.encode("latin-1"), rng)
        if rng.random() < 0.2 and isinstance(fields, dict):
            fields = dict(fields, digest=hashlib.sha256(TXN_BODY).digest())
        fields = gen.mutate_value(fields, rng, keys=_REQUEST_KEYS)
        try:
            signed = _enc(fields, canonical=rng.random() < 0.95)
        except Exception:  # noqa: BLE001
            return gen.mutate_bytes(header.encode("latin-1"), rng)
        signer = w.key_for(fields.get("key_id")) if isinstance(fields, dict) else None
        sig = sign(signer[1], Domain.REQUEST, signed) if signer else rng.randbytes(64)
        sep = rng.choice((" ", " ", " ", "  ", "\t", ""))
        text = f"{scheme if rng.random() < 0.95 else scheme.lower()}{sep}{b64e(signed)}.{b64e(sig)}"
        return text.encode("latin-1", "replace")

    def wrap(item: bytes, rng: random.Random) -> bytes:
        roll = rng.random()
        if roll < 0.6:
            text = f"{SCHEME} {b64e(item)}.{b64e(rng.randbytes(rng.choice((64, 64, 63, 0))))}"
        elif roll < 0.8:
            text = f"{SCHEME} " + item.decode("latin-1")
        else:
            text = rng.choice(("", " ", SCHEME, SCHEME + " ", SCHEME + " .", "Bearer abc", SCHEME + " " + "A" * 3000,
                               SCHEME + " ====.====", SCHEME + " \u00ff\u00fe.\u00e9"))
        return text.encode("latin-1", "replace")

    return Harness("request", run, tuple(w.seeds["request"]), wrap, structured, text=True)


# -- handshake --------------------------------------------------------------------------------

_HANDSHAKE_KEYS = ("type", "initiator", "responder", "versions", "version", "nonce", "proof", "error")


def _handshake(w: World) -> Harness:
    host_key = w.host.keyring.current
    template = w.initiator

    def run(data: bytes) -> str:
        answer = answer_hello(origin=LOCAL, body=data, server_name=HOST, key=host_key, policy=w.host.policy)
        if isinstance(answer, Refused):
            first = _refusal(answer)
        else:
            _expect(answer, tuple)
            _expect(answer[0], bytes)
            _expect(answer[1], PeerAgreed)
            first = "ok"
        initiator = copy.copy(template)
        second = _effects(initiator.reply_received(200, data), PeerAgreed, Failed)
        initiator = copy.copy(template)
        third = _effects(initiator.reply_received(403, data), Failed)
        return f"{first}|{second}|{third}"

    def structured(rng: random.Random) -> bytes:
        try:
            value = _loads(rng.choice(w.seeds["handshake"]))
        except Exception:  # noqa: BLE001
            return b""
        value = gen.mutate_value(value, rng, keys=_HANDSHAKE_KEYS)
        if isinstance(value, dict) and "proof" in value and rng.random() < 0.5 and host_key is not None:
            transcript = {k: value.get(k) for k in ("initiator", "responder", "version", "nonce")}
            try:
                value["proof"] = sign(host_key, Domain.HANDSHAKE, _enc(transcript))
            except Exception:  # noqa: BLE001
                pass
        try:
            return _enc(value, canonical=rng.random() < 0.95)
        except Exception:  # noqa: BLE001
            return b"\xa0"

    def wrap(item: bytes, rng: random.Random) -> bytes:
        if rng.random() < 0.3:
            return item
        fields = {"type": _t(rng.choice(("hello", "welcome"))), "initiator": _t(LOCAL), "responder": _t(HOST),
                  "versions": _enc(["scaiwave-fed/1"]), "version": _t("scaiwave-fed/1"), "nonce": _enc(bytes(16)),
                  "proof": _enc(bytes(64))}
        if rng.random() < 0.5:
            fields.pop("version"), fields.pop("proof")
        else:
            fields.pop("versions")
        fields[rng.choice(list(fields) + ["error"])] = item
        return _raw_map(sorted(((_t(k), v) for k, v in fields.items()), key=lambda kv: (len(kv[0]), kv[0])))

    return Harness("handshake", run, tuple(w.seeds["handshake"]), wrap, structured)


# -- backfill pages -------------------------------------------------------------------------------

_PAGE_EFFECTS = (SendRequest, StoreEvents, Failed, BackfillDone, NeedKeys)


def _page(w: World) -> Harness:
    local_key = w.local.keyring.current
    assert local_key is not None
    anchor_event = w.room_events[7]  # depth 8

    def pull(data: bytes, status: int, anchor: tuple[int, bytes | None] | None,
             until: tuple[int, bytes] | None = None) -> str:
        puller = BackfillPuller(server_name=LOCAL, room_id=ROOM, peer=HOST, key=local_key, keys=w.local.keys,
                                limit=20, page_size=5, anchor=anchor, until=until, verifier=w.counter)
        _effects(puller.start(NOW), SendRequest, BackfillDone)
        effects = puller.page_received(status, data, NOW)
        out = _effects(effects, *_PAGE_EFFECTS)
        if any(isinstance(e, NeedKeys) for e in effects):
            out += ";" + _effects(puller.keys_updated(NOW), *_PAGE_EFFECTS)
        _effects(puller.page_received(200, data, NOW), *_PAGE_EFFECTS)  # after the end, or a duplicate
        return out

    def run(data: bytes) -> str:
        decoded = decode_page(data)
        _agree("page", decoded, decode_page(bytearray(data)))  # bytearray: the generic decoder
        first = _verdict(decoded, Page)
        fresh = pull(data, 200, None)
        anchored = pull(data, 200, (anchor_event.depth, anchor_event.prev))
        catching_up = pull(data, 200, None, (anchor_event.depth, anchor_event.event_id))
        failed = pull(data, 500, None)
        return f"{first}|{fresh}|{anchored}|{catching_up}|{failed}"

    def structured(rng: random.Random) -> bytes:
        try:
            page = _loads(rng.choice(w.seeds["page"]))
        except Exception:  # noqa: BLE001
            return b""
        if isinstance(page, dict) and isinstance(page.get("events"), list) and page["events"] and rng.random() < 0.5:
            events = list(page["events"])
            i = rng.randrange(len(events))
            if rng.random() < 0.6 and isinstance(events[i], bytes):
                events[i] = _resign_event(w, events[i], rng)
            else:
                events = gen.mutate_value(events, rng)
            page = dict(page, events=events)
        else:
            page = gen.mutate_value(page, rng, keys=("room_id", "before", "events", "next"))
        try:
            return _enc(page, canonical=rng.random() < 0.95)
        except Exception:  # noqa: BLE001
            return b"\xa0"

    def wrap(item: bytes, rng: random.Random) -> bytes:
        roll = rng.random()
        fields = {"room_id": _t(ROOM), "before": _enc(None), "next": _enc(3),
                  "events": _raw_array([_enc(e.envelope) for e in w.room_events[-2:]])}
        if roll < 0.4:
            fields["events"] = _raw_array([item] + [_enc(_wrap_event_body(item, rng))])
        elif roll < 0.8:
            fields[rng.choice(list(fields))] = item
        else:
            return item
        return _raw_map(sorted(((_t(k), v) for k, v in fields.items()), key=lambda kv: (len(kv[0]), kv[0])))

    return Harness("page", run, tuple(w.seeds["page"]), wrap, structured)


# -- transactions and invites ----------------------------------------------------------------------

def _txn(w: World) -> Harness:
    node = w.local

    def run(data: bytes) -> str:
        decoded = decode_events_body(data)
        _agree("transaction", decoded, decode_events_body(bytearray(data)))
        if isinstance(decoded, Refused):
            first = _refusal(decoded)
        else:
            _expect(decoded, tuple)
            _expect(decoded[0], list)
            first = f"ok:{len(decoded[0])}"
        parts = [first]
        for auth in (w.auth_host, w.auth_third):
            results = node.on_events(auth, data)
            if isinstance(results, Refused):
                parts.append(_refusal(results))
            else:
                _expect(results, list)
                for r in results:
                    _expect(r, Event, Refused, NeedKeys)
                parts.append(",".join(_refusal(r) if isinstance(r, Refused) else type(r).__name__ for r in results))
        invite = node.on_invite(w.auth_host, DM_ROOM, data, local_user=lambda user: Party(user) if user == ALICE else None)
        _expect(invite, InviteDecision, Refused, NeedKeys)
        parts.append(_refusal(invite) if isinstance(invite, Refused) else type(invite).__name__)
        return "|".join(parts)

    def structured(rng: random.Random) -> bytes:
        try:
            body = _loads(rng.choice(w.seeds["txn"]))
        except Exception:  # noqa: BLE001
            return b""
        if isinstance(body, dict) and isinstance(body.get("events"), list) and body["events"] and rng.random() < 0.6:
            events = list(body["events"])
            i = rng.randrange(len(events))
            if isinstance(events[i], bytes) and rng.random() < 0.7:
                events[i] = _resign_event(w, events[i], rng)
            else:
                events = gen.mutate_value(events, rng)
            body = dict(body, events=events)
        else:
            body = gen.mutate_value(body, rng, keys=("events", "origin"))
        try:
            return _enc(body, canonical=rng.random() < 0.95)
        except Exception:  # noqa: BLE001
            return b"\xa0"

    def wrap(item: bytes, rng: random.Random) -> bytes:
        roll = rng.random()
        if roll < 0.5:
            items = [gen.cbor_head(2, len(x)) + x for x in (item, _wrap_event_body(item, rng))]
            return _raw_map([(_t("events"), _raw_array(items))])
        if roll < 0.8:
            return _raw_map([(_t("events"), item)])
        return item

    return Harness("txn", run, tuple(w.seeds["txn"]), wrap, structured)


# -- names ------------------------------------------------------------------------------------------

_NAME_SEEDS = ("peer.test", "peer.test:8449", "Peer.Test:443", "peer.test.", "@bob:peer.test:8449",
               "!grp:your-host.test", "xn--bcher-kva.example", "[::1]:8448", "10.0.0.1", "a" * 70 + ".test")


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


def _names(w: World) -> Harness:
    policy = Policy("invite_only", allowed_peers=frozenset({"peer.test:8449"}), blocked_peers=frozenset({"evil.test"}))

    def run(data: bytes) -> str:
        text = data.decode("utf-8", "replace")
        canonical = canonical_server_name(text)
        strict = valid_server_name(text)
        _check(not strict or canonical == text, "a strictly valid name is its own canonical form")
        _check((server_name_problem(text) is None) == (canonical is not None), "a problem iff no name")
        if canonical is not None:
            _check(valid_server_name(canonical) and canonical_server_name(canonical) == canonical,
                   "canonical forms are valid and idempotent")
            _check(canonical == canonical.lower() and canonical.isascii() and not canonical.endswith(".")
                   and not canonical.endswith(":443") and len(canonical) <= 255, "the canonical spelling's shape")
            _check(policy.admits(text) == policy.admits(canonical), "a policy judges every spelling alike")
        for sigil, lenient in (("@", canonical_user_id), ("!", canonical_room_id)):
            ident = lenient(text)
            if ident is not None:
                _check(ident.startswith(sigil) and server_of(ident) is not None and lenient(ident) == ident,
                       "canonical ids are valid and idempotent")
        server = server_of(text)
        _check(server is None or valid_server_name(server), "an id's server is canonical")
        return ("ok" if canonical is not None else "refused") + ("|strict" if strict else "")

    def structured(rng: random.Random) -> bytes:
        text = rng.choice(_NAME_SEEDS)
        for _ in range(rng.randrange(1, 4)):
            roll = rng.random()
            if roll < 0.3:
                text = "".join(c.upper() if rng.random() < 0.5 else c for c in text)
            elif roll < 0.45:
                text += rng.choice((".", ":443", ":0443", ":", ":65536", "..", " "))
            elif roll < 0.6:
                i = rng.randrange(len(text) + 1)
                text = text[:i] + rng.choice(("\u00fc", "_", "-", "[", "]", "%2e", "\x00", "\u0130", "@", ":")) + text[i:]
            else:
                text = gen.mutate_bytes(text.encode(), rng).decode("utf-8", "replace")
        return text.encode("utf-8", "replace")

    def wrap(item: bytes, rng: random.Random) -> bytes:
        return item if rng.random() < 0.5 else rng.choice((b"@", b"!", b"")) + item + rng.choice((b"", b":443", b"."))

    return Harness("names", run, tuple(s.encode() for s in _NAME_SEEDS), wrap, structured, text=True)
