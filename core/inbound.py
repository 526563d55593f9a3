"""Inbound transactions, decided whole: what a receiver stores, chains and answers.

A ``PUT send/{txn_id}`` carries chained events from rooms' hosts and
proposals from members' servers. After :meth:`~.node.Federation.on_events`
has verified every envelope, this module decides the rest from a typed
snapshot of the stored state the decision reads (:class:`TxnSnapshot`), and
returns everything the host must do (:class:`TxnDecision`): the events to
store (with the reply, in one storage transaction), the events we chained and
must push to member servers, the memberships to set, the catch-ups to start,
the refusals to report, and the reply's bytes. The daemon, ``scaiwave
replay``, the tests' fake link and embedding hosts all call the same function,
so no host re-implements (or "mirrors") these rules.

The rules, per event, in transaction order:

1. A refusal from verification stays a refusal; an event whose keys could not
   be had is refused with :meth:`~.node.Federation.unverifiable`'s code.
2. A chained event (depth >= 1) of a room we do not know: ``not_found``.
   Otherwise :func:`~.rooms.link` against our head (and the id we hold at
   its depth, when it is at or below our head): append, duplicate (``ok``:
   an event we hold), or ``chain_broken``. An append that carries a proposal
   already chained in the room as another event is ``conflict``
   (:func:`~.proposals.chained_once`). A ``chain_broken`` event from the
   room's host above a gap over our head starts a catch-up from the host.
   In a room we hold nothing of, only one of our users' joins from the
   room's host starts our copy (the host's outbox may deliver it before its
   reply to our proposal); anything else there is ``chain_broken``.
3. A proposal (depth 0) must be for a room we host (``not_found``), pass
   :func:`~.rooms.check_proposal` (room authorization, A9) against the room's
   memberships as they stand after the transaction's earlier events, and not
   be chained already (:func:`~.proposals.may_chain`). We then chain it with
   ``source`` set; a member proposal moves the sender's membership. The
   events we chained go to every server with a joined member of the room as
   it stands after the transaction, the proposer included
   (:attr:`TxnDecision.pushes`); the host stores the events, the reply, the
   memberships and those queued requests in one write, so that they are
   queued in the order they were chained and never stored unqueued.
4. Every refusal that is final (not :attr:`~.codes.Refused.retryable`) is
   also reported (:attr:`TxnDecision.refused`): the host logs it and puts
   it in the sending peer's ``last_error``, so nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, cast

from .authz import RoomFacts, push_targets
from .codes import Code, Refused
from .events import Event, NeedKeys
from .keys import SigningKey
from .names import server_of
from .proposals import chained_once, may_chain, proposal_id
from .rooms import Head, LinkResult, chain_event, check_proposal, link
from .rooms import MAX_TXN_BYTES, MAX_TXN_EVENTS
from .handshake import decode_refusal
from .wire import decode, encode

__all__ = [
    "RoomState",
    "TxnSnapshot",
    "TxnDecision",
    "CatchUp",
    "encode_txn_reply",
    "decode_txn_reply",
    "rooms_needed",
    "held_needed",
    "proposals_needed",
    "decide_transaction",
    "snapshot_context",
    "snapshot_from_context",
    "snapshot_of_chains",
]

Result = Event | Refused | NeedKeys


@dataclass(frozen=True, slots=True)
class RoomState:
    """One room as the receiver stores it, before the transaction.

    ``room_type``, ``tenant_federates`` and ``members`` matter for rooms we
    host (proposals); ``head`` is our newest event of the room (``None``: none).
    """

    known: bool
    host: str | None = None
    head: Head | None = None
    room_type: str | None = None
    tenant_federates: bool = True
    members: Mapping[str, str] = field(default_factory=dict)


_UNKNOWN = RoomState(known=False)


@dataclass(frozen=True, slots=True)
class TxnSnapshot:
    """The stored state a transaction's decision reads (what the recorder keeps).

    ``held``: event id text -> the id we hold at that event's depth (asked
    for the events at or below our head: :func:`held_needed`).
    ``chained``: (room id, proposal id) -> the chained event already carrying
    that proposal in the room, or ``None`` (:func:`proposals_needed`).
    """

    rooms: Mapping[str, RoomState]
    held: Mapping[str, bytes | None] = field(default_factory=dict)
    chained: Mapping[tuple[str, bytes], bytes | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CatchUp:
    """Start a catch-up: pull ``room_id`` from its ``host`` down to our ``head``."""

    room_id: str
    host: str
    head: Head


#: One reply entry, kept as values until the reply is asked for: the event
#: (None for an envelope that did not even decode), its refusal, or the
#: event we chained from it.
_Answer = tuple[Event | None, Refused | None, Event | None]


@dataclass(frozen=True, slots=True)
class TxnDecision:
    """What the host does with a transaction (see the module doc)."""

    answers: tuple[_Answer, ...]
    outcomes: tuple[str, ...]
    store: tuple[Event, ...]
    chained: tuple[Event, ...]
    memberships: tuple[tuple[str, str, str], ...]
    catch_ups: tuple[CatchUp, ...]
    refused: tuple[Refused, ...]
    stored: int
    echoed: int
    #: Keys to fetch (deduplicated, only of servers whose words we verify) so that
    #: the sender's retry of the events refused ``unknown_key`` verifies. Carry
    #: them out like any ``NeedKeys``; nothing waits for their answer.
    prefetch: tuple[NeedKeys, ...] = ()
    #: For each room we chained events in (in order): the servers to queue them
    #: for, as the room stands after this transaction (every server with a
    #: joined member, the proposer included; none for a sealed room). Queue
    #: them in the write that stores the events: see :attr:`memberships`.
    pushes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def reply(self) -> bytes:
        """The reply's bytes (canonical CBOR; built when asked: a replay that
        only compares outcomes never pays for it)."""
        results = []
        for event, refusal, chained in self.answers:
            item: dict[str, Any] = {} if event is None else {"event_id": event.id_text}
            if refusal is not None:
                item["error"] = refusal.as_dict()
            else:
                item["ok"] = True
                if chained is not None:
                    item["chained"] = chained.id_text
            results.append(item)
        return encode_txn_reply(results, [e.envelope for e in self.chained])


def encode_txn_reply(results: Sequence[Mapping[str, Any]], events: Sequence[bytes]) -> bytes:
    """A transaction's reply: ``{"results": [{"event_id", "ok"} | {"event_id"?, "error"}],
    "events": [the chained events made from its proposals]}`` (canonical CBOR)."""
    return encode({"results": list(results), "events": list(events)})


def decode_txn_reply(body: bytes) -> tuple[list[Refused | None], list[bytes]] | Refused:
    """A transaction's reply from a peer: one ``None`` (accepted) or ``Refused``
    per event sent, and the envelopes of the events it chained for us."""
    value = decode(body, max_size=MAX_TXN_BYTES * 2, max_depth=5)
    if isinstance(value, Refused):
        return value
    results = value.get("results") if isinstance(value, dict) else None
    events = value.get("events", []) if isinstance(value, dict) else None
    if (type(results) is not list or type(events) is not list or not all(type(e) is bytes for e in events)
            or len(events) > MAX_TXN_EVENTS):
        return Refused(Code.MALFORMED, "a transaction reply is {results: [...], events: [...]}")
    out: list[Refused | None] = []
    for item in results:
        error = item.get("error") if isinstance(item, dict) else None
        if isinstance(item, dict) and item.get("ok") is True:
            out.append(None)
        elif isinstance(error, dict):
            out.append(decode_refusal(403, encode({"error": error})))
        else:
            out.append(Refused(Code.MALFORMED, "a transaction result is {ok: true} or {error: {code, message}}"))
    return out, events


def rooms_needed(results: Sequence[Result]) -> list[str]:
    """The rooms whose :class:`RoomState` the decision reads, in first-seen order."""
    return list(dict.fromkeys(r.room_id for r in results if type(r) is Event))


def held_needed(results: Sequence[Result], rooms: Mapping[str, RoomState]) -> list[tuple[str, int, str]]:
    """``(room id, depth, event id text)`` of each chained event at or below our
    head of a known room: the id we hold at that depth decides duplicate or fork."""
    out = []
    for r in results:
        if type(r) is Event and r.depth > 0:
            state = rooms.get(r.room_id)
            if state is not None and state.known and state.head is not None and r.depth <= state.head.depth:
                out.append((r.room_id, r.depth, r.id_text))
    return out


def proposals_needed(results: Sequence[Result]) -> list[tuple[str, bytes]]:
    """``(room id, proposal id)`` of every proposal the transaction carries or chains."""
    out: dict[tuple[str, bytes], None] = {}
    for r in results:
        if type(r) is not Event:
            continue
        pid = r.event_id if r.depth == 0 else proposal_id(r)
        if pid is not None:
            out[(r.room_id, pid)] = None
    return list(out)


def _our_join_from_host(event: Event, state: RoomState, origin: str, server_name: str) -> bool:
    """A pushed event that starts a room of which we hold nothing: the
    room's host chaining one of our users' joins, the event its reply to our
    proposal starts the room with (the host's outbox may deliver it first).
    Its sender is ours, so verification checked our signed proposal in it."""
    return (state.host == origin and event.type == "m.member" and server_of(event.sender) == server_name
            and isinstance(event.content, Mapping) and event.content.get("membership") == "join")


def decide_transaction(*, server_name: str, key: SigningKey | None, origin: str, results: Sequence[Result],
                       snapshot: TxnSnapshot, now: int, unverifiable: Callable[[NeedKeys], Refused],
                       starts_rooms: bool = False) -> TxnDecision:
    """Decide a verified transaction from ``origin`` (see the module doc).

    ``key`` signs the events we chain from proposals (``None``: we have no
    key, and every proposal is refused ``own_key_missing``). ``starts_rooms``:
    the events are the host's answer to our own proposal (a join, say), so a
    room of which we hold no event yet starts with the first of them (its
    history before comes by backfill); a pushed event starts a room only
    when it is one of our users' joins from the room's host (the same event
    that reply starts it with, delivered first).
    """
    heads = {room_id: state.head for room_id, state in snapshot.rooms.items()}
    members = {room_id: dict(state.members) for room_id, state in snapshot.rooms.items()}
    chained_ids = dict(snapshot.chained)
    replies: list[_Answer] = []
    outcomes: list[str] = []
    store: list[Event] = []
    created: list[Event] = []
    memberships: list[tuple[str, str, str]] = []
    catch_ups: dict[str, CatchUp] = {}
    refused: list[Refused] = []
    echoed = 0

    def refuse(refusal: Refused, event: Event | None) -> None:
        replies.append((event, refusal, None))
        outcomes.append(refusal.code.value)
        if not refusal.retryable:
            refused.append(refusal)

    prefetch: dict[NeedKeys, None] = {}
    rooms = snapshot.rooms
    for result in results:
        if type(result) is not Event:  # (the hot path: one type check per event)
            if isinstance(result, NeedKeys):
                unknown = unverifiable(result)
                if unknown.code is Code.UNKNOWN_KEY:
                    prefetch[result] = None
                refuse(unknown, None)
            else:
                refuse(cast(Refused, result), None)
            continue
        event = result
        state = rooms.get(event.room_id) or _UNKNOWN
        head = heads.get(event.room_id)
        if event.depth > 0:
            if not state.known:
                refuse(Refused(Code.NOT_FOUND, f"unknown room {event.room_id[:100]}"), event)
                continue
            held = snapshot.held.get(event.id_text) if head is not None and event.depth <= head.depth else None
            starts = head is None and (starts_rooms or _our_join_from_host(event, state, origin, server_name))
            verdict = LinkResult.APPEND if starts else link(event, head, held)
            pid = proposal_id(event) if event.source is not None else None
            if pid is not None and verdict == LinkResult.APPEND:
                verdict = chained_once(event, chained_ids.get((event.room_id, pid))) or verdict
            if verdict == LinkResult.APPEND:
                if pid is not None and chained_ids.get((event.room_id, pid)) is None:
                    chained_ids[(event.room_id, pid)] = event.event_id
                store.append(event)
                heads[event.room_id] = Head(event.depth, event.event_id)
                replies.append((event, None, None))
                outcomes.append("ok")
            elif verdict == LinkResult.DUPLICATE:
                echoed += 1
                replies.append((event, None, None))
                outcomes.append("ok")
            else:
                assert isinstance(verdict, Refused)
                refuse(verdict, event)
                if (verdict.code is Code.CHAIN_BROKEN and state.host == origin and head is not None
                        and event.depth > head.depth + 1 and event.room_id not in catch_ups):
                    # We missed events (dropped on the way, say): pull them from the host.
                    catch_ups[event.room_id] = CatchUp(event.room_id, origin, head)
            continue
        # A proposal for a room we host.
        if not state.known or state.host != server_name or state.room_type is None:
            refuse(Refused(Code.NOT_FOUND, "no such room here"), event)
            continue
        room_members = members.setdefault(event.room_id, {})
        refusal = check_proposal(event, origin=origin, room_type=state.room_type,
                                 tenant_federates=state.tenant_federates,
                                 membership=room_members.get(event.sender)) \
            or may_chain(event, chained_ids.get((event.room_id, event.event_id)))
        if refusal is None and key is None:
            refusal = Refused(Code.OWN_KEY_MISSING, "no federation key: run `scaiwave admin federation key generate`")
        if refusal is not None:
            refuse(refusal, event)
            continue
        assert key is not None
        chained = chain_event(key, head=head, room_id=event.room_id, room_type=state.room_type,
                              sender=event.sender, type=event.type, ts=now, content=event.content,
                              source=event.envelope)
        heads[event.room_id] = Head(chained.depth, chained.event_id)
        chained_ids[(event.room_id, event.event_id)] = chained.event_id
        store.append(chained)
        created.append(chained)
        replies.append((event, None, chained))
        outcomes.append("ok")
        if event.type == "m.member":
            membership = event.content["membership"]
            room_members[event.sender] = membership
            memberships.append((event.room_id, event.sender, membership))
    pushes = []
    for room_id in dict.fromkeys(e.room_id for e in created):
        state = rooms[room_id]
        facts = RoomFacts(room_id, state.room_type or "", None, state.tenant_federates, members.get(room_id, {}))
        pushes.append((room_id, tuple(push_targets(facts, server_name))))
    return TxnDecision(tuple(replies), tuple(outcomes), tuple(store), tuple(created), tuple(memberships),
                       tuple(catch_ups.values()), tuple(refused), len(store), echoed, tuple(prefetch), tuple(pushes))


def snapshot_of_chains(results: Sequence[Result], chains: Mapping[str, Sequence[Event]]) -> TxnSnapshot:
    """The snapshot for a host whose store is each joined room's chain in memory
    (oldest first; a room it knows with no events yet maps to an empty list),
    hosting no room itself: the embedding examples' store."""
    rooms = {}
    for room_id in rooms_needed(results):
        chain = chains.get(room_id)
        rooms[room_id] = RoomState(known=chain is not None, host=room_id.split(":", 1)[1],
                                   head=Head(chain[-1].depth, chain[-1].event_id) if chain else None)
    held = {text: next((e.event_id for e in chains[room_id] if e.depth == depth), None)
            for room_id, depth, text in held_needed(results, rooms)}
    return TxnSnapshot(rooms, held)


# -- the snapshot as the recorder writes it (docs/replay.md, "context") ---------------------------


def snapshot_context(snapshot: TxnSnapshot) -> dict[str, Any]:
    """The recorded form of ``snapshot``: the inbound record's ``context`` keys
    ``heads``, ``held``, ``rooms`` and ``chained``."""
    out: dict[str, Any] = {
        "heads": {room_id: {"known": s.known, "host": s.host,
                            "head": [s.head.depth, s.head.event_id] if s.head else None}
                  for room_id, s in snapshot.rooms.items()},
    }
    if snapshot.held:
        out["held"] = {text: held.hex() if held else None for text, held in snapshot.held.items()}
    hosted = {room_id: {"room_type": s.room_type, "tenant_federates": s.tenant_federates, "members": dict(s.members)}
              for room_id, s in snapshot.rooms.items() if s.room_type is not None}
    if hosted:
        out["rooms"] = hosted
    if snapshot.chained:
        out["chained"] = [{"room_id": room_id, "proposal_id": pid.hex(),
                           **({"chained_id": held_id.hex()} if held_id else {})}
                          for (room_id, pid), held_id in snapshot.chained.items()]
    return out


def _map(value: object) -> Mapping[Any, Any]:
    if type(value) is dict:  # what a recording holds: skip the slower ABC check
        return value
    return value if isinstance(value, Mapping) else {}


def _hex(value: object) -> bytes | None:
    if isinstance(value, str):
        try:
            return bytes.fromhex(value)
        except ValueError:
            return None
    return None


def snapshot_from_context(context: Mapping[str, Any], results: Sequence[Result] = ()) -> TxnSnapshot:
    """The snapshot a recording's ``context`` holds. Reads recordings made
    before ``rooms`` carried ``members`` too: their ``proposals`` (the sender's
    membership per proposal) rebuild each room's members from ``results``."""
    heads = _map(context.get("heads"))
    hosted = _map(context.get("rooms"))
    legacy = _map(context.get("proposals"))
    rooms: dict[str, RoomState] = {}
    for room_id, h in heads.items():
        if not isinstance(room_id, str) or not isinstance(h, Mapping):
            continue
        recorded = h.get("head")
        head = (Head(recorded[0], bytes(recorded[1])) if isinstance(recorded, (list, tuple)) and len(recorded) == 2
                and isinstance(recorded[0], int) and isinstance(recorded[1], (bytes, bytearray)) else None)
        room: Mapping[str, Any] | None = hosted.get(room_id) if isinstance(hosted.get(room_id), Mapping) else None
        members: dict[str, str] = {}
        if room is not None and isinstance(room.get("members"), Mapping):
            members = {u: m for u, m in room["members"].items() if isinstance(u, str) and isinstance(m, str)}
        for r in results if legacy else ():  # (recordings made before "members")
            if not isinstance(r, Event) or r.room_id != room_id:
                continue
            state = legacy.get(r.id_text)
            if isinstance(state, Mapping) and isinstance(state.get("membership"), str):
                members.setdefault(r.sender, state["membership"])
            if room is None and isinstance(state, Mapping):
                room = state
        host = h.get("host") if isinstance(h.get("host"), str) else None
        rooms[room_id] = RoomState(known=bool(h.get("known")), host=host, head=head,
                                   room_type=room.get("room_type") if room is not None else None,
                                   tenant_federates=bool(room.get("tenant_federates", True)) if room else True,
                                   members=members)
    held = {text: _hex(value) for text, value in _map(context.get("held")).items() if isinstance(text, str)}
    chained: dict[tuple[str, bytes], bytes | None] = {}
    recorded_chained = context.get("chained")
    for entry in recorded_chained if isinstance(recorded_chained, (list, tuple)) else ():
        if isinstance(entry, Mapping) and isinstance(entry.get("room_id"), str):
            pid = _hex(entry.get("proposal_id"))
            if pid is not None:
                chained[(entry["room_id"], pid)] = _hex(entry.get("chained_id"))
    return TxnSnapshot(rooms, held, chained)
