"""The handover (core/handover.py): every peer's rows reach delivery in id order.

The stateful test runs one holder's :class:`Handover` and :class:`Delivery`
machines against a model of the shared outbox, with other workers queueing
rows for the same peers in any interleaving (writes one at a time: ids
commit in order, as on both backends). Each of the host's asynchronous
steps is split where the shell awaits: the holder's storage call (queue a
row, read the rows below it) runs before its callback (which runs before
any later storage call of the holder's answers, as ``AsyncStore`` does); a look reads the
new ids, then the rows, then hands them over; a removal commits after the
machine finished the rows; a peer is lost and taken again (its queue read,
then handed over). The delivery machine holds a window of three events per
peer: rows beyond it wait in the outbox and are read back by refills (read,
then handed over, with anything between), a peer taken starts behind and is
read by refills. After every step:
each peer was sent its rows in increasing id order since the holder
(re)took it, and the machine holds no more than its window. At the end,
after refills, a resync look and a drain: every row was delivered and the
outbox is empty.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scaiwave_federation.core import Code, Delivered, Delivery, Handover, Refused, encode_events_body

PEERS = ("b.test", "c.test")
WINDOW = 3
BODY = encode_events_body([b"event"])


class Outbox:
    """The shared outbox: rows committed one at a time, ids in commit order."""

    def __init__(self) -> None:
        self.rows: dict[int, str] = {}  # id -> peer
        self.next_id = 1

    def queue(self, peer: str) -> int:
        item_id, self.next_id = self.next_id, self.next_id + 1
        self.rows[item_id] = peer
        return item_id

    def after(self, after_id: int) -> list[tuple[int, str]]:
        return sorted((i, p) for i, p in self.rows.items() if i > after_id)

    def between(self, peer: str, after_id: int, before_id: int) -> list[int]:
        return sorted(i for i, p in self.rows.items() if p == peer and after_id < i < before_id)

    def of(self, peers: set[str]) -> list[tuple[int, str]]:
        return sorted((i, p) for i, p in self.rows.items() if p in peers)

    def read(self, ids: list[int]) -> list[dict[str, object]]:
        return [self._row(i) for i in ids if i in self.rows]

    def next_of(self, peer: str, after_id: int, limit: int) -> list[dict[str, object]]:
        return [self._row(i) for i in sorted(i for i, p in self.rows.items() if p == peer and i > after_id)[:limit]]

    def _row(self, item_id: int) -> dict[str, object]:
        return {"id": item_id, "peer": self.rows[item_id], "body": BODY, "attempts": 0, "next_attempt_at": 0}


class HandoverMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.outbox = Outbox()
        self.handover = Handover()
        self.delivery = Delivery(window_events=WINDOW, batch_events=2)  # a peer failing keeps 2
        self.held: set[str] = set(PEERS)
        #: Refills read, not yet handed over: peer -> (rows, how many were asked for).
        self.refills: dict[str, tuple[list[dict[str, object]], int]] = {}
        self.now = 0
        #: The holder's storage calls done, callbacks not yet run: (peer, id, rows below).
        self.callbacks: list[tuple[str, int, list[int] | None]] = []
        self.look: tuple[int, list[int], bool] | None = None  # (number, ids to read, resync)
        self.removals: list[tuple[int, ...]] = []
        self.in_flight: dict[str, tuple[str, tuple[int, ...]]] = {}
        #: Per peer, the ids sent since the holder last took it (must increase).
        self.sent: dict[str, list[int]] = {p: [] for p in PEERS}
        self.delivered: set[int] = set()

    def _enqueue(self, rows: list[dict[str, object]], peers: set[str]) -> None:
        _handed, unreadable = self.handover.hand_over(self.delivery, rows, peers)
        assert not unreadable

    # -- writers ---------------------------------------------------------------

    @rule(peer=st.sampled_from(PEERS))
    def another_worker_queues(self, peer: str) -> None:
        self.outbox.queue(peer)

    @rule(peer=st.sampled_from(PEERS))
    def holder_queues(self, peer: str) -> None:
        # The floor is read when the call is submitted, the rows below once
        # ours committed, in the same call; the callback runs later.
        floor = self.handover.floor(peer) if peer in self.held else None
        item_id = self.outbox.queue(peer)
        below = self.outbox.between(peer, floor, item_id) if floor is not None else None
        self.callbacks.append((peer, item_id, below))

    @precondition(lambda self: self.callbacks)
    @rule()
    def holder_callback(self) -> None:
        peer, item_id, below = self.callbacks.pop(0)
        if self.handover.stays(peer, self.delivery.full(peer)) or peer not in self.held:
            return  # waits for a refill, or not ours to send
        if self.handover.handle_queued(peer, (item_id,), below, self.delivery.queued):
            self.delivery.handle_enqueue(peer, item_id, [b"event"])

    # -- looks -----------------------------------------------------------------

    def _read(self) -> None:
        """The holder's storage calls run one at a time, in order, and each
        call's callback runs before a later call's result is handed back
        (``AsyncStore.submit(then=)``): a read sees the holder's own rows
        only after their callbacks ran."""
        while self.callbacks:
            self.holder_callback()

    @precondition(lambda self: self.look is None)
    @rule(resync=st.booleans())
    def look_reads_ids(self, resync: bool) -> None:
        self._read()
        number = self.handover.look_started()
        if resync:
            ids = self.handover.handle_resync(self.outbox.of(set(self.held)), self.delivery.queued)
        else:
            ids = self.handover.handle_look(self.outbox.after(self.handover.seen), lambda p: p in self.held,
                                            self.delivery.queued)
        self.look = (number, ids, resync)

    @precondition(lambda self: self.look is not None)
    @rule()
    def look_hands_over(self) -> None:
        assert self.look is not None
        number, ids, _resync = self.look
        self._read()
        self._enqueue(self.outbox.read(ids), set(self.held))
        self.handover.look_done(number)
        self.look = None

    # -- a peer lost and taken again -----------------------------------------------

    @rule(peer=st.sampled_from(PEERS))
    def peer_lost(self, peer: str) -> None:
        if peer not in self.held or peer in self.in_flight:
            return
        self.held.discard(peer)
        self.delivery.forget(peer)
        self.handover.forget(peer)
        self.refills.pop(peer, None)

    @rule(peer=st.sampled_from(PEERS))
    def peer_taken(self, peer: str) -> None:
        # Behind from before its lease is recorded (one step for the host: no
        # await between), then read by refills, a window at a time.
        if peer in self.held:
            return
        self.handover.take(peer)
        self.held.add(peer)
        self.sent[peer] = []  # a new holding period: what was in flight before may go again

    # -- refills -----------------------------------------------------------------

    @rule(peer=st.sampled_from(PEERS))
    def refill_reads(self, peer: str) -> None:
        if peer in self.refills or peer not in self.held or not self.delivery.wants_more(peer):
            return
        after = self.handover.refill_from(peer)
        if after is None:
            return
        self._read()
        limit = self.delivery.room(peer)
        self.refills[peer] = (self.outbox.next_of(peer, after, limit), limit)

    @precondition(lambda self: self.refills)
    @rule(data=st.data())
    def refill_hands_over(self, data: st.DataObject) -> None:
        # No _read(): the holder's later storage calls' callbacks may run before or after.
        peer = data.draw(st.sampled_from(sorted(self.refills)))
        rows, limit = self.refills.pop(peer)
        if peer in self.held:
            _handed, unreadable = self.handover.hand_over(self.delivery, rows, {peer}, refill=(peer, limit))
            assert not unreadable

    # -- delivery --------------------------------------------------------------

    @rule()
    def send(self) -> None:
        self.now += 300_000  # past any pace and backoff
        txn = self.delivery.poll_transmit(self.now, may_send=lambda p: p in self.held)
        if txn is None:
            return
        self.sent[txn.peer] += list(txn.item_ids)
        self.in_flight[txn.peer] = (txn.txn_id, txn.item_ids)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def peer_answers(self, data: st.DataObject) -> None:
        self._answer(data.draw(st.sampled_from(sorted(self.in_flight))))

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def peer_fails(self, data: st.DataObject) -> None:
        # A refusal of the moment: the batch waits, with backoff; after a few
        # in a row the machine keeps only that batch (shed), in the same step.
        peer = data.draw(st.sampled_from(sorted(self.in_flight)))
        txn_id, ids = self.in_flight.pop(peer)
        del self.sent[peer][len(self.sent[peer]) - len(ids):]  # not delivered: sent again later
        self.delivery.handle_result(peer, txn_id, Refused(Code.PEER_UNREACHABLE, "down"), self.now)
        self.handover.shed(self.delivery, peer)
        while self.delivery.poll() is not None:
            pass

    def _answer(self, peer: str) -> None:
        txn_id, _ids = self.in_flight.pop(peer)
        self.delivery.handle_result(peer, txn_id, (200, b""), self.now)
        self.handover.shed(self.delivery, peer)
        while (event := self.delivery.poll()) is not None:
            if isinstance(event, Delivered):
                self.delivered |= set(event.item_ids)
                self.handover.finished(event.item_ids)
                self.removals.append(event.item_ids)

    @precondition(lambda self: self.removals)
    @rule()
    def removal_commits(self) -> None:
        ids = self.removals.pop(0)
        for item_id in ids:
            self.outbox.rows.pop(item_id, None)
        self.handover.removed(ids)

    # -- checks ----------------------------------------------------------------

    @invariant()
    def each_peer_in_id_order(self) -> None:
        for peer, ids in self.sent.items():
            assert ids == sorted(set(ids)), f"{peer} was sent {ids}"

    @invariant()
    def no_more_than_a_window_in_memory(self) -> None:
        for peer in PEERS:
            assert self.delivery.pending(peer) <= WINDOW, (peer, self.delivery.pending(peer))

    def teardown(self) -> None:
        # Everything settles: callbacks run, the look ends, refills read end,
        # the peers are taken, a resync look, then deliver and refill until
        # nothing is left.
        while self.callbacks:
            self.holder_callback()
        if self.look is not None:
            self.look_hands_over()
        for peer in sorted(self.refills):
            rows, limit = self.refills.pop(peer)
            if peer in self.held:
                self.handover.hand_over(self.delivery, rows, {peer}, refill=(peer, limit))
        for peer in PEERS:
            self.peer_taken(peer)
        self.look_reads_ids(True)
        self.look_hands_over()
        for _ in range(10_000):
            for peer in PEERS:
                self.refill_reads(peer)
            for peer in sorted(self.refills):
                rows, limit = self.refills.pop(peer)
                self.handover.hand_over(self.delivery, rows, {peer}, refill=(peer, limit))
            self.send()
            if not self.in_flight and not self.removals and not self.outbox.rows:
                break
            for peer in sorted(self.in_flight):
                self._answer(peer)
            while self.removals:
                self.removal_commits()
        self.each_peer_in_id_order()
        assert not self.outbox.rows, f"left in the outbox: {self.outbox.rows}"
        assert self.delivered == set(range(1, self.outbox.next_id))


TestHandover = HandoverMachine.TestCase
TestHandover.settings = __import__("hypothesis").settings(max_examples=1000, stateful_step_count=80, deadline=None)


def test_own_rows_wait_behind_a_lower_row_not_yet_handed_over() -> None:
    """The case the rule exists for: another worker queued id 1 for b.test;
    the holder queued id 2 before its look saw 1. Handing 2 over at once
    would send it ahead of 1 (the peer refuses it as chain_broken)."""
    handover, delivery = Handover(), Delivery()
    assert handover.floor("b.test") == 0
    assert not handover.handle_queued("b.test", (2,), [1], delivery.queued)
    # The look hands both over, in order.
    ids = handover.handle_look([(1, "b.test"), (2, "b.test")], lambda p: True, delivery.queued)
    assert ids == [1, 2]
    # Once 1 is in the machine, the holder's own next row goes at once.
    for row in handover.handle_rows([{"id": 2, "peer": "b.test"}, {"id": 1, "peer": "b.test"}], {"b.test"}):
        delivery.handle_enqueue("b.test", row["id"], [b"e"])
    assert handover.handle_queued("b.test", (3,), [1, 2], delivery.queued)
    assert handover.floor("b.test") == 3
    txn = delivery.poll_transmit(0)
    assert txn is not None and txn.item_ids == (1, 2)


def test_a_finished_row_still_in_the_outbox_does_not_hold_rows_back() -> None:
    handover, delivery = Handover(), Delivery()
    handover.finished((1,))  # delivered, its removal not yet committed
    assert handover.handle_queued("b.test", (2,), [1], delivery.queued)
    # ... nor is it handed over again by a look that still sees it.
    assert handover.handle_look([(1, "b.test")], lambda p: True, delivery.queued) == []
    handover.removed((1,))
    look = handover.look_started()
    handover.look_done(look)  # began after the removal: 1 is forgotten
    assert not handover.is_finished(1)


def _window_of_two() -> tuple[Handover, Delivery]:
    """b.test's window (two events) full with rows 1 and 2; row 3 waits in the outbox."""
    handover, delivery = Handover(), Delivery(window_events=2)
    for item_id in (1, 2):
        assert not handover.stays("b.test", delivery.full("b.test"))
        assert handover.handle_queued("b.test", (item_id,), [], delivery.queued)
        delivery.handle_enqueue("b.test", item_id, [b"e"])
    assert handover.stays("b.test", delivery.full("b.test"))  # row 3: the window is full
    assert handover.behind("b.test")
    return handover, delivery


def _drain(delivery: Delivery, now: int = 10_000) -> list[int]:
    txn = delivery.poll_transmit(now)
    assert txn is not None
    delivery.handle_result("b.test", txn.txn_id, (200, b""), now)
    return list(txn.item_ids)


def _row(item_id: int) -> dict[str, object]:
    return {"id": item_id, "peer": "b.test", "body": encode_events_body([b"e"]), "attempts": 0,
            "next_attempt_at": 0}


def test_a_peer_past_its_window_waits_in_the_outbox_and_is_read_back_in_order() -> None:
    handover, delivery = _window_of_two()
    assert delivery.pending("b.test") == 2  # not 3: row 3 is in the outbox only
    assert _drain(delivery) == [1, 2]
    assert delivery.wants_more("b.test")
    after = handover.refill_from("b.test")
    assert after == 2
    # The refill asks for two rows, finds one (3): the peer is level again.
    handed, unreadable = handover.hand_over(delivery, [_row(3)], {"b.test"}, refill=("b.test", 2))
    assert (handed, unreadable) == (1, [])
    assert not handover.behind("b.test")
    assert handover.floor("b.test") == 3
    assert _drain(delivery) == [3]


def test_a_row_queued_while_a_refill_reads_keeps_the_peer_behind() -> None:
    """The refill's read did not see row 4 (queued after it); the refill must
    not call the peer level, or row 4 stays in the outbox while later rows go."""
    handover, delivery = _window_of_two()
    _drain(delivery)
    after = handover.refill_from("b.test")
    read = [_row(3)]  # the read: row 4 was not committed yet
    assert handover.stays("b.test", delivery.full("b.test"))  # row 4 queued here, meanwhile
    handover.hand_over(delivery, read, {"b.test"}, refill=("b.test", 2))
    assert handover.behind("b.test"), "level, with row 4 left behind in the outbox"
    assert handover.refill_from("b.test") == 3 and after == 2
    handover.hand_over(delivery, [_row(4)], {"b.test"}, refill=("b.test", 1 + 1))
    assert not handover.behind("b.test")
    assert _drain(delivery) == [3, 4]


def test_another_workers_row_a_look_sees_during_a_refill_keeps_the_peer_behind() -> None:
    handover, delivery = _window_of_two()
    _drain(delivery)
    handover.refill_from("b.test")
    # Another worker queued row 4 after the refill's read; a look sees it
    # (and moves past it) while the peer is behind: not handed over by the look.
    assert handover.handle_look([(3, "b.test"), (4, "b.test")], lambda p: True, delivery.queued) == []
    assert handover.seen == 4
    handover.hand_over(delivery, [_row(3)], {"b.test"}, refill=("b.test", 2))
    assert handover.behind("b.test"), "level, with row 4 left in the outbox and no look to find it"


def test_a_refills_rows_are_not_handed_over_once_the_peer_was_forgotten() -> None:
    """An admin forgot the peer (or its lease went) while its refill read:
    the rows read are not handed to the machine."""
    handover, delivery = Handover(), Delivery()
    handover.take("b.test")
    assert handover.refill_from("b.test") == 0
    handover.forget("b.test")
    handed, _ = handover.hand_over(delivery, [_row(1), _row(2)], {"b.test"}, refill=("b.test", 10))
    assert handed == 0 and delivery.pending("b.test") == 0


def test_a_peer_behind_its_window_needs_no_read_below_a_new_row() -> None:
    """A peer behind (a paused or dead peer's backlog in the outbox): the row
    queued next stays in the outbox whatever is below it, so the storage call
    that queues it reads nothing below it. Reading from the floor read the
    whole backlog at every post: posting slowed as the backlog grew."""
    handover, delivery = _window_of_two()
    assert handover.floor("b.test") is None
    # What the shell does when floor() is None: the row is not handed over
    # here; a refill reads it in order.
    assert handover.stays("b.test", delivery.full("b.test"))
    assert not handover.handle_queued("b.test", (4,), None, delivery.queued)
    _drain(delivery)
    assert handover.refill_from("b.test") == 2
    handover.hand_over(delivery, [_row(3), _row(4)], {"b.test"}, refill=("b.test", 3))
    assert not handover.behind("b.test") and handover.floor("b.test") == 4
    assert _drain(delivery) == [3, 4]


def test_a_peer_taken_over_needs_no_read_below_until_its_refills_caught_up() -> None:
    handover = Handover()
    handover.take("b.test")
    assert handover.floor("b.test") is None
    assert handover.floor("c.test") == 0  # never behind: read from the start
