"""Backfill: the puller against a served chain, cut-offs and resumes, bad events,
and pages split, duplicated and reordered any way at all."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from corehelpers import (
    GROUP_ROOM,
    assert_chain_run,
    backfill_puller as _puller,
    A,
    B,
    NOW,
    FakeLink,
    HostedRoom,
    build_chain,
    descriptor_bytes,
    hosted_pair,
    make_node,
    pair,
    run_backfill,
    tamper_envelope,
)
from scaiwave_federation.core import (
    MAX_PULL,
    PAGE_CAP,
    BackfillDone,
    BackfillPuller,
    Code,
    Failed,
    Head,
    KeyCache,
    LocalProtocolError,
    NeedKeys,
    PeerAgreed,
    Refused,
    SendRequest,
    StoreEvents,
    build_page,
    chain_event,
    decode_page,
)
from scaiwave_federation.core import backfill as backfill_module
from scaiwave_federation.core.backfill import backfill_target, parse_query
from scaiwave_federation.core.handshake import refusal_body
from scaiwave_federation.core.wire import encode

ROOM = GROUP_ROOM


@pytest.mark.parametrize(
    "n, limit, page_size",
    [(250, 200, 60), (50, 1000, 100), (1, 10, 10), (100, 100, 7), (120, 1000, 100), (30, 29, 100)],
)
def test_pull_stores_the_newest_min_n_limit_events(n, limit, page_size):
    link, chain, room_id = hosted_pair(n)
    run = run_backfill(link, _puller(link, limit=limit, page_size=page_size))
    count = min(n, limit)
    assert_chain_run(run.stored, chain, count)
    assert run.done == BackfillDone(room_id, B, count, reached_start=n <= limit)
    assert not any(isinstance(e, Failed) for e in run.effects)
    # Every request asked for at most page_size and never more than was left to pull.
    asked = [int(x.target.rsplit("limit=", 1)[1]) for x in link.log if "backfill" in x.target]
    assert all(0 < k <= page_size for k in asked)
    assert sum(asked) >= count and len(asked) <= -(-count // page_size) + 1
    # Every store comes with its resume cursor.
    stores = [e for e in run.effects if isinstance(e, StoreEvents)]
    assert all(s.cursor for s in stores) and all(s.room_id == room_id for s in stores)


def test_smoke_numbers():
    # The scenario of /tmp/smoke.py: 250 events, limit 200, pages of 60.
    link, chain, _ = hosted_pair(250)
    run = run_backfill(link, _puller(link, limit=200, page_size=60))
    assert (len(run.stored), run.stored[0].depth, run.stored[-1].depth) == (200, 250, 51)
    assert run.requests == 4


@pytest.mark.parametrize("cut_after", [1, 2, 3])
def test_resume_from_a_saved_cursor_stores_the_rest_once(cut_after):
    link, chain, room_id = hosted_pair(250)
    first = run_backfill(link, _puller(link, limit=200, page_size=60), max_requests=cut_after)
    assert first.done is None and len(first.stored) == 60 * cut_after
    a = link.server(A).node
    resumed = BackfillPuller.resume(first.cursor, server_name=A, key=a.keyring.current, keys=a.keys, page_size=60)
    assert resumed.stored == len(first.stored)
    second = run_backfill(link, resumed)
    everything = first.stored + second.stored
    assert len({e.event_id for e in everything}) == len(everything) == 200
    assert_chain_run(everything, chain, 200)
    assert second.done.stored == 200


def test_resume_of_a_finished_pull_is_done_at_once():
    link, chain, _ = hosted_pair(30)
    run = run_backfill(link, _puller(link, limit=10, page_size=10))
    a = link.server(A).node
    again = BackfillPuller.resume(run.cursor, server_name=A, key=a.keyring.current, keys=a.keys)
    assert again.start(NOW) == [BackfillDone(ROOM, B, 10, False)]
    full = run_backfill(link, _puller(link))
    done = BackfillPuller.resume(full.cursor, server_name=A, key=a.keyring.current, keys=a.keys)
    assert done.start(NOW) == [BackfillDone(ROOM, B, 30, True)]


def test_resume_refuses_what_is_not_a_cursor():
    a = make_node(A, 1)
    for junk in (b"\xff", encode({"room_id": ROOM})):
        with pytest.raises(LocalProtocolError):
            BackfillPuller.resume(junk, server_name=A, key=a.keyring.current, keys=a.keys)


def test_pull_from_an_anchor_fetches_only_older_events():
    link, chain, _ = hosted_pair(90)
    held = chain[50]  # we hold depth 51..90 already
    run = run_backfill(link, _puller(link, anchor=(held.depth, held.prev), page_size=20))
    assert [e.depth for e in run.stored] == list(range(50, 0, -1))
    assert run.stored[0].event_id == held.prev
    assert run.done.reached_start and run.done.stored == 50


def test_anchor_at_the_rooms_start_has_nothing_to_pull():
    link, chain, _ = hosted_pair(3)
    puller = _puller(link, anchor=(1, None))
    assert puller.start(NOW) == [BackfillDone(ROOM, B, 0, True)]
    assert puller.page_received(200, b"", NOW) == [BackfillDone(ROOM, B, 0, True)]
    assert link.log[-1].target.endswith("handshake")  # no backfill request went out


def test_tampered_event_is_refused_and_the_good_ones_before_it_stay():
    link, chain, room_id = hosted_pair(250)
    hosted = link.server(B).rooms[room_id]
    hosted.substitutes[200] = tamper_envelope(chain[199])
    run = run_backfill(link, _puller(link, limit=200, page_size=60))
    assert [e.depth for e in run.stored] == list(range(250, 200, -1))
    assert run.done.refusal.code is Code.BAD_SIGNATURE and run.done.stored == 50
    assert Failed(B, run.done.refusal) in run.effects
    # The host repairs its copy; a resumed pull continues right below the stored events.
    del hosted.substitutes[200]
    a = link.server(A).node
    resumed = run_backfill(link, BackfillPuller.resume(run.cursor, server_name=A, key=a.keyring.current,
                                                       keys=a.keys, page_size=60))
    assert_chain_run(run.stored + resumed.stored, chain, 200)


def test_inserted_event_is_chain_broken():
    link, chain, room_id = hosted_pair(40)
    b = link.server(B).node
    # A validly signed event at depth 20 that is not the one depth 21 links to.
    fork = chain_event(b.keyring.current, head=Head(chain[18].depth, chain[18].event_id), room_id=room_id,
                       room_type="group", sender=chain[0].sender, type="m.message", ts=NOW, content={"body": "x"})
    link.server(B).rooms[room_id].substitutes[20] = fork.envelope
    run = run_backfill(link, _puller(link, page_size=15))
    assert [e.depth for e in run.stored] == list(range(40, 20, -1))
    assert run.done.refusal.code is Code.CHAIN_BROKEN


def test_error_reply_ends_the_pull_with_its_code():
    link, chain, room_id = hosted_pair(10)
    link.server(B).rooms[room_id].member_servers.clear()
    run = run_backfill(link, _puller(link))
    assert run.stored == [] and run.done.refusal.code is Code.NOT_MEMBER


def test_pull_of_a_room_the_host_does_not_have_is_not_found():
    link, chain, room_id = hosted_pair(10)
    run = run_backfill(link, _puller(link, room_id=f"!other:{B}"))
    assert run.done.refusal.code is Code.NOT_FOUND


def _started(n=10):
    link, chain, room_id = hosted_pair(n)
    puller = _puller(link)
    (request,) = puller.start(NOW)
    return link, chain, puller, request


@pytest.mark.parametrize(
    "status, body, code",
    [
        (200, b"\xff", Code.MALFORMED),
        (200, encode({"room_id": ROOM}), Code.MALFORMED),
        (200, encode({"room_id": ROOM, "before": 0, "events": [], "next": None}), Code.MALFORMED),
        (200, encode({"room_id": ROOM, "before": None, "events": [b"x"] * (PAGE_CAP + 1), "next": None}),
         Code.MALFORMED),
        (200, build_page(f"!other:{B}", None, [], []), Code.WRONG_ROOM),
        (500, b"", Code.HANDSHAKE_FAILED),
        (403, refusal_body(Refused(Code.ROOM_SIDEKICK)), Code.ROOM_SIDEKICK),
    ],
)
def test_bad_pages(status, body, code):
    link, chain, puller, request = _started()
    effects = puller.page_received(status, body, NOW)
    assert isinstance(effects[-1], BackfillDone) and effects[-1].refusal.code is code
    assert effects[0] == Failed(B, effects[-1].refusal)
    # Once done, it stays done.
    assert puller.page_received(200, build_page(ROOM, None, [e.envelope for e in chain], []), NOW) == [puller.done]


def test_transport_failure_ends_the_pull_resumably():
    link, chain, puller, request = _started()
    effects = puller.fail(Refused(Code.PEER_UNREACHABLE))
    assert effects == [Failed(B, Refused(Code.PEER_UNREACHABLE)),
                       BackfillDone(ROOM, B, 0, False, Refused(Code.PEER_UNREACHABLE))]
    assert puller.keys_updated(NOW) == [puller.done]


def test_empty_room_page_ends_the_pull():
    link, chain, puller, request = _started()
    assert puller.page_received(200, build_page(ROOM, None, [], []), NOW) == [BackfillDone(ROOM, B, 0, False)]


def test_wrong_room_events_inside_a_page_are_refused():
    link, chain, puller, request = _started(5)
    b = link.server(B).node
    other = build_chain(b.keyring.current, f"!other:{B}", 5)
    page = build_page(ROOM, None, [e.envelope for e in reversed(chain)][:4] + [other[0].envelope], [5, 4, 3, 2, 1])
    effects = puller.page_received(200, page, NOW)
    assert [e.depth for e in effects[0].events] == [5, 4, 3, 2]
    assert effects[-1].refusal.code is Code.WRONG_ROOM
    assert puller.refusals[0][1].code is Code.WRONG_ROOM


def test_unknown_signing_key_asks_for_keys_then_goes_on():
    a, b = pair()
    link = FakeLink(a, b)
    link.server(B).peered[A] = PeerAgreed(A, "scaiwave-fed/1", "")  # A never fetched B's descriptor
    chain = build_chain(b.keyring.current, ROOM, 12)
    link.server(B).rooms[ROOM] = HostedRoom("group", chain, member_servers={A})
    run = run_backfill(link, _puller(link, page_size=5))
    assert NeedKeys(B, b.keyring.current.key_id) in run.effects
    assert_chain_run(run.stored, chain, 12)
    assert run.done.refusal is None


def test_keys_that_cannot_be_had_end_the_pull_with_unknown_key():
    a, b = pair()
    link = FakeLink(a, b)
    link.server(B).peered[A] = PeerAgreed(A, "scaiwave-fed/1", "")
    chain = build_chain(b.keyring.current, ROOM, 3)
    link.server(B).rooms[ROOM] = HostedRoom("group", chain, member_servers={A})
    link.server(B).descriptor_override = b"garbage"
    run = run_backfill(link, _puller(link))
    assert run.done.refusal.code is Code.UNKNOWN_KEY and run.stored == []


def test_no_refetch_inside_the_rate_limit_is_unknown_key():
    link, chain, puller, request = _started(3)
    # Events signed by a key B never published (a lying host), right after we fetched B's descriptor.
    rogue = make_node(B, 9).keyring.current
    fake = build_chain(rogue, ROOM, 3)
    page = build_page(ROOM, None, [e.envelope for e in reversed(fake)], [3, 2, 1])
    effects = puller.page_received(200, page, NOW)
    assert effects[-1].refusal.code is Code.UNKNOWN_KEY


@pytest.mark.parametrize("kwargs", [{"limit": 0}, {"limit": MAX_PULL + 1}, {"page_size": 0},
                                    {"page_size": PAGE_CAP + 1}, {"until": (0, bytes(32))},
                                    {"until": (3, b"short")}, {"until": (3, bytes(32)), "anchor": (5, bytes(32))}])
def test_puller_arguments_are_checked(kwargs):
    a = make_node(A, 1)
    with pytest.raises(LocalProtocolError):
        BackfillPuller(server_name=A, room_id=ROOM, peer=B, key=a.keyring.current, keys=a.keys, **kwargs)


def test_page_helpers():
    assert backfill_target(ROOM, None, 5) == f"/_scaiwave/federation/v1/rooms/{ROOM}/backfill?limit=5"
    assert backfill_target(ROOM, 7, 5).endswith("backfill?before=7&limit=5")
    assert parse_query({"before": "7", "limit": "5"}) == (7, 5)
    assert parse_query({}) == (None, PAGE_CAP) and parse_query({"limit": "5000"}) == (None, PAGE_CAP) == (None, 500)
    assert parse_query({"before": str((1 << 63) - 1)}) == ((1 << 63) - 1, PAGE_CAP)


@pytest.mark.parametrize("query", [
    {"before": str(10**20)}, {"before": str(1 << 63)}, {"before": "9" * 5000}, {"limit": "9" * 5000},
    {"before": "0"}, {"limit": "0"}, {"before": "-5"}, {"before": "+5"}, {"before": " 5"}, {"before": "1_000"},
    {"before": "\u0661"}, {"before": ""}, {"limit": "1.5"}, {"limit": "0x10"},
])
def test_backfill_query_out_of_range_or_not_digits_is_malformed(query):
    refusal = parse_query(query)
    assert isinstance(refusal, Refused) and refusal.code == Code.MALFORMED, query


@given(st.dictionaries(st.sampled_from(["before", "limit"]), st.text(max_size=30)))
def test_backfill_query_is_digits_in_range_or_refused(query):
    result = parse_query(query)
    if isinstance(result, Refused):
        assert result.code == Code.MALFORMED
    else:
        before, limit = result
        assert before is None or (0 < before < 1 << 63 and str(before) == query["before"].lstrip("0"))
        assert 0 < limit <= PAGE_CAP
    page = decode_page(build_page(ROOM, 7, [b"x", b"y"], [6, 5]))
    assert (page.room_id, page.before, page.events, page.next) == (ROOM, 7, (b"x", b"y"), 5)
    assert decode_page(build_page(ROOM, 3, [b"x", b"y"], [2, 1])).next is None
    assert decode_page(build_page(ROOM, None, [], [])).next is None


# -- any split of the history, duplicated and shuffled --------------------------------------


@functools.lru_cache(maxsize=1)
def _long_chain():
    b = make_node(B, 2)
    return b, build_chain(b.keyring.current, ROOM, 300)


@functools.lru_cache(maxsize=1)
def _keys_of_b():
    b, _ = _long_chain()
    cache = KeyCache()
    cache.learn(B, descriptor_bytes(b), NOW)
    return cache


def _slices(history, cuts):
    """Split newest-first ``history`` at ``cuts`` into pages: the head slice has
    ``before=None``, the others ``before=top_depth+1``."""
    bounds = [0, *sorted(cuts), len(history)]
    pages = []
    for lo, hi in zip(bounds, bounds[1:]):
        part = history[lo:hi]
        before = None if lo == 0 else part[0].depth + 1
        pages.append(build_page(ROOM, before, [e.envelope for e in part], [e.depth for e in part]))
    return pages


def _shuffled_pages(data, full, n: int) -> list[bytes]:
    """The newest ``n`` events of ``full`` as pages split anyhow (at most
    PAGE_CAP events each), some sent twice, all in any order."""
    history = list(reversed(full[:n]))
    cuts = set(data.draw(st.sets(st.integers(1, max(1, n - 1)), max_size=12), label="cuts")) - {n}
    # A page holds at most PAGE_CAP events: cut any longer slice further.
    bounds = sorted({0, *cuts, n})
    for lo, hi in zip(bounds, bounds[1:]):
        cuts |= set(range(lo + PAGE_CAP, hi, PAGE_CAP))
    pages = _slices(history, cuts)
    extra = data.draw(st.lists(st.sampled_from(range(len(pages))), max_size=len(pages)), label="duplicates")
    order = data.draw(st.permutations(list(range(len(pages))) + extra), label="order")
    return [pages[index] for index in order]


@given(data=st.data())
def test_any_split_duplicated_and_shuffled_stores_the_newest_events_once(data):
    """Pages split anyhow, some twice, in any order: whatever is stored is the
    newest part of the chain, linked, each event once. A page that brings
    nothing new (a duplicate, say) ends the pull with ``no_progress``, keeping
    what was stored; pages in the host's own order complete it."""
    b, full = _long_chain()
    n = data.draw(st.integers(1, 300), label="n")
    limit = data.draw(st.integers(1, 400), label="limit")
    page_size = data.draw(st.integers(1, PAGE_CAP), label="page_size")
    pages = _shuffled_pages(data, full, n)

    a = make_node(A, 1)
    puller = BackfillPuller(server_name=A, room_id=ROOM, peer=B, key=a.keyring.current, keys=_keys_of_b(),
                            limit=limit, page_size=page_size)
    puller.start(NOW)
    stored = []
    for page in pages:
        if puller.done is not None:
            break
        for effect in puller.page_received(200, page, NOW):
            if isinstance(effect, StoreEvents):
                stored.extend(effect.events)
            assert not isinstance(effect, NeedKeys)
    count = min(n, limit)
    assert_chain_run(stored, full[:n], len(stored))
    assert puller.requests <= puller.budget
    if puller.done is not None and puller.done.refusal is not None:
        assert puller.done.refusal.code is Code.NO_PROGRESS and puller.done.stored == len(stored) < count
    elif puller.done is not None:
        assert puller.done == BackfillDone(ROOM, B, count, reached_start=n <= limit)
    in_order = sorted(set(pages), key=lambda p: -(decode_page(p).before or 1 << 62))
    if len(in_order) <= puller.budget - 1:
        fresh = BackfillPuller(server_name=A, room_id=ROOM, peer=B, key=a.keyring.current, keys=_keys_of_b(),
                               limit=limit, page_size=page_size)
        fresh.start(NOW)
        kept = [e for p in in_order if fresh.done is None
                for e in fresh.page_received(200, p, NOW) if isinstance(e, StoreEvents)]
        assert_chain_run([ev for s in kept for ev in s.events], full[:n], count)


# -- catching up: a receiver that missed events pulls down to its own head ----------------------


def _catch_up(link, chain, held: int, **kwargs):
    """A puller catching ``A`` up from holding ``chain[:held]``."""
    a = link.server(A).node
    head = chain[held - 1]
    return BackfillPuller(server_name=A, room_id=ROOM, peer=B, key=a.keyring.current, keys=a.keys,
                          until=(head.depth, head.event_id), **kwargs)


@pytest.mark.parametrize("n, held, page_size", [(40, 10, 7), (40, 39, 100), (120, 1, 100), (30, 20, 1)])
def test_catching_up_stores_the_gap_above_our_head_at_once(n, held, page_size):
    link, chain, room_id = hosted_pair(n)
    run = run_backfill(link, _catch_up(link, chain, held, page_size=page_size))
    stores = [e for e in run.effects if isinstance(e, StoreEvents)]
    assert len(stores) == 1, "all or nothing: one store, when the chain reached our head"
    assert_chain_run(run.stored, chain, n - held)
    assert run.stored[-1].prev == chain[held - 1].event_id
    assert run.done == BackfillDone(room_id, B, n - held, reached_start=False)


def test_catching_up_when_nothing_is_missing_stores_nothing():
    link, chain, room_id = hosted_pair(12)
    run = run_backfill(link, _catch_up(link, chain, 12))
    assert run.stored == [] and run.done == BackfillDone(room_id, B, 0, reached_start=False)


def test_catching_up_to_a_head_the_host_never_had_stores_nothing():
    """Our head is not in the host's chain (a fork, or a host that lost history)."""
    link, chain, room_id = hosted_pair(30)
    a = link.server(A).node
    forged = chain_event(a.keyring.current, head=Head(chain[8].depth, chain[8].event_id), room_id=ROOM,
                         room_type="group", sender=f"@alice:{A}", type="m.message", ts=NOW, content={"body": "x"})
    puller = BackfillPuller(server_name=A, room_id=ROOM, peer=B, key=a.keyring.current, keys=a.keys,
                            until=(forged.depth, forged.event_id))
    run = run_backfill(link, puller)
    assert run.stored == [] and run.done.stored == 0
    assert run.done.refusal.code is Code.CHAIN_BROKEN and "depth 10" in run.done.refusal.detail


def test_catching_up_more_than_the_limit_stores_nothing():
    """Storing only the newest part would leave a hole above our head."""
    link, chain, room_id = hosted_pair(60)
    run = run_backfill(link, _catch_up(link, chain, 5, limit=30, page_size=10))
    assert run.stored == [] and run.done.stored == 0
    assert run.done.refusal.code is Code.CHAIN_BROKEN and "within 30 events" in run.done.refusal.detail


def test_catching_up_stops_at_a_tampered_event_and_stores_nothing():
    link, chain, room_id = hosted_pair(30)
    link.server(B).rooms[room_id].substitutes[20] = tamper_envelope(chain[19])
    run = run_backfill(link, _catch_up(link, chain, 10, page_size=5))
    assert run.stored == [] and run.done.stored == 0
    assert run.done.refusal.code is Code.BAD_SIGNATURE


def test_a_catch_up_cursor_resumes_from_the_top():
    link, chain, room_id = hosted_pair(50)
    first = _catch_up(link, chain, 10, page_size=10)
    cut = run_backfill(link, first, max_requests=2)
    assert cut.done is None and cut.stored == []
    a = link.server(A).node
    resumed = BackfillPuller.resume(first.cursor(), server_name=A, key=a.keyring.current, keys=a.keys,
                                    page_size=10)
    assert resumed.until == (chain[9].depth, chain[9].event_id) and resumed.stored == 0
    run = run_backfill(link, resumed, now=NOW + 1000)  # later: the same request again is not a replay
    assert_chain_run(run.stored, chain, 40)


@given(data=st.data())
def test_catching_up_over_any_split_duplicated_and_shuffled_pages(data):
    b, full = _long_chain()
    n = data.draw(st.integers(2, 150), label="n")
    held = data.draw(st.integers(1, n), label="held")
    limit = data.draw(st.integers(1, 200), label="limit")
    pages = _shuffled_pages(data, full, n)
    a = make_node(A, 1)
    head = full[held - 1]
    puller = BackfillPuller(server_name=A, room_id=ROOM, peer=B, key=a.keyring.current, keys=_keys_of_b(),
                            limit=limit, until=(head.depth, head.event_id))
    puller.start(NOW)
    stores = []
    for page in pages:
        if puller.done is not None:
            break
        stores += [e for e in puller.page_received(200, page, NOW) if isinstance(e, StoreEvents)]
    gap = n - held
    assert puller.requests <= puller.budget
    if puller.done is not None and puller.done.refusal is not None and puller.done.refusal.code is Code.NO_PROGRESS:
        assert stores == []  # a page that moved nothing (a duplicate): nothing stored
    elif puller.done is None:
        assert stores == []  # the pages ran out before the chain reached our head: nothing stored
    elif gap <= limit:
        assert len(stores) <= 1 and puller.done.refusal is None
        assert_chain_run(list(stores[0].events) if stores else [], full[:n], gap)
    else:
        assert stores == [] and puller.done.refusal.code is Code.CHAIN_BROKEN


# -- pagination as a state machine: answers, stale pages, cut-offs and resumes ----------------


class PaginationMachine(RuleBasedStateMachine):
    """The host answers requests (sometimes with fewer events than asked), stale
    pages arrive at any moment, and the pull is cut off and resumed from its last
    cursor. Whatever happens, what is stored is the newest part of the chain,
    linked, each event once."""

    @initialize(n=st.integers(1, 120), limit=st.integers(1, 150), page_size=st.integers(1, 30))
    def setup(self, n, limit, page_size):
        b, full = _long_chain()
        self.b, self.chain = b, full[:n]
        self.history = list(reversed(self.chain))
        self.n, self.limit, self.page_size = n, limit, page_size
        self.node = make_node(A, 1)
        self.stored = []
        self.cursor = None
        self._new_puller(None)

    def _new_puller(self, cursor):
        if cursor is None:
            self.puller = BackfillPuller(server_name=A, room_id=ROOM, peer=B, key=self.node.keyring.current,
                                         keys=_keys_of_b(), limit=self.limit, page_size=self.page_size)
        else:
            self.puller = BackfillPuller.resume(cursor, server_name=A, key=self.node.keyring.current,
                                                keys=_keys_of_b(), page_size=self.page_size)
        self.request = None
        self._take(self.puller.start(NOW))

    def _take(self, effects):
        for effect in effects:
            if isinstance(effect, StoreEvents):
                self.stored.extend(effect.events)
                self.cursor = effect.cursor
            elif isinstance(effect, SendRequest):
                self.request = effect
            elif isinstance(effect, Failed):
                # A stale page moved nothing, or the host kept saying "not now".
                assert effect.refusal.code in (Code.NO_PROGRESS, Code.RATE_LIMITED)
            assert not isinstance(effect, NeedKeys)

    def _page(self, before, count):
        part = [e for e in self.history if before is None or e.depth < before][:count]
        return build_page(ROOM, before, [e.envelope for e in part], [e.depth for e in part])

    @precondition(lambda self: self.puller.done is None and self.request is not None)
    @rule(short=st.integers(0, 5))
    def answer(self, short):
        query = dict(p.split("=") for p in self.request.target.split("?", 1)[1].split("&"))
        before = int(query["before"]) if "before" in query else None
        count = max(1, int(query["limit"]) - short)  # a host may cap pages lower
        self.request = None
        self._take(self.puller.page_received(200, self._page(before, count), NOW))

    @precondition(lambda self: self.puller.done is None and self.request is not None)
    @rule()
    def not_now(self):
        refused, self.request = self.request, None
        retries, requests = self.puller.retries, self.puller.requests
        self._take(self.puller.page_received(429, refusal_body(Refused(Code.RATE_LIMITED)), NOW))
        if retries < backfill_module.PAGE_RETRIES:
            # The same page again, later, and not counted against the budget.
            assert self.request is not None and self.request.target == refused.target
            assert self.request.not_before == NOW + backfill_module.PAGE_RETRY_MS * 2 ** retries
            assert self.puller.requests == requests
        else:
            assert self.puller.done is not None and self.puller.done.refusal.code is Code.RATE_LIMITED

    @precondition(lambda self: self.puller.done is None)
    @rule(top=st.integers(0, 119), count=st.integers(1, 40))
    def stale_page(self, top, count):
        top = min(top, self.n - 1)
        before = None if top == 0 else self.history[top].depth + 1
        self._take(self.puller.page_received(200, self._page(before, count), NOW))

    @rule()
    def cut_off_and_resume(self):
        self._new_puller(self.cursor)

    @invariant()
    def stored_is_the_newest_part_of_the_chain_once(self):
        assert_chain_run(self.stored, self.chain, len(self.stored))
        assert len(self.stored) <= min(self.n, self.limit)
        assert self.puller.stored == len(self.stored)

    @invariant()
    def finished_means_complete(self):
        done = self.puller.done
        assert self.puller.requests <= self.puller.budget
        if done is not None and done.refusal is not None:
            # A stale page that moved nothing, or "not now" past the retries, ends the
            # pull; a resume goes on from its cursor.
            assert done.refusal.code in (Code.NO_PROGRESS, Code.RATE_LIMITED) and done.stored == len(self.stored)
        elif done is not None:
            assert done.stored == len(self.stored) == min(self.n, self.limit)

    def teardown(self):
        # Answering every request to the end always completes the pull.
        if not hasattr(self, "puller"):
            return
        for _ in range(200):
            if self.puller.done is not None and self.puller.done.refusal is not None:
                self._new_puller(self.cursor)
            if self.puller.done is not None:
                break
            if self.request is None:
                self._new_puller(self.cursor)
                continue
            self.answer(0)
        assert self.puller.done is not None and len(self.stored) == min(self.n, self.limit)


PaginationMachine.TestCase.settings = settings(stateful_step_count=20)
TestPagination = PaginationMachine.TestCase
