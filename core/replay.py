"""Replay: drive a fresh core with recorded federation traffic and compare its decisions.

:class:`Replayer` feeds a recording (format: ``shell/recorder.py``) record by
record to a *fresh* :class:`~.node.Federation` and returns one
:class:`Decision` per core decision, with the replayed and the live
:class:`Outcome`: ``inbound`` requests (route, authenticate, then the
endpoint's decision, reading stored state from the record's ``context``),
and the ``handshake`` / ``backfill`` machines we started, answered with the
recorded descriptors, replies and pages. It mirrors the daemon's glue around
each core call step by step (``shell/api/federation.py``,
``Service.handshake``, ``Service._backfill``), so a drift between the two
shows up as a mismatch. docs/replay.md explains the matching rules.

What-if: a :class:`~.policy.Policy` replacing the recorded ones, or an offset
added to every clock reading. Stored state stays as recorded.

Our own key: a recording holds no private keys (by design), so the replay
signs with :data:`SUBSTITUTE_SEED`, while our *public* keys (which verify our
own signatures, e.g. a proposal of ours relayed back by a room's host) are
the recorded ones. No decision depends on the private half; only the
signature bytes of our own replies (handshake proof, chained events) differ.

Pure and deterministic: no file, no clock; same records, same decisions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from itertools import groupby
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import parse_qsl, urlsplit

from .authz import Party
from .backfill import PAGE_CAP, BackfillDone, BackfillPuller, decode_page, parse_query
from .codes import Code, LocalProtocolError, Refused
from .descriptor import parse_descriptor
from .drive import answer
from .effects import Failed, FetchDescriptor, PeerAgreed, SendRequest
from .events import NeedKeys
from .handshake import HANDSHAKE_TARGET, Initiator
from .keys import ROTATION_PERIOD_MS, KeyRing, ServerKeys, SigningKey
from .layouts import read_accepting_reply
from .node import Federation, Route
from .policy import Policy
from .requests import Authenticated, parse_authorization
from .inbound import snapshot_from_context
from .wire import decode

__all__ = ["SUBSTITUTE_SEED", "UNKNOWN", "Outcome", "Decision", "ReplayResult", "Replayer", "replay_records"]

#: The replay's own signing seed (the recording has no private keys).
SUBSTITUTE_SEED = hashlib.sha256(b"scaiwave replay: substitute own key").digest()
#: The verdict of a live outcome the recording does not tell.
UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One side of a decision (replayed or live).

    ``verdict``: ``accepted``, ``refused``, ``peered``, ``done`` (a backfill
    ended cleanly), ``diverged`` (the replay asked for something the recording
    cannot answer) or :data:`UNKNOWN`. ``code`` is the refusal code;
    ``events`` the per-event results of a transaction (``ok`` or a code);
    ``count`` the events a backfill stored. ``detail`` and ``status`` (the
    live HTTP status) are for people and are not compared.

    The event counts, one meaning each (:meth:`counts`): ``stored`` events
    newly written to storage, ``echoed`` events accepted without storing
    because they were already held (a host's echo of our own proposal, a
    repeated delivery), ``refused`` events refused with a code; a
    transaction's ``ok`` results are ``stored + echoed``. ``None``: the
    recording does not tell (a live transaction of a recording made before
    inbound records carried ``stored``).
    """

    verdict: str
    code: str | None = None
    detail: str = ""
    events: tuple[str, ...] = ()
    count: int | None = None
    status: int | None = None
    stored: int | None = None
    echoed: int | None = None
    refused: int | None = None

    def short(self) -> str:
        """What is compared: ``refused peer_not_allowed``, ``accepted [ok, bad_signature]``, ``done 3 stored``."""
        text = self.verdict if self.code is None else f"{self.verdict} {self.code}"
        if any(e != "ok" for e in self.events):  # run-length: [ok x99, bad_signature]
            runs = [(r, len(list(group))) for r, group in groupby(self.events)]
            text += " [" + ", ".join(r if n == 1 else f"{r} x{n}" for r, n in runs) + "]"
        return text if self.count is None else f"{text} {self.count} stored"

    def text(self) -> str:
        """:meth:`short` with the live status in front and the detail after."""
        text = self.short() + (f" ({self.detail})" if self.detail else "")
        return text if self.status is None else f"{self.status} {text}"

    def counts(self) -> dict[str, int | None]:
        """``{"stored", "echoed", "refused"}`` (see the class doc); ``None`` where unknown,
        and all ``None`` for a decision without events decided one by one (a
        handshake, an invite, a request refused as a whole: see ``code``)."""
        stored = self.stored if self.stored is not None else self.count
        if not self.events and stored is None and self.refused is None:
            return {"stored": None, "echoed": None, "refused": None}  # no events decided one by one
        refused = self.refused if self.refused is not None else sum(1 for e in self.events if e != "ok")
        echoed = self.echoed
        if echoed is None and stored is not None:
            echoed = len(self.events) - refused - stored if self.events else 0
        return {"stored": stored, "echoed": echoed, "refused": refused}

    def matches(self, other: "Outcome") -> bool:
        """Same verdict, code, per-event results and (when both know it) count."""
        return (self.verdict, self.code, self.events) == (other.verdict, other.code, other.events) and (
            self.count is None or other.count is None or self.count == other.count)


def _refused(refusal: Refused, **kw: Any) -> Outcome:
    return Outcome("refused", refusal.code.value, **kw)


@dataclass(frozen=True, slots=True)
class Decision:
    """One core decision: record ``index`` (0-based, after the header), what it was, both outcomes."""

    index: int
    kind: str  # inbound | handshake | backfill
    method: str
    target: str
    peer: str  # the request's origin (inbound) or the peer we asked (handshake, backfill)
    replay: Outcome
    live: Outcome
    #: The recorded clock reading the decision was made at (ms): ``received_at``
    #: of an inbound request, ``now`` of a handshake's or backfill's start.
    now: int | None = None
    #: The room it concerns (``None``: none, or a handshake); a transaction
    #: touching several rooms names them space-separated, sorted.
    room: str | None = None
    #: The live processing times the recording holds for it (µs maps, see
    #: docs/replay.md): one for an inbound request, one per backfill page.
    timings: tuple[Mapping[str, Any], ...] = ()

    @property
    def comparable(self) -> bool:
        """False when the recording does not tell the live outcome."""
        return self.live.verdict != UNKNOWN

    @property
    def same(self) -> bool:
        """The replay decided as the live daemon did (True when not comparable)."""
        return not self.comparable or self.live.matches(self.replay)


@dataclass
class ReplayResult:
    """Everything one replay produced."""

    server_name: str
    decisions: list[Decision]
    what_if: bool
    #: Records that carry no core decision of ours, by kind (``outbound``: the peer decided).
    skipped: dict[str, int] = field(default_factory=dict)
    #: Malformed records and other remarks, in record order.
    notes: list[str] = field(default_factory=list)

    @property
    def differing(self) -> list[Decision]:
        """Decisions whose replay differs from live (mismatches, or what-if changes)."""
        return [d for d in self.decisions if not d.same]


class _ReplayNode(Federation):
    """A node whose own *public* keys are the recorded ones (see the module doc)."""

    own_public: ServerKeys | None = None

    def lookup(self, server: str) -> ServerKeys | None:
        if server != self.server_name:
            return self.keys.keys(server)
        return (self.own_public or self.keyring.public(server)).shifted(self.keys.key_time_offset_ms)


class _BadRecord(Exception):
    pass


_MISSING = object()
#: Kinds read together with the decision they belong to, never on their own.
_READ_WITH_THEIR_DECISION = frozenset({"handshake_end", "backfill_end", "backfill_page"})
_MAX_REPLY = 64 << 20


def _field(rec: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """``rec[name]`` if it has type ``kind``; ``default`` if absent; else the record is malformed."""
    if name not in rec and default is not _MISSING:
        return default
    value = rec.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _BadRecord(f"{rec.get('kind')} record without a valid {name!r}")
    return value


def _mapping(value: object) -> dict[str, str]:
    """A recorded ``{str: str}`` map (anything else reads as empty)."""
    if not isinstance(value, Mapping):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def _local_users(context: Mapping[str, Any]) -> Callable[[str], Party | None]:
    """The recorded ``local_users``: ``{user: {"tenant_federates": bool}}`` (or,
    in older recordings, a list of user ids whose tenants federate)."""
    recorded = context.get("local_users") or {}
    facts = {u: (f if isinstance(f, Mapping) else {}) for u, f in
             (recorded.items() if isinstance(recorded, Mapping) else ((u, {}) for u in recorded))}

    def local_user(user_id: str) -> Party | None:
        if user_id not in facts:
            return None
        return Party(user_id, tenant_federates=bool(facts[user_id].get("tenant_federates", True)))

    return local_user


def _result_code(result: object) -> str:
    """One entry of a transaction reply's ``results``: ``ok`` or the refusal code (``?``: unreadable)."""
    error = result.get("error") if isinstance(result, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return "ok" if isinstance(result, dict) and result.get("ok") else code if isinstance(code, str) else "?"


def _sent_answer(rec: Mapping[str, Any]) -> tuple[int, bytes] | Refused:
    """A recorded outbound request's answer, as :func:`~.drive.answer` takes it."""
    if "error" in rec:
        return _error_refusal(rec["error"])
    return _field(rec, "status", int), _field(rec, "response", bytes)


def _error_refusal(err: object) -> Refused:
    """A recorded ``{"code", "message"}`` as a refusal (unknown codes: ``peer_unreachable``)."""
    if isinstance(err, Mapping) and err.get("code") in Code._value2member_map_:
        return Refused(Code(err["code"]), str(err.get("message", "")))
    return Refused(Code.PEER_UNREACHABLE, str(err)[:200])


def _room_of(target: str, context: Mapping[str, Any]) -> str | None:
    """The room(s) an inbound request concerns: in its path, or the rooms of a transaction's events."""
    parts = urlsplit(target).path.split("/")
    if len(parts) > 5 and parts[4] in ("invite", "rooms"):
        return parts[5]
    rooms = context.get("heads") if isinstance(context, Mapping) else None
    if isinstance(rooms, Mapping) and rooms:
        return " ".join(sorted(str(r) for r in rooms))
    return None


def _live_end(rec: Mapping[str, Any] | None, ok: str) -> Outcome:
    """The live outcome from a ``handshake_end`` / ``backfill_end`` record (``None``: not recorded)."""
    if rec is None:
        return Outcome(UNKNOWN)
    count = rec.get("stored") if type(rec.get("stored")) is int else None
    if rec.get("error"):
        return _refused(_error_refusal(rec["error"]), count=count)
    detail = str(rec.get("protocol_version", "reached the start" if rec.get("reached_start") else ""))
    return Outcome(ok, count=count, detail=detail)


class Replayer:
    """Replays ``records`` (dicts, the recording after its header) as ``server_name``.

    ``policy`` replaces every recorded policy (what-if); ``clock_offset_ms`` is
    added to every clock reading (what-if); ``seed`` is our substitute signing
    seed. Call :meth:`run` once; it returns a :class:`ReplayResult`. Malformed
    records become notes, never exceptions.
    """

    def __init__(self, server_name: str, records: Sequence[Mapping[str, Any]], *, policy: Policy | None = None,
                 clock_offset_ms: int = 0, seed: bytes = SUBSTITUTE_SEED, key_offset_ms: int = 0) -> None:
        self.records = records
        self.policy_override = policy
        self.offset = clock_offset_ms
        self.seed = seed
        self.node = _ReplayNode(server_name, policy=policy or Policy())
        self.node.keys.key_time_offset_ms = key_offset_ms
        # Until an own_keys record says otherwise, assume the daemon had a key.
        self.node.keyring = KeyRing(current=SigningKey.from_seed(seed, 0))
        self.result = ReplayResult(server_name, [], what_if=policy is not None or clock_offset_ms != 0
                                   or key_offset_ms != 0)
        self._consumed: set[int] = set()
        self._pending: dict[str, tuple[int, Mapping[str, Any]]] = {}
        self._txns: dict[tuple[str, str], Outcome] = {}

    # -- the loop ------------------------------------------------------------------

    def run(self) -> ReplayResult:
        """Replay every record in order. Returns the result (also kept as ``self.result``)."""
        handlers = {
            "policy": self._policy, "settings": self._settings, "own_keys": self._own_keys,
            "nonces": self._nonces, "descriptor": self._descriptor, "inbound": self._inbound,
            "handshake_start": self._handshake, "backfill_start": self._backfill,
        }
        skipped = self.result.skipped
        for index, rec in enumerate(self.records):
            if index in self._consumed:
                continue
            kind = rec.get("kind") if isinstance(rec, Mapping) else None
            handler = handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                if kind not in _READ_WITH_THEIR_DECISION:
                    skipped[str(kind)] = skipped.get(str(kind), 0) + 1
                continue
            try:
                decision = handler(index, rec)
            except (_BadRecord, LocalProtocolError, KeyError, TypeError, ValueError) as exc:
                self.result.notes.append(f"#{index} {kind}: skipped, malformed record ({str(exc)[:160]})")
                continue
            if decision is not None:
                self.result.decisions.append(decision)
        if self._pending:
            skipped["descriptor"] = skipped.get("descriptor", 0) + len(self._pending)
        return self.result

    def _now(self, rec: Mapping[str, Any], name: str = "now") -> int:
        return int(_field(rec, name, int)) + self.offset

    # -- state records ---------------------------------------------------------------

    def _policy(self, index: int, rec: Mapping[str, Any]) -> None:
        if self.policy_override is None:
            self.node.policy = Policy.from_dict(_field(rec, "policy", Mapping))

    def _settings(self, index: int, rec: Mapping[str, Any]) -> None:
        self.node.keys.refetch_interval_ms = _field(rec, "refetch_interval_ms", int, self.node.keys.refetch_interval_ms)
        self.node.requests.skew_ms = _field(rec, "skew_ms", int, self.node.requests.skew_ms)

    def _own_keys(self, index: int, rec: Mapping[str, Any]) -> None:
        public = _field(rec, "public", Mapping)
        if not public.get("public_key"):
            self.node.keyring, self.node.own_public = KeyRing(), None
            return
        parsed = parse_descriptor(json.dumps(dict(public)).encode(), self.node.server_name)
        if isinstance(parsed, Refused):
            raise _BadRecord(f"our recorded descriptor does not check: {parsed}")
        created = max(0, int(public.get("valid_until", 0)) - ROTATION_PERIOD_MS)
        self.node.keyring = KeyRing(current=SigningKey.from_seed(self.seed, created))
        self.node.own_public = parsed[0]

    def _nonces(self, index: int, rec: Mapping[str, Any]) -> None:
        for nonce, expires in _field(rec, "nonces", list):
            self.node.requests.replay.remember(bytes(nonce), int(expires))

    def _descriptor(self, index: int, rec: Mapping[str, Any]) -> None:
        server = _field(rec, "server", str)
        if rec.get("cached"):
            # Restored into the key cache at daemon start.
            fetched_at = _field(rec, "fetched_at", int, rec.get("now")) + self.offset
            self.node.learn_descriptor(server, _field(rec, "body", bytes), fetched_at)
            return
        older = self._pending.get(server)
        if older is not None:
            # Nothing asked for the older fetch (an admin refresh, a client-side
            # check): it went into the key cache all the same.
            data = self._descriptor_data(older[1])
            now = self._now(older[1])
            self.node.keys.fetch_attempted(server, now)
            if isinstance(data, bytes):
                self.node.learn_descriptor(server, data, now)
        self._pending[server] = (index, rec)

    @staticmethod
    def _descriptor_data(rec: Mapping[str, Any]) -> bytes | Refused:
        if "error" in rec:
            return _error_refusal(rec["error"])
        return bytes(_field(rec, "body", bytes))

    # -- finding the recorded answers ------------------------------------------------

    def _window(self, start: int, kinds: tuple[str, str],
                match: Mapping[str, Any]) -> tuple[int, Mapping[str, Any] | None]:
        """Where the records of one handshake/backfill end: at its end record
        (returned too) or at the next start of the same one."""
        for j in range(start + 1, len(self.records)):
            rec = self.records[j]
            if isinstance(rec, Mapping) and all(rec.get(k) == v for k, v in match.items()):
                if rec.get("kind") == kinds[1]:
                    return j, rec
                if rec.get("kind") == kinds[0]:
                    return j, None
        return len(self.records), None

    def _lookahead(self, start: int, end: int, **match: Any) -> Mapping[str, Any] | None:
        """The first record between ``start`` and ``end`` matching ``match`` (now used up)."""
        for j in range(start + 1, end):
            rec = self.records[j]
            if j not in self._consumed and isinstance(rec, Mapping) and all(rec.get(k) == v for k, v in match.items()):
                self._consumed.add(j)
                return rec
        return None

    def _page_size(self, start: int, end: int, target: str) -> int:
        """The page size the recorded pull asked for: its first page request's
        ``limit`` as a host reads it (:func:`~.backfill.parse_query`; a
        recording made when pages were 100 asks 100, and a pull that asked
        for less than a page left to the end asks the same from then on),
        :data:`~.backfill.PAGE_CAP` if it made none or named no usable size."""
        for j in range(start + 1, end):
            rec = self.records[j]
            if (isinstance(rec, Mapping) and rec.get("kind") == "outbound" and rec.get("method") == "GET"
                    and isinstance(rec.get("target"), str) and rec["target"].startswith(target + "?")):
                asked = parse_query(dict(parse_qsl(rec["target"].partition("?")[2])))
                return PAGE_CAP if isinstance(asked, Refused) else asked[1]
        return PAGE_CAP

    def _learn(self, server: str, now: int, window: tuple[int, int] | None,
               key_id: str | None = None) -> tuple[Refused | None, int]:
        """A fetch of ``server``'s keys for traffic, answered from the recording:
        the refusal if any, and the clock reading after the fetch. Whether to
        fetch is the node's (:meth:`~.node.Federation.may_fetch_keys`)."""
        refusal = self.node.may_fetch_keys(server, now, key_id)
        if refusal is not None:
            return refusal, now
        self.node.keys.fetch_attempted(server, now, key_id)
        if window is None:  # an inbound request: the fetch was recorded before it
            pending = self._pending.pop(server, None)
            rec = pending[1] if pending else None
        else:
            rec = self._lookahead(window[0], window[1], kind="descriptor", server=server)
        if rec is None:
            return Refused(Code.PEER_UNREACHABLE, f"the recording holds no fetch of {server}'s descriptor here"), now
        data = self._descriptor_data(rec)
        if isinstance(data, Refused):
            return data, self._now(rec)
        entry = self.node.learn_descriptor(server, data, now)
        return (entry if isinstance(entry, Refused) else None), self._now(rec)

    # -- inbound ---------------------------------------------------------------------

    def _inbound(self, index: int, rec: Mapping[str, Any]) -> Decision:
        method, target = _field(rec, "method", str), _field(rec, "target", str)
        authorization = _field(rec, "authorization", (str, type(None)), None)
        body = _field(rec, "body", bytes, b"")
        context = _field(rec, "context", Mapping, {})
        status = _field(rec, "status", int)
        now = self._now(rec, "received_at" if "received_at" in rec else "now")
        claimed = parse_authorization(authorization)
        origin = "?" if isinstance(claimed, Refused) else claimed.origin
        live = self._live_inbound(target, status, _field(rec, "response", bytes, b""))
        if live.events and type(rec.get("stored")) is int and 0 <= rec["stored"] <= len(live.events):
            live = replace(live, stored=rec["stored"])
        replay = self._decide_inbound(method, target, authorization, body, context, now, live)
        timings = rec.get("timings")
        return Decision(index, "inbound", method, target, origin, replay, live, now=now,
                        room=_room_of(target, context), timings=(timings,) if isinstance(timings, Mapping) else ())

    @staticmethod
    def _live_inbound(target: str, status: int, response: bytes) -> Outcome:
        accepted = read_accepting_reply(response) if status == 200 and len(response) <= _MAX_REPLY else None
        if accepted is not None:  # the usual reply, read fast: the same outcome as below
            return Outcome("accepted", detail=f"{accepted} ok", events=("ok",) * accepted, status=status)
        value = decode(response, max_size=_MAX_REPLY)
        if status != 200:
            error = value.get("error") if isinstance(value, dict) else None
            code = error.get("code") if isinstance(error, dict) else None
            return Outcome("refused", code if isinstance(code, str) else "?", status=status)
        if isinstance(value, dict) and isinstance(value.get("results"), list):
            events = tuple("ok" if type(r) is dict and r.get("ok") is True else _result_code(r)
                           for r in value["results"])
            return Outcome("accepted", detail=f"{events.count('ok')} ok", events=events, status=status)
        page = decode_page(response) if "/backfill" in target else None
        if page is not None and not isinstance(page, Refused):
            return Outcome("accepted", detail=f"served {len(page.events)} events", status=status)
        return Outcome("accepted", status=status)

    def _authenticate(self, method: str, target: str, authorization: str | None, body: bytes,
                      now: int) -> tuple[Route, Authenticated] | Refused:
        """The inbound request's :class:`~.receive.Receive` machine, its
        ``NeedKeys`` answered from the recording."""
        machine = self.node.receive(method=method, target=target, authorization=authorization, body=body)
        effects = machine.start(now)
        while effects:
            need = effects.pop(0)
            assert isinstance(need, NeedKeys), need
            failure, now = self._learn(need.server, now, None, need.key_id)
            effects += answer(machine, need, failure, now)
        if machine.route is None or machine.auth is None:
            return machine.refusal or Refused(Code.INTERNAL_ERROR, "the request was not decided")
        return machine.route, machine.auth

    def _decide_inbound(self, method: str, target: str, authorization: str | None, body: bytes,
                        context: Mapping[str, Any], now: int, live: Outcome) -> Outcome:
        node = self.node
        received = self._authenticate(method, target, authorization, body, now)
        if isinstance(received, Refused):
            return _refused(received)
        route, auth = received
        if route.endpoint == "handshake":
            welcome = node.on_handshake(auth, body)
            if isinstance(welcome, Refused):
                return _refused(welcome)
            return Outcome("accepted", detail=f"peered, {welcome[1].protocol_version}")
        refusal = node.admit(auth, peered=bool(context.get("peered", False)))
        if refusal is not None:
            return _refused(refusal)
        param = route.param or ""
        if route.endpoint == "invite":
            decision = node.on_invite(auth, param, body, local_user=_local_users(context),
                                      members=_mapping(context.get("members")))
            if isinstance(decision, Refused):
                return _refused(decision)
            return Outcome("accepted", detail=f"invite of {decision.invitee} would be stored")
        if route.endpoint == "send":
            return self._send(auth, param, body, context, now, live)
        query = dict(parse_qsl(urlsplit(target).query, keep_blank_values=True))
        members = _mapping(context.get("members"))
        if "members" not in context and context.get("origin_is_member"):
            members = {f"@member:{auth.origin}": "join"}  # recordings made before "members"
        answer = node.on_backfill(auth, param, query, room_type=context.get("room_type"),
                                  tenant_federates=bool(context.get("tenant_federates", True)), members=members)
        if isinstance(answer, Refused):
            return _refused(answer)
        return Outcome("accepted", detail=f"would serve a page before={answer[0]} limit={answer[1]}")

    def _send(self, auth: Authenticated, txn_id: str, body: bytes, context: Mapping[str, Any], now: int,
              live: Outcome) -> Outcome:
        """A transaction: the same two core calls as the daemon (``on_events``,
        then ``on_transaction`` on the recorded snapshot); no rule of its own."""
        key = (auth.origin, txn_id)
        if key in self._txns:
            previous = self._txns[key]
            return Outcome("accepted", detail="repeated transaction: the stored reply", events=previous.events,
                           stored=0, echoed=previous.events.count("ok"))
        if context.get("replayed_txn"):
            # Answered from storage live, and the replay never accepted the first one
            # (it came before the recording started): the stored reply stands.
            return Outcome("accepted", detail="repeated transaction: the live stored reply", events=live.events,
                           stored=0, echoed=live.events.count("ok"))
        node = self.node
        results = node.on_events(auth, body)
        if isinstance(results, Refused):
            return _refused(results)
        decision = node.on_transaction(auth, results, snapshot_from_context(context, results), now)
        for need in decision.prefetch:
            self._learn(need.server, now, None)
        stored = decision.stored
        outcome = Outcome("accepted", detail=f"{stored} event{'s' if stored != 1 else ''} would be stored",
                          events=decision.outcomes, stored=stored, echoed=decision.echoed)
        self._txns[key] = outcome
        return outcome

    # -- outbound: handshakes and backfills we started -------------------------------

    def _handshake(self, index: int, rec: Mapping[str, Any]) -> Decision:
        """The daemon's :class:`~.handshake.Initiator`, its effects answered
        through :func:`~.drive.answer` from the recording."""
        peer, nonce, now = _field(rec, "peer", str), _field(rec, "nonce", bytes), self._now(rec)
        end, end_rec = self._window(index, ("handshake_start", "handshake_end"), {"peer": peer})
        live = _live_end(end_rec, "peered")
        node = self.node
        machine = Initiator(server_name=node.server_name, peer=peer, keyring=node.keyring, policy=node.policy,
                            keys=node.keys, versions=node.versions)
        effects = machine.start(nonce)
        replay = Outcome("diverged", detail="the handshake ended without an answer")
        while effects:
            effect = effects.pop(0)
            if isinstance(effect, FetchDescriptor):
                node.keys.fetch_attempted(effect.server, now)
                found = self._lookahead(index, end, kind="descriptor", server=effect.server)
                if found is None:
                    replay = Outcome("diverged", detail=f"the recording holds no fetch of {peer}'s descriptor")
                    break
                effects += answer(machine, effect, self._descriptor_data(found), now)
            elif isinstance(effect, SendRequest):
                sent = self._lookahead(index, end, kind="outbound", peer=peer, method="POST", target=HANDSHAKE_TARGET)
                if sent is None:
                    replay = Outcome("diverged", detail="the recording holds no answer to the hello")
                    break
                effects += answer(machine, effect, _sent_answer(sent), now)
            elif isinstance(effect, PeerAgreed):
                replay = Outcome("peered", detail=effect.protocol_version)
                break
            elif isinstance(effect, Failed):
                replay = _refused(effect.refusal)
                break
        return Decision(index, "handshake", "POST", HANDSHAKE_TARGET, peer, replay, live, now=now)

    def _backfill(self, index: int, rec: Mapping[str, Any]) -> Decision:
        """The daemon's :class:`~.backfill.BackfillPuller` from the recorded
        resume cursor on, its effects answered through :func:`~.drive.answer`
        from the recording."""
        room_id, peer = _field(rec, "room_id", str), _field(rec, "peer", str)
        cursor, now = _field(rec, "cursor", bytes), self._now(rec)
        end, end_rec = self._window(index, ("backfill_start", "backfill_end"), {"room_id": room_id, "peer": peer})
        live = _live_end(end_rec, "done")
        target = f"/_scaiwave/federation/v1/rooms/{room_id}/backfill"
        key = self.node.keyring.current
        refusal = (Refused(Code.OWN_KEY_MISSING, "no federation key") if key is None
                   else self.node.policy.admits(peer))
        pages = tuple(r for r in self.records[index + 1:end] if isinstance(r, Mapping)
                      and r.get("kind") == "backfill_page" and r.get("room_id") == room_id and r.get("peer") == peer)
        if pages and live.verdict != UNKNOWN:
            live = replace(live, refused=sum(p["refused"] for p in pages if type(p.get("refused")) is int
                                             and p["refused"] >= 0))
        decision = Decision(index, "backfill", "GET", target, peer, Outcome(UNKNOWN), live, now=now, room=room_id,
                            timings=pages)
        if refusal is not None or key is None:
            return replace(decision, replay=_refused(refusal or Refused(Code.OWN_KEY_MISSING)))
        puller = BackfillPuller.resume(cursor, server_name=self.node.server_name, key=key, keys=self.node.keys,
                                       lookup=self.node.lookup, page_size=self._page_size(index, end, target))
        effects = puller.start(now)
        replay = Outcome("diverged", detail="the pull ended without an answer")
        while effects:
            effect = effects.pop(0)
            if isinstance(effect, SendRequest):
                sent = self._lookahead(index, end, kind="outbound", peer=peer, method="GET", target=effect.target)
                if sent is None:
                    replay = Outcome("diverged", count=puller.stored,
                                     detail=f"the recording holds no answer to GET {effect.target}")
                    break
                now = self._now(sent)
                effects += answer(puller, effect, _sent_answer(sent), now)
            elif isinstance(effect, NeedKeys):
                failure, now = self._learn(effect.server, now, (index, end), effect.key_id)
                effects += answer(puller, effect, failure, now)
            elif isinstance(effect, BackfillDone):
                refused = len(puller.refusals)
                replay = (_refused(effect.refusal, count=effect.stored, refused=refused) if effect.refusal else
                          Outcome("done", count=effect.stored, refused=refused,
                                  detail="reached the start" if effect.reached_start else ""))
                break
        return replace(decision, replay=replay)


def replay_records(server_name: str, records: Sequence[Mapping[str, Any]], *, policy: Policy | None = None,
                   clock_offset_ms: int = 0, seed: bytes = SUBSTITUTE_SEED, key_offset_ms: int = 0) -> ReplayResult:
    """Replay ``records`` as ``server_name`` (see :class:`Replayer`). Returns the :class:`ReplayResult`."""
    return Replayer(server_name, records, policy=policy, clock_offset_ms=clock_offset_ms, seed=seed,
                    key_offset_ms=key_offset_ms).run()
