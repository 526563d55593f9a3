"""Bounded pulls: whatever a host answers, a pull makes at most its budget of
requests, stores no event twice, and ends; what it stored stays.

The hostile host here answers each page request with one of the answers a
broken or malicious host can give: the honest page, a short one, one event a
page, a page with a moved cursor and no events (the loop of issue 16: 151
requests from one backfill), a stale slice, a repeat of an earlier answer, an
error status, or garbage.
"""

from __future__ import annotations

import functools

from hypothesis import given
from hypothesis import strategies as st

from corehelpers import A, B, NOW, descriptor_bytes, make_node, build_chain
from scaiwave_federation.core import (
    MAX_PULL,
    PAGE_CAP,
    BackfillDone,
    BackfillPuller,
    Code,
    KeyCache,
    SendRequest,
    StoreEvents,
    build_page,
)
from scaiwave_federation.core.backfill import BUDGET_SLACK, request_budget
from scaiwave_federation.core.handshake import refusal_body
from scaiwave_federation.core.codes import Refused

ROOM = f"!grp:{B}"


@functools.lru_cache(maxsize=1)
def _chain():
    b = make_node(B, 2)
    return build_chain(b.keyring.current, ROOM, 250)


@functools.lru_cache(maxsize=1)
def _keys():
    b = make_node(B, 2)
    cache = KeyCache()
    cache.learn(B, descriptor_bytes(b), NOW)
    return cache


def _asked(request: SendRequest) -> tuple[int | None, int]:
    query = dict(p.split("=") for p in request.target.split("?", 1)[1].split("&"))
    return (int(query["before"]) if "before" in query else None), int(query["limit"])


def _page(history, before, count, echo="asked"):
    part = [e for e in history if before is None or e.depth < before][:count]
    return build_page(ROOM, before if echo == "asked" else echo, [e.envelope for e in part], [e.depth for e in part])


ANSWERS = ("honest", "short", "one", "moved", "empty", "slice", "repeat", "error", "garbage")


def _answer(data, history, request, sent):
    before, limit = _asked(request)
    kind = data.draw(st.sampled_from(ANSWERS), label="answer")
    if kind == "honest":
        return 200, _page(history, before, limit)
    if kind == "short":
        return 200, _page(history, before, data.draw(st.integers(1, limit), label="short"))
    if kind == "one":
        return 200, _page(history, before, 1)
    if kind == "moved":  # a moved cursor, no events
        moved = data.draw(st.integers(1, 10_000).filter(lambda b: b != before), label="moved")
        return 200, build_page(ROOM, moved, [], [])
    if kind == "empty":
        return 200, build_page(ROOM, before, [], [])
    if kind == "slice":
        top = data.draw(st.integers(0, len(history) - 1), label="top")
        cursor = None if top == 0 else history[top].depth + 1
        return 200, _page(history, cursor, data.draw(st.integers(1, PAGE_CAP), label="count"))
    if kind == "repeat" and sent:
        return 200, data.draw(st.sampled_from(sent), label="repeat")
    if kind == "error":
        return 500, refusal_body(Refused(Code.INTERNAL_ERROR, "boom"))
    return 200, data.draw(st.binary(max_size=40), label="garbage")


def _drive(data, puller, history, ahead=False):
    """Answer the puller's requests as the drawn host would; with ``ahead``,
    also ask for each next page while a page is processed (``prefetch``), as
    the daemon does, and count every request the host got."""
    stored, sent = [], []
    effects = puller.start(NOW)
    puller.host_got = 0
    prefetched = None
    for _ in range(10_000):
        request = None
        for effect in effects:
            if isinstance(effect, StoreEvents):
                stored.extend(effect.events)
            elif isinstance(effect, SendRequest):
                request = effect
        if request is None:
            break
        if prefetched is not None and prefetched[0] is request:
            status, body = prefetched[1]  # the right guess: its answer is the one
        else:
            status, body = _answer(data, history, request, sent)  # (a wrong guess's answer is dropped)
            puller.host_got += 1
        prefetched = None
        if status == 200:
            sent.append(body)
        if ahead and (guess := puller.prefetch(status, body, NOW)) is not None:
            prefetched = (guess, _answer(data, history, guess, sent))
            puller.host_got += 1
        effects = puller.page_received(status, body, NOW)
    return stored


@given(data=st.data())
def test_any_host_gets_at_most_the_budget_of_requests_and_no_event_is_stored_twice(data):
    n = data.draw(st.integers(1, 250), label="n")
    limit = data.draw(st.integers(1, MAX_PULL), label="limit")
    page_size = data.draw(st.integers(1, PAGE_CAP), label="page_size")
    history = list(reversed(_chain()[:n]))
    a = make_node(A, 1)
    puller = BackfillPuller(server_name=A, room_id=ROOM, peer=B, key=a.keyring.current, keys=_keys(),
                            limit=limit, page_size=page_size)
    stored = _drive(data, puller, history, ahead=data.draw(st.booleans(), label="ahead"))
    assert puller.done is not None, "the pull ended"
    assert puller.host_got == puller.requests <= puller.budget == request_budget(limit, page_size)
    ids = [e.event_id for e in stored]
    assert len(ids) == len(set(ids)), "no event stored twice"
    # What was stored is the newest part of the chain, linked, and stays.
    assert ids == [e.event_id for e in history[:len(ids)]]
    assert puller.done.stored == len(stored) <= min(n, limit)


@given(data=st.data())
def test_a_catch_up_from_any_host_is_bounded_and_all_or_nothing(data):
    n = data.draw(st.integers(2, 250), label="n")
    held = data.draw(st.integers(1, n), label="held")
    page_size = data.draw(st.integers(1, PAGE_CAP), label="page_size")
    chain = _chain()[:n]
    head = chain[held - 1]
    a = make_node(A, 1)
    puller = BackfillPuller(server_name=A, room_id=ROOM, peer=B, key=a.keyring.current, keys=_keys(),
                            page_size=page_size, until=(head.depth, head.event_id))
    stored = _drive(data, puller, list(reversed(chain)))
    assert puller.done is not None and puller.requests <= puller.budget
    assert stored in ([], list(reversed(chain[held:])))


def test_moved_cursors_without_events_end_the_pull_at_once():
    """The attack of issue 16: every page answered with a moved cursor and no
    events. The pull used to ask again for ever (151 requests until the host
    answered 404); now the first such page ends it with ``no_progress``."""
    history = list(reversed(_chain()[:50]))
    a = make_node(A, 1)
    puller = BackfillPuller(server_name=A, room_id=ROOM, peer=B, key=a.keyring.current, keys=_keys(), limit=20)
    effects = puller.start(NOW)
    effects = puller.page_received(200, _page(history, None, 10), NOW)  # an honest first page
    assert [type(e).__name__ for e in effects] == ["StoreEvents", "SendRequest"]
    before, _ = _asked(effects[-1])
    effects = puller.page_received(200, build_page(ROOM, before - 5, [], []), NOW)
    done = effects[-1]
    assert isinstance(done, BackfillDone) and done.refusal.code is Code.NO_PROGRESS
    assert done.stored == 10 and puller.requests == 2


def test_one_event_a_page_runs_out_of_budget_keeping_what_it_stored():
    history = list(reversed(_chain()[:250]))
    a = make_node(A, 1)
    puller = BackfillPuller(server_name=A, room_id=ROOM, peer=B, key=a.keyring.current, keys=_keys(), limit=200)
    assert puller.budget == 2 + BUDGET_SLACK
    effects, stored = puller.start(NOW), []
    while not isinstance(effects[-1], BackfillDone):
        before, _ = _asked(effects[-1])
        effects = puller.page_received(200, _page(history, before, 1), NOW)
        stored += [e for s in effects if isinstance(s, StoreEvents) for e in s.events]
    assert effects[-1].refusal.code is Code.NO_PROGRESS and "more than 4 pages" in effects[-1].refusal.detail
    assert len(stored) == puller.requests == 4
    # The cursor of the last store resumes the pull with a fresh budget for the rest.
    cursor = [s for s in effects if isinstance(s, StoreEvents)][-1].cursor
    resumed = BackfillPuller.resume(cursor, server_name=A, key=a.keyring.current, keys=_keys())
    assert resumed.stored == 4 and resumed.budget == request_budget(196, PAGE_CAP)


def test_a_host_given_lookup_verifies_proposals_its_own_users_made():
    """A page holds our own users' proposals as ``source``: with the host's
    lookup (which knows our own keys) they verify without fetching our own
    descriptor, so pulls running side by side never race for it."""
    from scaiwave_federation.core import Head, chain_event, make_event

    a, b = make_node(A, 1), make_node(B, 2)
    chain = list(_chain()[:3])
    proposal = make_event(a.keyring.current, room_id=ROOM, room_type="group", depth=0, prev=None, origin=A,
                          sender=f"@alice:{A}", type="m.message", ts=NOW, content={"body": "mine"})
    chain.append(chain_event(b.keyring.current, head=Head(3, chain[-1].event_id), room_id=ROOM, room_type="group",
                             sender=proposal.sender, type="m.message", ts=NOW, content=proposal.content,
                             source=proposal.envelope))
    history = list(reversed(chain))

    def lookup(server):
        return a.keyring.public(A) if server == A else _keys().keys(server)

    for lookup_given, needs in ((None, True), (lookup, False)):
        puller = BackfillPuller(server_name=A, room_id=ROOM, peer=B, key=a.keyring.current, keys=_keys(),
                                lookup=lookup_given)
        puller.start(NOW)
        effects = puller.page_received(200, _page(history, None, 10), NOW)
        assert any(type(e).__name__ == "NeedKeys" for e in effects) is needs


class _Honest:
    """Stands for hypothesis' ``data``: the host always answers honestly."""

    @staticmethod
    def draw(strategy, label=None):
        assert label == "answer"
        return "honest"


def test_asking_ahead_an_honest_host_costs_no_extra_request():
    """The daemon asks for page k+1 while it verifies page k: every guess is
    right with an honest host, so the pull makes the same requests and stores
    the same events as one that waits."""
    history = list(reversed(_chain()[:250]))
    a = make_node(A, 1)
    runs = []
    for ahead in (False, True):
        puller = BackfillPuller(server_name=A, room_id=ROOM, peer=B, key=a.keyring.current, keys=_keys(),
                                limit=230, page_size=50)
        stored = _drive(_Honest, puller, history, ahead=ahead)
        runs.append(([e.event_id for e in stored], puller.requests, puller.host_got, puller.done.refusal))
    assert runs[0] == runs[1] and runs[1][1] == 5 and len(runs[1][0]) == 230 and runs[1][3] is None


def test_asking_ahead_never_goes_past_the_budget():
    """One event a page, asked for ahead each time: the pull still makes at
    most its budget of requests (the guess that would be one more is not made)."""
    history = list(reversed(_chain()[:250]))
    a = make_node(A, 1)
    puller = BackfillPuller(server_name=A, room_id=ROOM, peer=B, key=a.keyring.current, keys=_keys(), limit=200)
    effects, requests = puller.start(NOW), 1
    while not isinstance(effects[-1], BackfillDone):
        before, _ = _asked(effects[-1])
        page = _page(history, before, 1)
        guess = puller.prefetch(200, page, NOW)
        requests += guess is not None
        effects = puller.page_received(200, page, NOW)
        assert not isinstance(effects[-1], SendRequest) or effects[-1] is guess
    assert effects[-1].refusal.code is Code.NO_PROGRESS
    assert requests == puller.requests == puller.budget == 4
