"""core.drive: one answer for every effect, the reference driver, and the conformance checks hosts run."""

from __future__ import annotations

import pytest

from corehelpers import B, NOW, descriptor_bytes, pair
from scaiwave_federation.core import (
    Code, FetchDescriptor, Initiator, LocalProtocolError, NeedKeys, Policy, Receive, Refused, SendRequest,
)
from scaiwave_federation.core.drive import HostError, answer, check_driver, check_timer_host, drive

P = "/_scaiwave/federation/v1/"


def reference(machine, effects, perform):
    return drive(machine, effects, perform, lambda: NOW)


def test_the_reference_driver_conforms():
    check_driver(reference)


def test_a_host_that_never_sends_its_requests_fails():
    def forgets_requests(machine, effects, perform):
        pending = list(effects)
        while pending:
            effect = pending.pop(0)
            result = perform(effect)
            if isinstance(effect, FetchDescriptor):
                pending += answer(machine, effect, result, NOW)
            # SendRequest: never answered (the host dropped its output)

    with pytest.raises(HostError, match="not peered"):
        check_driver(forgets_requests)


def test_a_host_that_stops_early_or_drops_storage_fails():
    def stops_after_one(machine, effects, perform):
        effect = effects[0]
        machine_effects = answer(machine, effect, perform(effect), NOW) if isinstance(
            effect, (FetchDescriptor, SendRequest)) else []
        return machine_effects

    with pytest.raises(HostError):
        check_driver(stops_after_one)

    def drops_storage(machine, effects, perform):
        return drive(machine, effects, lambda e: None if type(e).__name__ == "StoreEvents" else perform(e),
                     lambda: NOW)

    with pytest.raises(HostError, match="stored 0 of 7"):
        check_driver(drops_storage)


def test_the_driver_refuses_to_stop_a_machine_half_way():
    a, b = pair()
    machine = Initiator(server_name=a.server_name, peer=b.server_name, keyring=a.keyring, policy=a.policy,
                        keys=a.keys)
    with pytest.raises(HostError, match="not done"):
        drive(machine, [], lambda e: None, lambda: NOW)


def test_answer_takes_only_the_right_result_type():
    a, b = pair()
    machine = Initiator(server_name=a.server_name, peer=b.server_name, keyring=a.keyring, policy=a.policy,
                        keys=a.keys)
    (fetch,) = machine.start(b"\x01" * 16)
    with pytest.raises(LocalProtocolError, match="bytes or a Refused"):
        answer(machine, fetch, (200, b""), NOW)
    with pytest.raises(LocalProtocolError, match="needs no answer"):
        answer(machine, Refused(Code.MALFORMED), None, NOW)  # type: ignore[arg-type]
    (failed,) = answer(machine, fetch, Refused(Code.PEER_UNREACHABLE, "down"), NOW)
    assert failed.refusal.code is Code.PEER_UNREACHABLE


def test_timer_hosts():
    def good(node, now):
        due = node.poll_timeout()
        return node.handle_timeout(now, seed=b"\x22" * 32) if due is not None and now >= due else []

    check_timer_host(good)
    with pytest.raises(HostError, match="did not fire"):
        check_timer_host(lambda node, now: [])
    with pytest.raises(HostError, match="before its timer"):
        check_timer_host(lambda node, now: node.handle_timeout(now + 400 * 86_400_000, seed=b"\x22" * 32))


# -- Receive: an inbound request's key fetch is an effect -----------------------------------


def test_a_host_that_drops_an_inbound_requests_key_fetch_fails():
    def ignores_need_keys(machine, effects, perform):
        pending = list(effects)
        while pending:
            effect = pending.pop(0)
            result = perform(effect)
            if isinstance(effect, (FetchDescriptor, SendRequest)):
                pending += answer(machine, effect, result, NOW)
            elif isinstance(effect, NeedKeys) and not isinstance(machine, Receive):
                pending += answer(machine, effect, result, NOW)

    with pytest.raises(HostError, match="inbound request was left waiting"):
        check_driver(ignores_need_keys)


def _signed(sender, receiver, target=P + "handshake", now=NOW):
    return sender.sign(destination=receiver.server_name, method="POST", target=target, body=b"", now=now)


def test_receive_asks_once_for_keys_then_authenticates():
    a, b = pair()
    machine = a.receive(method="POST", target=P + "handshake", authorization=_signed(b, a), body=b"")
    effects = machine.start(NOW)
    assert effects == [NeedKeys(B, b.keyring.current.key_id)] and not machine.done
    assert a.learn_descriptor(B, descriptor_bytes(b), NOW) is not None
    assert answer(machine, effects[0], None, NOW) == []
    assert machine.auth is not None and machine.auth.origin == B and machine.route.endpoint == "handshake"
    with pytest.raises(LocalProtocolError):
        machine.keys_updated(NOW)  # nothing is waiting any more
    with pytest.raises(LocalProtocolError):
        machine.start(NOW)


def test_receive_a_failed_fetch_is_the_answer_unless_the_key_is_merely_unknown():
    a, b = pair()
    unreachable = Refused(Code.PEER_UNREACHABLE, "connection refused")
    machine = a.receive(method="POST", target=P + "handshake", authorization=_signed(b, a), body=b"")
    assert answer(machine, machine.start(NOW)[0], unreachable, NOW) == []
    assert machine.refusal == unreachable and machine.auth is None
    # Keys fetched, but the signing key is not among them: unknown_key, and no second fetch.
    machine = a.receive(method="POST", target=P + "handshake", authorization=_signed(b, a, now=NOW + 1), body=b"")
    assert answer(machine, machine.start(NOW + 1)[0], Refused(Code.UNKNOWN_KEY, "x"), NOW + 1) == []
    assert machine.refusal.code is Code.UNKNOWN_KEY and machine.auth is None


def test_receive_refuses_strangers_and_unknown_paths_without_asking_for_keys():
    a, b = pair()
    a.policy = Policy("closed")
    machine = a.receive(method="POST", target=P + "handshake", authorization=_signed(b, a), body=b"")
    assert machine.start(NOW) == [] and machine.refusal.code is Code.FEDERATION_CLOSED
    machine = a.receive(method="GET", target=P + "nowhere", authorization=_signed(b, a), body=b"")
    assert machine.start(NOW) == [] and machine.refusal.code is Code.NOT_FOUND and machine.route is None
