"""core.drive: one answer for every effect, the reference driver, and the conformance checks hosts run."""

from __future__ import annotations

import pytest

from corehelpers import NOW, pair
from scaiwave_federation.core import Code, FetchDescriptor, Initiator, LocalProtocolError, Refused, SendRequest
from scaiwave_federation.core.drive import HostError, answer, check_driver, check_timer_host, drive


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
