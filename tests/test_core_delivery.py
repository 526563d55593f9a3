"""The delivery machine (core/delivery.py): order, batching, backoff, once.

The stateful test drives any interleaving of enqueues, sends, answers
(accepted, refused for the moment, ``not_peered``, refused for good, a
transport failure), inbound requests, admin retries and time, and checks
after every step: one transaction in flight per peer, each carrying the
head of that peer's queue in order within the caps; nothing reported twice;
nothing dropped unless the peer finally refused it alone; at the end, after
the peers recover, everything delivered or dropped.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scaiwave_federation.core import Code, LocalProtocolError, Refused
from scaiwave_federation.core.delivery import (
    BATCH_EVENTS,
    QUIET_EVENTS,
    SEND_PREFIX,
    SHED_FAILURES,
    Deferred,
    Delivered,
    Delivery,
    Dropped,
    Rehandshake,
    backoff_ms,
)
from scaiwave_federation.core.handshake import refusal_body
from scaiwave_federation.core.rooms import decode_events_body

PEERS = ("a.test", "b.test:8449", "c.test")
OK = (200, b"\xa1gresults\x80")


def _events(item_id: int, n: int) -> list[bytes]:
    return [f"ev-{item_id}-{k}".encode() * 3 for k in range(n)]


def _drain(machine: Delivery) -> list:
    out = []
    while (event := machine.poll()) is not None:
        out.append(event)
    return out


def test_backoff_schedule():
    assert [backoff_ms(n) for n in range(0, 6)] == [0, 1000, 2000, 4000, 8000, 16000]
    assert backoff_ms(10) == 300_000 and backoff_ms(10**9) == 300_000
    with pytest.raises(ValueError):
        backoff_ms(-1)


def test_batches_everything_queued_while_one_is_in_flight():
    m = Delivery(pace_ms=0)
    m.handle_enqueue("a.test", 1, _events(1, 1))
    first = m.poll_transmit(0)
    assert first is not None and first.item_ids == (1,)
    for i in range(2, 120):  # queued while the first is in flight
        m.handle_enqueue("a.test", i, _events(i, 1))
    assert m.poll_transmit(0) is None  # one in flight per peer
    m.handle_result("a.test", first.txn_id, OK, 1)
    assert _drain(m) == [Delivered(peer="a.test", item_ids=(1,))]
    second = m.poll_transmit(1)
    assert second.item_ids == tuple(range(2, 2 + BATCH_EVENTS)) and second.events == BATCH_EVENTS
    envelopes, _ = decode_events_body(second.body)
    assert envelopes == [e for i in second.item_ids for e in _events(i, 1)]
    assert second.target == SEND_PREFIX + second.txn_id


def test_one_transaction_per_pace_unless_a_full_batch_waits():
    m = Delivery(pace_ms=20)
    m.handle_enqueue("a.test", 1, [b"e1"])
    t = m.poll_transmit(1000)  # the first after a quiet spell: at once
    m.handle_enqueue("a.test", 2, [b"e2"])
    m.handle_result("a.test", t.txn_id, OK, 1003)
    assert m.poll_transmit(1003) is None and m.poll_timeout() == 1020
    for i in range(3, 3 + BATCH_EVENTS):
        m.handle_enqueue("a.test", i, [b"e%d" % i])
    full = m.poll_transmit(1004)  # a full batch does not wait
    assert full is not None and full.events == BATCH_EVENTS and full.item_ids[0] == 2
    m.handle_result("a.test", full.txn_id, OK, 1005)
    assert m.poll_transmit(1005) is None and m.poll_timeout() == 1024
    assert m.poll_transmit(1024).item_ids == (2 + BATCH_EVENTS,)
    with pytest.raises(LocalProtocolError):
        Delivery(pace_ms=-1)


def test_the_end_of_a_burst_goes_once_the_queue_is_quiet_not_at_the_pace():
    m = Delivery(pace_ms=50, quiet_ms=10)
    m.handle_enqueue("a.test", 1, [b"e1"], now=1000)
    first = m.poll_transmit(1000)
    burst = range(2, 2 + QUIET_EVENTS + 5)  # an event every millisecond from 1002
    for i in burst:
        m.handle_enqueue("a.test", i, [b"e%d" % i], now=1000 + i)
        if i == 3:
            m.handle_result("a.test", first.txn_id, OK, 1003)
            assert _drain(m) == [Delivered(peer="a.test", item_ids=(1,))]
        # While it lasts, nothing goes before the pace (1050), and no post wakes the sender.
        assert not m.due_now("a.test", 1000 + i) and m.poll_transmit(1000 + i) is None
    last = 1000 + burst[-1]
    # It ends: what it queued goes quiet_ms after its last event, not at 1050.
    assert m.poll_timeout() == last + 10 < 1050
    assert m.poll_transmit(last + 9) is None
    batch = m.poll_transmit(last + 10)
    assert batch is not None and batch.item_ids == tuple(burst)


def test_a_small_batch_and_a_host_that_gives_no_time_keep_the_pace():
    for timed in (True, False):
        m = Delivery(pace_ms=50, quiet_ms=10)
        m.handle_enqueue("a.test", 1, [b"e1"], now=1000 if timed else None)
        first = m.poll_transmit(1000)
        # Fewer than QUIET_EVENTS; or more, from a host that does not say when.
        events = QUIET_EVENTS - 1 if timed else QUIET_EVENTS + 5
        for i in range(2, 2 + events):
            m.handle_enqueue("a.test", i, [b"e%d" % i], now=1000 + i if timed else None)
        m.handle_result("a.test", first.txn_id, OK, 1001)
        assert m.poll_timeout() == 1050
        assert m.poll_transmit(1049) is None and m.poll_transmit(1050) is not None
    with pytest.raises(LocalProtocolError):
        Delivery(quiet_ms=-1)


def test_byte_cap_and_oversized_item_goes_alone():
    m = Delivery(batch_bytes=100, pace_ms=0)
    m.handle_enqueue("a.test", 1, [b"x" * 500])
    m.handle_enqueue("a.test", 2, [b"y" * 40])
    m.handle_enqueue("a.test", 3, [b"z" * 40])
    m.handle_enqueue("a.test", 4, [b"w" * 40])
    t = m.poll_transmit(0)
    assert t.item_ids == (1,)
    m.handle_result("a.test", t.txn_id, OK, 0)
    assert m.poll_transmit(0).item_ids == (2, 3)


def test_txn_id_names_the_contents():
    a, b = Delivery(), Delivery()
    for m in (a, b):
        m.handle_enqueue("a.test", 7, [b"one"])
    same = [a.poll_transmit(0), b.poll_transmit(0)]
    assert same[0].txn_id == same[1].txn_id  # a retry of the same items is the same transaction
    c = Delivery()
    c.handle_enqueue("a.test", 7, [b"two"])  # a restored backup reusing outbox id 7
    assert c.poll_transmit(0).txn_id != same[0].txn_id


def test_retryable_refusal_backs_off_then_inbound_brings_retry_forward():
    m = Delivery(pace_ms=0)
    m.handle_enqueue("a.test", 1, [b"e1"])
    m.handle_enqueue("a.test", 2, [b"e2"])
    t = m.poll_transmit(1000)
    m.handle_result("a.test", t.txn_id, Refused(Code.PEER_UNREACHABLE, "down"), 1000)
    assert _drain(m) == [Deferred(peer="a.test", item_id=1, attempts=1, retry_at=2000,
                                  refusal=Refused(Code.PEER_UNREACHABLE, "down"))]
    assert m.poll_transmit(1999) is None and m.poll_timeout() == 2000
    t = m.poll_transmit(2000)
    assert t.item_ids == (1, 2)
    m.handle_result("a.test", t.txn_id, (503, refusal_body(Refused(Code.TIMEOUT))), 2000)
    assert _drain(m)[0].retry_at == 4000  # doubled
    assert m.handle_inbound("b.test", 2500) is False  # nothing queued for it
    assert m.handle_inbound("a.test", 2500) is True  # the peer is up: retry now
    assert m.poll_timeout() == 2500 and m.poll_transmit(2500).item_ids == (1, 2)
    assert m.handle_inbound("a.test", 2600) is False  # in flight already


def test_not_peered_asks_for_a_handshake():
    m = Delivery(pace_ms=0)
    m.handle_enqueue("a.test", 1, [b"e1"])
    t = m.poll_transmit(0)
    m.handle_result("a.test", t.txn_id, (403, refusal_body(Refused(Code.NOT_PEERED))), 0)
    events = _drain(m)
    assert events[0] == Rehandshake(peer="a.test") and isinstance(events[1], Deferred)


def test_final_refusal_of_a_batch_splits_it_and_drops_only_the_refused_item():
    m = Delivery(pace_ms=0)
    for i in (1, 2, 3):
        m.handle_enqueue("a.test", i, [f"e{i}".encode()])
    t = m.poll_transmit(0)
    assert t.item_ids == (1, 2, 3)
    forbidden = (403, refusal_body(Refused(Code.FORBIDDEN, "no")))
    m.handle_result("a.test", t.txn_id, forbidden, 0)
    assert _drain(m) == [] and m.backoff("a.test") == (0, 0)
    answers = {1: OK, 2: forbidden, 3: OK}
    seen = []
    while (t := m.poll_transmit(0)) is not None:
        assert len(t.item_ids) == 1
        m.handle_result("a.test", t.txn_id, answers[t.item_ids[0]], 0)
        seen += _drain(m)
    assert [type(e).__name__ for e in seen] == ["Delivered", "Dropped", "Delivered"]
    assert seen[1].item_ids == (2,) and seen[1].refusal.code is Code.FORBIDDEN


def test_restart_resumes_the_stored_backoff():
    m = Delivery(pace_ms=0)
    m.handle_enqueue("a.test", 5, [b"e"], attempts=3, retry_at=9000)
    m.handle_enqueue("a.test", 6, [b"f"])
    assert m.backoff("a.test") == (3, 9000) and m.poll_transmit(8999) is None
    assert m.retry_now("a.test", 100) == 2 and m.poll_transmit(100).item_ids == (5, 6)


def test_misuse_raises():
    m = Delivery(pace_ms=0)
    with pytest.raises(LocalProtocolError):
        m.handle_enqueue("a.test", 1, [])
    with pytest.raises(LocalProtocolError):
        m.handle_result("a.test", "nope", OK, 0)
    with pytest.raises(LocalProtocolError):
        Delivery(batch_events=0)
    m.handle_enqueue("a.test", 1, [b"x"])
    assert m.handle_enqueue("a.test", 1, [b"x"]) is False  # an id is queued once
    with pytest.raises(LocalProtocolError, match="queued for a.test already"):
        m.handle_enqueue("b.test", 1, [b"x"])  # and for one peer: the item stays a.test's alone
    assert m.pending("b.test") == 0 and m.pending("a.test") == 1
    t = m.poll_transmit(0)
    with pytest.raises(LocalProtocolError):
        m.handle_result("b.test", t.txn_id, OK, 0)


ANSWERS = st.sampled_from(["ok", "ok", "ok", "unreachable", "rate_limited", "not_peered", "forbidden",
                           "garbage_500"])


def _answer(kind: str) -> tuple[int, bytes] | Refused:
    return {
        "ok": OK,
        "unreachable": Refused(Code.PEER_UNREACHABLE, "connection refused"),
        "rate_limited": (429, refusal_body(Refused(Code.RATE_LIMITED))),
        "not_peered": (403, refusal_body(Refused(Code.NOT_PEERED))),
        "forbidden": (403, refusal_body(Refused(Code.FORBIDDEN))),
        "garbage_500": (500, b"\xff\x00"),
    }[kind]


class DeliveryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m = Delivery(batch_events=5, batch_bytes=400)
        self.now = 0
        self.next_id = 1
        self.queued: dict[str, list[int]] = {p: [] for p in PEERS}  # the model: not yet reported, in order
        self.sizes: dict[int, tuple[int, int]] = {}
        self.flight: dict[str, object] = {}
        self.reported: set[int] = set()
        self.delivered: dict[str, list[int]] = {p: [] for p in PEERS}
        #: Items whose last answer was a final refusal of them alone: only these may be dropped.
        self.refused_alone: set[int] = set()

    @rule(peer=st.sampled_from(PEERS), n=st.integers(1, 3), big=st.booleans())
    def enqueue(self, peer, n, big):
        item = self.next_id
        self.next_id += 1
        envelopes = [(b"B" if big else b"s") * (150 if big else 10) + str(item).encode()] * n
        assert self.m.handle_enqueue(peer, item, envelopes, now=self.now)
        self.queued[peer].append(item)
        self.sizes[item] = (n, sum(len(e) for e in envelopes))

    @rule()
    def transmit(self):
        while (t := self.m.poll_transmit(self.now)) is not None:
            assert t.peer not in self.flight
            head = self.queued[t.peer][:len(t.item_ids)]
            assert list(t.item_ids) == head  # the head of the queue, in order
            if len(t.item_ids) > 1:
                assert sum(self.sizes[i][0] for i in t.item_ids) <= 5
                assert sum(self.sizes[i][1] for i in t.item_ids) <= 400
            envelopes, _ = decode_events_body(t.body)
            assert len(envelopes) == t.events == sum(self.sizes[i][0] for i in t.item_ids)
            self.flight[t.peer] = t

    @precondition(lambda self: self.flight)
    @rule(data=st.data(), kind=ANSWERS)
    def answer(self, data, kind):
        peer = data.draw(st.sampled_from(sorted(self.flight)))
        t = self.flight.pop(peer)
        if kind == "forbidden" and len(t.item_ids) == 1:
            self.refused_alone.add(t.item_ids[0])
        self.m.handle_result(peer, t.txn_id, _answer(kind), self.now)
        self._collect()

    @rule(ms=st.integers(0, 400_000))
    def wait(self, ms):
        self.now += ms

    @rule(peer=st.sampled_from(PEERS))
    def inbound(self, peer):
        if self.m.handle_inbound(peer, self.now) and not self.m.paused(peer):
            # The backoff is over; only the pace may still hold it a moment.
            assert self.m.poll_timeout() <= self.now + self.m.pace_ms

    @rule(peer=st.sampled_from(PEERS))
    def admin_retry(self, peer):
        assert self.m.retry_now(peer, self.now) == len(self.queued[peer])

    @rule(peer=st.sampled_from(PEERS), paused=st.booleans())
    def admin_pause(self, peer, paused):
        if paused:
            self.m.pause(peer)
        else:
            self.m.resume(peer)

    def _collect(self):
        while (event := self.m.poll()) is not None:
            if isinstance(event, (Delivered, Dropped)):
                for item in event.item_ids:
                    assert item not in self.reported  # once
                    self.reported.add(item)
                    assert self.queued[event.peer][0] == item  # in queue order
                    self.queued[event.peer].pop(0)
                if isinstance(event, Dropped):
                    assert len(event.item_ids) == 1 and event.item_ids[0] in self.refused_alone
                else:
                    self.delivered[event.peer] += event.item_ids

    @invariant()
    def model_agrees(self):
        for item in range(1, self.next_id):
            assert self.m.queued(item) == (item not in self.reported)
        for peer in PEERS:
            assert self.m.pending(peer) == len(self.queued[peer])
            # due_now (what the host asks after an enqueue) is poll_timeout's answer for that one peer.
            due = self.m.poll_timeout(may_send=lambda p, peer=peer: p == peer)
            assert self.m.due_now(peer, self.now) == (due is not None and due <= self.now)
            assert self.delivered[peer] == sorted(self.delivered[peer])
            waiting = self.m.poll_timeout()
            if self.queued[peer] and peer not in self.flight and not self.m.paused(peer):
                assert waiting is not None
        # The due-time heap answers what a scan of every peer would (the scan it replaced).
        scan = [self.m._due_at(s) for s in self.m._peers.values()
                if s.in_flight is None and not s.paused and s.queue]
        assert self.m.poll_timeout() == (min(scan) if scan else None)

    def teardown(self):
        # The peers recover: everything still queued is delivered.
        for peer in PEERS:
            self.m.resume(peer)
        for _ in range(10_000):
            self.now += 400_000
            self.transmit()
            if not self.flight:
                break
            for peer in sorted(self.flight):
                t = self.flight.pop(peer)
                self.m.handle_result(peer, t.txn_id, OK, self.now)
            self._collect()
        assert all(not q for q in self.queued.values()), self.queued
        assert self.reported == set(range(1, self.next_id))
        assert self.m.poll_timeout() is None


TestDeliveryMachine = DeliveryMachine.TestCase
TestDeliveryMachine.settings = settings(max_examples=500, stateful_step_count=60, deadline=None)


@given(st.lists(st.tuples(st.sampled_from(PEERS), st.integers(1, 4)), min_size=1, max_size=40))
def test_any_queue_is_delivered_in_order_in_batches(items):
    m = Delivery(batch_events=7, pace_ms=0)
    expected: dict[str, list[int]] = {}
    for i, (peer, n) in enumerate(items):
        m.handle_enqueue(peer, i, _events(i, n))
        expected.setdefault(peer, []).append(i)
    got: dict[str, list[int]] = {}
    while (t := m.poll_transmit(0)) is not None:
        assert t.events <= 7 or len(t.item_ids) == 1
        m.handle_result(t.peer, t.txn_id, OK, 0)
        for e in _drain(m):
            got.setdefault(e.peer, []).extend(e.item_ids)
    assert got == expected


def test_a_paused_peer_keeps_its_queue_and_sends_it_in_order_on_resume():
    m = Delivery(pace_ms=0)
    m.pause("a.test")
    for i in (1, 2, 3):
        m.handle_enqueue("a.test", i, _events(i, 1))
    m.handle_enqueue("b.test", 9, _events(9, 1))
    sent = m.poll_transmit(0)
    assert sent is not None and sent.peer == "b.test"  # other peers go on
    assert m.poll_transmit(0) is None and m.paused("a.test") and m.pending("a.test") == 3
    assert m.poll_timeout() is None  # a paused queue is no timer
    m.resume("a.test")
    resumed = m.poll_transmit(0)
    assert resumed is not None and resumed.peer == "a.test" and resumed.item_ids == (1, 2, 3)


def test_forgetting_a_peer_drops_its_queue_and_ignores_the_answer_in_flight():
    m = Delivery(pace_ms=0)
    for i in (1, 2):
        m.handle_enqueue("a.test", i, _events(i, 1))
    txn = m.poll_transmit(0)
    assert txn is not None
    m.handle_enqueue("a.test", 3, _events(3, 1))
    assert m.forget("a.test") == (1, 2, 3) and m.pending("a.test") == 0
    assert not any(m.queued(i) for i in (1, 2, 3))  # a look may hand them to a new holder
    m.handle_result("a.test", txn.txn_id, OK, 1)  # the answer to a forgotten peer: nothing happens
    assert _drain(m) == [] and m.poll_transmit(1) is None
    with pytest.raises(LocalProtocolError):
        m.handle_result("a.test", txn.txn_id, OK, 2)  # but only once
    assert m.forget("never.test") == ()


def test_an_item_handed_over_late_goes_in_id_order_behind_what_is_in_flight() -> None:
    m = Delivery()
    m.handle_enqueue("a.test", 5, [b"e5"])
    first = m.poll_transmit(0)
    assert first is not None and first.item_ids == (5,)
    m.handle_enqueue("a.test", 9, [b"e9"])
    m.handle_enqueue("a.test", 7, [b"e7"])  # another worker's row, seen late
    m.handle_enqueue("a.test", 3, [b"e3"])  # lower than what is in flight: next, not before it
    m.handle_result("a.test", first.txn_id, OK, 1)
    nxt = m.poll_transmit(1000)
    assert nxt is not None and nxt.item_ids == (3, 7, 9)


def test_a_peers_window_bounds_what_is_held_in_memory() -> None:
    d = Delivery(window_events=4, window_bytes=1000)
    assert not d.full("b.test") and d.wants_more("b.test") and d.room("b.test") == 4
    for item_id in range(1, 4):
        d.handle_enqueue("b.test", item_id, [b"x" * 10])
    assert not d.full("b.test") and d.room("b.test") == 1 and not d.wants_more("b.test")
    d.handle_enqueue("b.test", 4, [b"x" * 10])
    assert d.full("b.test") and d.room("b.test") == 0
    # Bytes count too: one big item fills it.
    d.handle_enqueue("c.test", 10, [b"y" * 1000])
    assert d.full("c.test") and not d.full("d.test")
    # Drained to half: time to read more.
    txn = d.poll_transmit(0)
    assert txn is not None and txn.peer == "b.test"
    d.handle_result("b.test", txn.txn_id, (200, b""), 0)
    assert not d.full("b.test") and d.wants_more("b.test") and d.room("b.test") == 4


def test_a_window_holds_at_least_one_event_and_one_byte() -> None:
    with pytest.raises(LocalProtocolError):
        Delivery(window_events=0)
    with pytest.raises(LocalProtocolError):
        Delivery(window_bytes=0)


def test_a_peer_that_keeps_failing_keeps_one_batch_in_memory() -> None:
    d = Delivery(batch_events=2, window_events=10)
    for item in range(1, 6):
        d.handle_enqueue("b.test", item, [b"e%d" % item])
    now = 0
    for failures in range(1, SHED_FAILURES + 1):
        txn = d.poll_transmit(now)
        assert txn is not None and txn.item_ids == (1, 2)
        d.handle_result("b.test", txn.txn_id, Refused(Code.PEER_UNREACHABLE, "down"), now)
        kept = d.shed("b.test")
        if failures < SHED_FAILURES:
            assert kept is None and d.pending("b.test") == 5 and not d.full("b.test")
        now += 400_000
    # Down three times in a row: only the batch its retry sends stays in memory.
    assert kept == 2 and d.pending("b.test") == 2
    assert not d.queued(3) and d.queued(2)
    assert d.full("b.test") and d.room("b.test") == 0 and not d.wants_more("b.test")
    assert d.shed("b.test") is None  # nothing more to let go
    # Back: the batch goes, and the whole window is open again.
    txn = d.poll_transmit(now)
    assert txn is not None and txn.item_ids == (1, 2)
    d.handle_result("b.test", txn.txn_id, OK, now)
    assert d.wants_more("b.test") and d.room("b.test") == 10 and not d.full("b.test")
