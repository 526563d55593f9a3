"""core.limits: per-origin rate and concurrency, and the caps on descriptor
fetches caused by peers' requests. Pure: driven by clock readings in ms."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from scaiwave_federation.core.codes import Code, LocalProtocolError
from scaiwave_federation.core.limits import Limits, OriginLimiter

NOW = 1_764_000_000_000


def test_a_burst_then_the_rate():
    lim = OriginLimiter(Limits(rate=10, burst=5, concurrent=100))
    admitted = [lim.admit("o.test", NOW) is None for _ in range(8)]
    assert admitted == [True] * 5 + [False] * 3
    refusal = lim.admit("o.test", NOW)
    assert refusal.code is Code.RATE_LIMITED and refusal.retryable and "10 requests a second" in refusal.detail
    assert lim.admit("o.test", NOW + 99) is not None  # 0.99 token
    assert lim.admit("o.test", NOW + 100) is None  # one token a tenth of a second
    assert lim.admit("other.test", NOW) is None  # each origin has its own bucket
    assert lim.admit("O.Test:443", NOW + 100) is not None  # ...however its name is spelt


def test_a_clock_that_goes_back_refills_nothing():
    lim = OriginLimiter(Limits(rate=10, burst=1))
    assert lim.admit("o.test", NOW) is None
    assert lim.admit("o.test", NOW - 60_000) is not None
    assert lim.admit("o.test", NOW + 50) is not None  # the earlier reading did not move the clock back
    assert lim.admit("o.test", NOW + 100) is None


def test_concurrency_per_origin():
    lim = OriginLimiter(Limits(concurrent=2))
    assert lim.admit("o.test", NOW) is None and lim.admit("o.test", NOW) is None
    refusal = lim.admit("o.test", NOW)
    assert refusal.code is Code.RATE_LIMITED and "2 requests in flight" in refusal.detail
    lim.release("o.test")
    assert lim.admit("o.test", NOW) is None
    with pytest.raises(LocalProtocolError):
        lim.release("never.test")


def test_descriptor_fetches_per_origin_in_total_and_per_server():
    lim = OriginLimiter(Limits(fetches_per_origin=2, fetches_total=3))
    assert lim.begin_fetch("s1.test", "o.test", NOW) is None
    assert lim.begin_fetch("s2.test", "o.test", NOW) is None
    assert "o.test's requests have 2" in lim.begin_fetch("s3.test", "o.test", NOW).detail
    assert "in flight" in lim.begin_fetch("s1.test", "p.test", NOW).detail  # one fetch per server
    assert lim.begin_fetch("s3.test", "p.test", NOW) is None
    assert "3 descriptor fetches" in lim.begin_fetch("s4.test", "q.test", NOW).detail
    # Our own fetches (the admin's, a handshake we start) are not capped in total.
    assert lim.begin_fetch("s5.test", None, NOW) is None
    lim.end_fetch("s1.test")
    assert lim.begin_fetch("s4.test", "q.test", NOW) is None
    view = lim.view(NOW)
    assert view["descriptor_fetches"] == {"in_flight": 4, "caused_by_peers": 3}
    assert {b["origin"]: b["descriptor_fetches"] for b in view["busy"]} == {"o.test": 1, "p.test": 1, "q.test": 1}
    with pytest.raises(LocalProtocolError):
        lim.end_fetch("s1.test")


def test_the_admin_view_names_who_is_limited_newest_first_and_is_bounded():
    lim = OriginLimiter(Limits(rate=1, burst=1, max_shown=3))
    for i in range(5):
        lim.admit(f"o{i}.test", NOW)
        lim.admit(f"o{i}.test", NOW + i)
    view = lim.view(NOW + 10)
    assert [row["origin"] for row in view["limited"]] == ["o4.test", "o3.test", "o2.test"]
    assert view["limited"][0] == {"origin": "o4.test", "refused": 1, "last_at": NOW + 4,
                                  "reason": "o4.test sends more than 1 requests a second (bursts of 1)"}
    assert view["settings"]["rate"] == 1 and view["busy"][0]["in_flight"] == 1


def test_memory_is_bounded_by_max_tracked():
    lim = OriginLimiter(Limits(rate=10, burst=2, max_tracked=50))
    for i in range(50):
        assert lim.admit(f"o{i}.test", NOW) is None
    # The table is full of busy origins: a new one is refused, cheaply.
    refusal = lim.admit("new.test", NOW)
    assert refusal.code is Code.RATE_LIMITED and "busy origins" in refusal.detail
    for i in range(50):
        lim.release(f"o{i}.test")
    # Once their buckets are full again they are forgotten, and newcomers get in.
    assert lim.admit("new.test", NOW + 1000) is None
    assert lim.view(NOW + 1000)["tracked"] == 1
    for i in range(200):
        lim.admit(f"flood{i}.test", NOW + 2000)
    assert lim.view(NOW + 2000)["tracked"] <= 50


@pytest.mark.parametrize("field", ["rate", "burst", "concurrent", "fetches_per_origin", "fetches_total"])
def test_limits_are_positive_integers(field):
    with pytest.raises(LocalProtocolError):
        Limits(**{field: 0})


class LimiterMachine(RuleBasedStateMachine):
    """Any interleaving of requests, releases, fetches and clock readings: no
    origin ever has more than ``concurrent`` in flight, peers never cause more
    than ``fetches_total`` fetches, and over any stretch of time an origin is
    admitted at most ``burst + rate * seconds`` times."""

    @initialize(rate=st.integers(1, 20), burst=st.integers(1, 10), concurrent=st.integers(1, 4),
                 total=st.integers(1, 4))
    def setup(self, rate, burst, concurrent, total):
        self.limits = Limits(rate=rate, burst=burst, concurrent=concurrent, fetches_total=total,
                             fetches_per_origin=2, max_tracked=3)
        self.lim = OriginLimiter(self.limits)
        self.now = NOW
        self.in_flight: dict[str, int] = {}
        self.admitted: list[tuple[str, int]] = []
        self.fetching: set[str] = set()

    @rule(origin=st.sampled_from(["a.test", "b.test", "c.test", "d.test"]))
    def request(self, origin):
        if self.lim.admit(origin, self.now) is None:
            self.in_flight[origin] = self.in_flight.get(origin, 0) + 1
            self.admitted.append((origin, self.now))

    @precondition(lambda self: any(self.in_flight.values()))
    @rule(data=st.data())
    def release(self, data):
        origin = data.draw(st.sampled_from(sorted(o for o, n in self.in_flight.items() if n)))
        self.lim.release(origin)
        self.in_flight[origin] -= 1

    @rule(server=st.sampled_from(["s1.test", "s2.test", "s3.test", "s4.test", "s5.test"]),
          cause=st.sampled_from(["a.test", "b.test", None]))
    def fetch(self, server, cause):
        if self.lim.begin_fetch(server, cause, self.now) is None:
            assert server not in self.fetching
            self.fetching.add(server)

    @precondition(lambda self: self.fetching)
    @rule(data=st.data())
    def fetched(self, data):
        server = data.draw(st.sampled_from(sorted(self.fetching)))
        self.lim.end_fetch(server)
        self.fetching.discard(server)

    @rule(ms=st.integers(0, 3000))
    def time_passes(self, ms):
        self.now += ms

    @invariant()
    def bounded(self):
        if not hasattr(self, "lim"):
            return
        assert all(n <= self.limits.concurrent for n in self.in_flight.values())
        assert self.lim.view(self.now)["descriptor_fetches"]["caused_by_peers"] <= self.limits.fetches_total
        assert self.lim.view(self.now)["tracked"] <= self.limits.max_tracked
        for origin in {o for o, _ in self.admitted}:
            times = [t for o, t in self.admitted if o == origin]
            for start in times:
                window = [t for t in times if start <= t]
                span_ms = window[-1] - start
                assert len(window) <= self.limits.burst + span_ms * self.limits.rate // 1000 + 1


TestLimiter = LimiterMachine.TestCase


def test_fetch_attempts_of_strangers_do_not_grow_the_key_cache_for_ever():
    from scaiwave_federation.core import keycache

    cache = keycache.KeyCache(refetch_interval_ms=1000)
    for i in range(keycache.MAX_ATTEMPTS_KEPT):
        cache.fetch_attempted(f"s{i}.test", NOW)
    assert not cache.may_fetch("s1.test", NOW + 10)  # still limited: nothing forgotten yet
    cache.fetch_attempted("late.test", NOW + 10)  # the table is full, but nothing is stale
    assert len(cache._attempted) == keycache.MAX_ATTEMPTS_KEPT + 1
    cache.fetch_attempted("later.test", NOW + 1000)  # now every old attempt is stale
    assert set(cache._attempted) == {"late.test", "later.test"}
    assert cache.may_fetch("s1.test", NOW + 1000)
