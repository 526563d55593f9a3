"""The lease machine (core/leases.py): one holder, no lost work, jobs once.

The stateful test runs several workers' :class:`Leases` machines against one
model of the shared lease table (the conditional writes of
``shell/store/lease_rows.py``, as plain Python), with any interleaving of
worker ticks, pauses (a worker alive but not running), clocks that differ by
up to SKEW_MS, clean stops, kills (a worker that stops without releasing),
restarts under a new id, changes of the work to do, and time. It checks
after every step that no two workers hold one lease at once, and at the end,
once the surviving workers have run for a while, that every wanted peer is
held by a live worker and that the timer job ran exactly once per period.
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scaiwave_federation.core import LocalProtocolError
from scaiwave_federation.core.leases import (
    TIMERS,
    Claim,
    LeaseRow,
    Leases,
    Release,
    Renew,
    peer_lease,
    worker_lease,
)

LEASE_MS = 300
PERIOD_MS = 1000  # the timer job's period in the model
#: Workers' clocks differ by up to this (the margin, LEASE_MS // 3, covers twice it).
SKEW_MS = 50
PEERS = tuple(peer_lease(p) for p in ("a.test", "b.test", "c.test", "d.test"))


class Table:
    """The shared lease table, with the shell's conditional writes."""

    def __init__(self) -> None:
        self.rows: dict[str, LeaseRow] = {}

    def claim(self, c: Claim) -> bool:
        row = self.rows.get(c.name)
        if row is None or row.expires_at <= c.now or row.owner == c.owner:
            self.rows[c.name] = LeaseRow(c.name, c.owner, c.expires_at)
            return True
        return False

    def renew(self, r: Renew) -> None:
        for name in r.names:
            row = self.rows.get(name)
            if row is not None and row.owner == r.owner:
                self.rows[name] = LeaseRow(name, r.owner, r.expires_at)

    def release(self, r: Release) -> None:
        row = self.rows.get(r.name)
        if row is not None and row.owner == r.owner:
            del self.rows[r.name]


class Worker:
    """The shell's loop for one worker, against the model table."""

    def __init__(self, owner: str, table: Table, now: int, skew: int = 0) -> None:
        self.leases = Leases(owner, lease_ms=LEASE_MS)
        self.table = table
        self.alive = True
        self.hung = False  # alive, but not running (a long pause): renews nothing
        self.skew = skew  # this worker's clock minus the true time
        now += skew
        self.do(self.leases.claim(worker_lease(owner), now))
        self.do(self.leases.claim(TIMERS, now))

    def holds(self, name: str, now: int) -> bool:
        return self.leases.holds(name, now + self.skew)

    def do(self, claim: Claim) -> None:
        taken = self.table.claim(claim)
        self.leases.handle_claim(claim, taken, self.table.rows.get(claim.name))

    def tick(self, now: int, wanted: set[str], jobs: "Jobs") -> None:
        now += self.skew
        renew = self.leases.handle_timeout(now)
        if renew is not None:
            self.table.renew(renew)
            self.leases.handle_renewed(renew, list(self.table.rows.values()), now)
        for name in self.leases.surplus(wanted, now):
            release = self.leases.release(name)
            assert release is not None
            self.table.release(release)
        for claim in self.leases.want(wanted, now):
            self.do(claim)
        if not self.leases.holds(TIMERS, now):
            self.do(self.leases.claim(TIMERS, now))
        if self.leases.holds(TIMERS, now):
            jobs.run_due(self.leases.owner, now)


class Jobs:
    """The timer job's shared due time (as the key ring's rotation time is
    shared through the database) and a log of its runs."""

    def __init__(self) -> None:
        self.due = PERIOD_MS
        self.runs: list[tuple[int, str]] = []  # (period, worker)

    def run_due(self, owner: str, now: int) -> None:
        if now >= self.due:
            self.runs.append((self.due // PERIOD_MS, owner))
            self.due += PERIOD_MS


class LeaseMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.table = Table()
        self.jobs = Jobs()
        self.next_id = 0
        self.workers: list[Worker] = []
        self.wanted: set[str] = set(PEERS[:2])
        for _ in range(2):
            self.start()

    def start(self, skew: int = 0) -> None:
        self.next_id += 1
        self.workers.append(Worker(f"w{self.next_id}", self.table, self.now, skew))

    def live(self) -> list[Worker]:
        return [w for w in self.workers if w.alive]

    @rule(i=st.integers(0, 5))
    def tick(self, i: int) -> None:
        running = [w for w in self.live() if not w.hung]
        if running:
            running[i % len(running)].tick(self.now, self.wanted, self.jobs)

    @rule(i=st.integers(0, 5))
    def hang_or_wake(self, i: int) -> None:
        live = self.live()
        worker = live[i % len(live)]
        worker.hung = not worker.hung

    @rule(ms=st.integers(1, 250) | st.integers(1, 8))
    def advance(self, ms: int) -> None:
        self.now += ms

    @rule(name=st.sampled_from(PEERS), on=st.booleans())
    def change_work(self, name: str, on: bool) -> None:
        if on:
            self.wanted.add(name)
        else:
            self.wanted.discard(name)

    @precondition(lambda self: len(self.live()) < 4)
    @rule(skew=st.integers(-SKEW_MS, SKEW_MS))
    def new_worker(self, skew: int) -> None:
        self.start(skew)

    @precondition(lambda self: len(self.live()) > 1)
    @rule(i=st.integers(0, 5), clean=st.booleans())
    def stop(self, i: int, clean: bool) -> None:
        live = self.live()
        worker = live[i % len(live)]
        worker.alive = False
        if clean:
            for release in worker.leases.release_all():
                self.table.release(release)

    @invariant()
    def one_holder(self) -> None:
        for name in set(PEERS) | {TIMERS}:
            holders = [w.leases.owner for w in self.live() if w.holds(name, self.now)]
            assert len(holders) <= 1, (name, holders, self.now)

    @invariant()
    def jobs_once(self) -> None:
        periods = [p for p, _ in self.jobs.runs]
        assert periods == sorted(set(periods)), self.jobs.runs

    def teardown(self) -> None:
        # The survivors run on for a while: every wanted peer ends up held by a
        # live worker, and the timer job has run for every period that ended.
        for worker in self.live():
            worker.hung = False
        for _ in range(40):
            self.now += LEASE_MS // 6
            for worker in self.live():
                worker.tick(self.now, self.wanted, self.jobs)
        for name in self.wanted:
            holders = [w for w in self.live() if w.holds(name, self.now)]
            assert len(holders) == 1, (name, self.table.rows, self.now)
        periods = [p for p, _ in self.jobs.runs]
        assert periods == list(range(1, len(periods) + 1))
        assert (self.now - SKEW_MS) // PERIOD_MS <= len(periods) <= (self.now + SKEW_MS) // PERIOD_MS


TestLeases = LeaseMachine.TestCase


def test_a_dead_holders_lease_is_taken_after_expiry() -> None:
    table = Table()
    a, b = Worker("a", table, 0), Worker("b", table, 0)
    name = peer_lease("p.test")
    a.tick(0, {name}, Jobs())
    assert a.leases.holds(name, 0) and a.leases.holder(name, 0) == "a"
    b.tick(0, {name}, Jobs())
    assert not b.leases.holds(name, 0) and b.leases.holder(name, 0) == "a"
    # a dies: b cannot take the lease before it expires, and can after.
    b.tick(LEASE_MS - 1, {name}, Jobs())
    assert not b.leases.holds(name, LEASE_MS - 1)
    b.tick(LEASE_MS, {name}, Jobs())
    assert b.leases.holds(name, LEASE_MS)
    # a (a stale process waking up) renews: it learns the lease is lost.
    renew = a.leases.renewal(LEASE_MS + 1)
    table.renew(renew)
    assert name in a.leases.handle_renewed(renew, list(table.rows.values()), LEASE_MS + 1)
    assert not a.leases.holds(name, LEASE_MS + 1)


def test_a_holder_stops_before_expiry_without_renewal() -> None:
    leases = Leases("a", lease_ms=LEASE_MS)
    claim = leases.claim("peer:x", 0)
    leases.handle_claim(claim, True, LeaseRow("peer:x", "a", claim.expires_at))
    assert leases.holds("peer:x", LEASE_MS - leases.margin_ms - 1)
    assert not leases.holds("peer:x", LEASE_MS - leases.margin_ms)
    assert leases.poll_timeout() == leases.renew_ms
    assert leases.handle_timeout(leases.renew_ms - 1) is None
    assert leases.handle_timeout(leases.renew_ms) == Renew(owner="a", names=("peer:x",),
                                                           expires_at=leases.renew_ms + LEASE_MS)


def test_work_is_spread_over_live_workers() -> None:
    table = Table()
    a, b = Worker("a", table, 0), Worker("b", table, 0)
    names = set(PEERS)
    a.leases.observe(list(table.rows.values()))
    a.tick(0, names, Jobs())
    assert len([n for n in names if a.leases.holds(n, 0)]) == 2  # its share of 4 over 2 workers
    b.tick(0, names, Jobs())
    assert all(b.leases.holds(n, 0) != a.leases.holds(n, 0) for n in names)


def test_a_peer_nobody_takes_is_taken_past_ones_share() -> None:
    leases = Leases("a", lease_ms=LEASE_MS)
    # Another live worker (its heartbeat) that takes nothing: a waits grace_ms, then takes all.
    leases.observe([LeaseRow(worker_lease("b"), "b", 10_000)])
    names = set(PEERS)
    assert len(leases.want(names, 0)) == 2
    assert len(leases.want(names, leases.grace_ms)) == 4


def test_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        Leases("", lease_ms=LEASE_MS)
    leases = Leases("a", lease_ms=LEASE_MS)
    with pytest.raises(LocalProtocolError):
        leases.handle_claim(Claim(name="x", owner="b", expires_at=1, now=0), True, None)
    assert leases.release("x") is None


def test_a_worker_that_starts_later_gets_its_share() -> None:
    table = Table()
    a = Worker("a", table, 0)
    names = set(PEERS)
    a.tick(0, names, Jobs())
    assert all(a.leases.holds(n, 0) for n in names)  # alone: everything
    b = Worker("b", table, 1)
    b.tick(1, names, Jobs())
    assert not any(b.leases.holds(n, 1) for n in names)  # all held by a live worker
    now = a.leases.renew_ms
    a.tick(now, names, Jobs())  # a's renewal shows b alive with nothing: a gives up two
    assert sum(a.leases.holds(n, now) for n in names) == 2
    b.tick(now + 1, names, Jobs())  # b's own renewal: it reads who holds what, and takes the rest
    assert sum(b.leases.holds(n, now + 1) for n in names) == 2
    # Balanced: nobody gives anything up any more.
    later = now + 1 + a.leases.renew_ms
    assert a.leases.surplus(names, later) == [] and b.leases.surplus(names, later) == []


