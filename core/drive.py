"""One way to answer every machine, the reference driver, and a conformance check.

The core's machines (:class:`~.handshake.Initiator` and
:class:`~.backfill.BackfillPuller` outbound, :class:`~.receive.Receive` for
each inbound request) ask their host for I/O with effects.
Following matrix-sdk-crypto (``outgoing_requests()`` answered through one
``mark_request_as_sent(id, response)``) every effect that needs an answer is
answered through one function, :func:`answer`, whatever the machine:

=====================  ========================================  ==========================
effect                 the host does                             and answers with
=====================  ========================================  ==========================
``FetchDescriptor``    GET the server's descriptor (verified     the body ``bytes``, or the
                       TLS)                                      failure as a ``Refused``
``SendRequest``        send the signed request (not before its   ``(status, body)``, or the
                       ``not_before``, when it has one)          failure as a ``Refused``
``NeedKeys``           fetch that server's descriptor into the   ``None``, or the fetch's
                       key cache (``Federation.learn_descriptor``)  failure as a ``Refused``
=====================  ========================================  ==========================

The other effects need no answer: the host carries them out
(``StoreEvents``: store durably; ``PeerAgreed``: record the peer;
``Failed``: record the peer's ``last_error``; ``BackfillDone``: report).
``NeedKeys`` is the only way the core asks for keys: it comes from a machine
(answered as above) or in a decision's ``prefetch`` (a transaction's events
refused ``unknown_key``: fetch so that the sender's retry verifies; nothing
waits for that answer). No core call returns it for the host to interpret.

:func:`drive` is the reference driver: the synchronous loop every host runs
(the asyncio and blocking examples are this loop with ``await`` or threads
around ``perform``). :func:`check_driver` is the conformance check a host
runs against its own loop: it fails a host that drops an effect (never sends a
request, never answers a fetch) or stops before the machine is done.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Protocol

from .backfill import BackfillDone, BackfillPuller, build_page, parse_query
from .codes import LocalProtocolError, Refused
from .effects import Effect, Failed, FetchDescriptor, PeerAgreed, SendRequest, StoreEvents
from .events import Event, NeedKeys
from .handshake import HANDSHAKE_TARGET, Initiator, State
from .receive import Receive

__all__ = ["Answer", "Machine", "answer", "is_done", "drive", "HostError", "check_driver", "check_timer_host"]

#: What the host hands back for an effect (see the table above).
Answer = bytes | tuple[int, bytes] | Refused | None

#: Every machine the host drives.
Machine = Initiator | BackfillPuller | Receive


class HostError(Exception):
    """The host drove a machine wrongly (an effect dropped, a wrong answer type)."""


def answer(machine: Machine, effect: Effect, result: Answer, now: int) -> list[Effect]:
    """Answer ``effect`` (asked by ``machine``) with ``result``; returns the next effects.

    Raises :class:`~.codes.LocalProtocolError` for an effect that needs no
    answer, or a result of the wrong type for it.
    """
    if isinstance(effect, FetchDescriptor) and isinstance(machine, Initiator):
        if isinstance(result, Refused):
            return machine.descriptor_failed(result)
        if isinstance(result, bytes):
            return machine.descriptor_received(result, now)
    elif isinstance(effect, SendRequest) and isinstance(machine, (Initiator, BackfillPuller)):
        if isinstance(result, Refused):
            return machine.reply_failed(result) if isinstance(machine, Initiator) else machine.fail(result)
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], int) and isinstance(result[1], bytes):
            if isinstance(machine, Initiator):
                return machine.reply_received(*result)
            return machine.page_received(result[0], result[1], now)
    elif isinstance(effect, NeedKeys) and isinstance(machine, Receive):
        if result is None or isinstance(result, Refused):
            return machine.keys_updated(now, result)
    elif isinstance(effect, NeedKeys) and isinstance(machine, BackfillPuller):
        if result is None or isinstance(result, Refused):
            return machine.keys_updated(now)  # a page's events whose keys stay unknown are refused
    elif isinstance(effect, (FetchDescriptor, SendRequest, NeedKeys)):
        raise LocalProtocolError(f"{type(machine).__name__} never asks for {type(effect).__name__}")
    else:
        raise LocalProtocolError(f"{type(effect).__name__} needs no answer from the host")
    raise LocalProtocolError(f"{type(effect).__name__} is answered with {_expected(effect)}, "
                             f"not {type(result).__name__}")


def _expected(effect: Effect) -> str:
    if isinstance(effect, FetchDescriptor):
        return "bytes or a Refused"
    if isinstance(effect, SendRequest):
        return "(status, body) or a Refused"
    return "None or a Refused"


def is_done(machine: Machine) -> bool:
    """Has ``machine`` ended (nothing more to ask)?"""
    if isinstance(machine, Receive):
        return machine.done
    if isinstance(machine, Initiator):
        return machine.state in (State.PEERED, State.FAILED)
    return machine.done is not None


def drive(machine: Machine, effects: list[Effect], perform: Callable[[Effect], Answer],
          clock: Callable[[], int]) -> list[Effect]:
    """The reference driver: carry out ``effects`` (a machine's ``start``) in
    order with ``perform`` (the host's I/O), answering each through
    :func:`answer`, until the machine is done.

    ``perform`` gets every effect: it does the I/O of those that need an
    answer and returns it, and carries out the others (its return value is
    then ignored). ``clock`` reads the host's clock (ms). Returns the effects
    that needed no answer, in order. Raises :class:`HostError` if the effects
    run out before the machine is done.
    """
    pending = list(effects)
    finished: list[Effect] = []
    while pending:
        effect = pending.pop(0)
        result = perform(effect)
        if isinstance(effect, (FetchDescriptor, SendRequest, NeedKeys)):
            pending += answer(machine, effect, result, clock())
        else:
            finished.append(effect)
    if not is_done(machine):
        raise HostError(f"{type(machine).__name__} is not done, but nothing is left to carry out")
    return finished


# -- conformance -------------------------------------------------------------------------------


class _Host(Protocol):
    def __call__(self, machine: Machine, effects: list[Effect],
                 perform: Callable[[Effect], Answer]) -> Any: ...


def check_driver(host_loop: _Host) -> None:
    """Run ``host_loop`` (a host's own driver loop: it must carry out every
    effect with ``perform`` and answer the machine) over a handshake and a
    paged backfill against in-memory peers; raise :class:`HostError` naming
    what went wrong if the host dropped an effect, answered wrongly or left a
    machine waiting.
    """
    from .keys import KeyRing
    from .node import Federation
    from .policy import Policy
    from .rooms import Head, chain_event

    now = 1_764_000_000_000
    us = Federation("us.test", keyring=KeyRing().generate(b"\x11" * 32, now),
                    policy=Policy("invite_only", frozenset({"them.test"})))
    them = Federation("them.test", keyring=KeyRing().generate(b"\x12" * 32, now),
                      policy=Policy("invite_only", frozenset({"us.test"})))
    descriptor = json.dumps(them.descriptor("https://them.test/_scaiwave/federation/v1")).encode()
    descriptors = {"them.test": descriptor,
                   "us.test": json.dumps(us.descriptor("https://us.test/_scaiwave/federation/v1")).encode()}
    learner = [us]  # whose key cache the host's NeedKeys fetches fill
    room = "!conformance:them.test"
    chain: list[Event] = []
    key = them.keyring.current
    assert key is not None
    for i in range(1, 8):
        head = Head(chain[-1].depth, chain[-1].event_id) if chain else None
        chain.append(chain_event(key, head=head, room_id=room, room_type="group",
                                 sender="@alice:them.test", type="m.create" if i == 1 else "m.message",
                                 ts=now, content={"creator": "@alice:them.test"} if i == 1 else {"body": f"m{i}"}))
    sent: list[SendRequest] = []
    stored: list[Event] = []
    seen: list[Effect] = []

    def perform(effect: Effect) -> Answer:
        seen.append(effect)
        if isinstance(effect, FetchDescriptor):
            return descriptor
        if isinstance(effect, NeedKeys):
            learned = learner[0].learn_descriptor(effect.server, descriptors[effect.server], now)
            return learned if isinstance(learned, Refused) else None
        if isinstance(effect, StoreEvents):
            stored.extend(effect.events)
            return None
        if isinstance(effect, SendRequest):
            sent.append(effect)
            if effect.target == HANDSHAKE_TARGET:
                # them.test's side, driven by the reference driver.
                inbound = them.receive(method="POST", target=effect.target, authorization=effect.authorization,
                                       body=effect.body)
                drive(inbound, inbound.start(now), lambda asked: _learn(them, asked, descriptors, now), lambda: now)
                assert inbound.auth is not None, inbound.refusal
                reply = them.on_handshake(inbound.auth, effect.body)
                assert not isinstance(reply, Refused), reply
                return 200, reply[0]
            query = dict(p.split("=", 1) for p in effect.target.partition("?")[2].split("&") if "=" in p)
            decision = parse_query(query)
            assert not isinstance(decision, Refused), decision
            before, limit = decision
            page = [e for e in reversed(chain) if before is None or e.depth < before][:min(limit, 3)]
            return 200, build_page(room, before, [e.envelope for e in page], [e.depth for e in page])
        return None

    handshake = Initiator(server_name="us.test", peer="them.test", keyring=us.keyring, policy=us.policy, keys=us.keys)
    host_loop(handshake, handshake.start(b"\x07" * 16), perform)
    if handshake.state != State.PEERED:
        raise HostError(f"the handshake ended in state {handshake.state!r}, not peered: "
                        f"{'no request was sent' if not sent else handshake.refusal}")
    if not any(isinstance(e, PeerAgreed) for e in seen):
        raise HostError("the host never carried out PeerAgreed (record the peer)")
    our_key = us.keyring.current
    assert our_key is not None
    pull = BackfillPuller(server_name="us.test", room_id=room, peer="them.test", key=our_key,
                          keys=us.keys, limit=len(chain), page_size=3)
    requests_before = len(sent)
    host_loop(pull, pull.start(now), perform)
    if pull.done is None:
        raise HostError(f"the backfill was left waiting after {len(sent) - requests_before} requests")
    if sorted(e.depth for e in stored) != [e.depth for e in chain]:
        raise HostError(f"the host stored {len(stored)} of {len(chain)} events (StoreEvents dropped?)")
    if not any(isinstance(e, BackfillDone) for e in seen) or any(isinstance(e, Failed) for e in seen):
        raise HostError("the backfill did not end cleanly with BackfillDone")
    # An inbound request from a server whose keys a fresh node does not hold yet.
    fresh = Federation("us.test", keyring=KeyRing().generate(b"\x14" * 32, now),
                       policy=Policy("invite_only", frozenset({"them.test"})))
    learner[0] = fresh
    target = "/_scaiwave/federation/v1/handshake"
    signed = them.sign(destination="us.test", method="POST", target=target, body=b"", now=now)
    assert isinstance(signed, str)
    inbound = fresh.receive(method="POST", target=target, authorization=signed, body=b"")
    asked = len(seen)
    host_loop(inbound, inbound.start(now), perform)
    if not any(isinstance(e, NeedKeys) for e in seen[asked:]):
        raise HostError("the host never carried out NeedKeys of an inbound request")
    if inbound.auth is None:
        raise HostError(f"the inbound request was left {'waiting' if not inbound.done else inbound.refusal}")


def _learn(node: Any, need: Effect, descriptors: dict[str, bytes], now: int) -> Answer:
    """The reference host's NeedKeys: fetch (here: look up) and learn the descriptor."""
    if not isinstance(need, NeedKeys):
        return None
    learned = node.learn_descriptor(need.server, descriptors[need.server], now)
    return learned if isinstance(learned, Refused) else None


def check_timer_host(tick: Callable[[Any, int], list[Effect]]) -> None:
    """Run a host's timer step ``tick(node, now)`` (it must call
    ``node.handle_timeout(now, seed=...)`` once ``now`` has reached
    ``node.poll_timeout()``, carry out what it returns, and return those
    effects) before and after a yearly key rotation falls due; raise
    :class:`HostError` if the host fired early, late or not at all."""
    from .keys import ROTATION_PERIOD_MS, KeyRing
    from .node import Federation

    start = 1_764_000_000_000
    node = Federation("us.test", keyring=KeyRing().generate(b"\x13" * 32, start))
    first = node.keyring.current
    assert first is not None
    due = node.poll_timeout()
    if due is None:
        raise HostError("a node with a key has no timer: poll_timeout() must name the rotation")
    if tick(node, start + 1) or node.keyring.current is not first:
        raise HostError("the host rotated the key before its timer was due")
    later = start + ROTATION_PERIOD_MS + 1
    effects = tick(node, later)
    current = node.keyring.current
    if current is None or current is first or not any(type(e).__name__ == "KeyRotated" for e in effects):
        raise HostError("the host did not fire the due timer (the key was not rotated, or KeyRotated not returned)")
    if current.created_at != later or first.key_id not in [o.key_id for o in node.keyring.old]:
        raise HostError("the host handed the timer another clock reading than its own")
