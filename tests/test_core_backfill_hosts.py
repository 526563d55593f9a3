"""Backfill against what hosts serve and answer: pages of 500 cut by bytes,
hosts of before that serve 100 a page, and hosts that say "not now"
(``rate_limited``, ``storage_unavailable``, ``timeout``): the page is asked
again later, never a failed pull at the first refusal."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corehelpers import (
    GROUP_ROOM,
    A,
    B,
    NOW,
    FakeLink,
    HostedRoom,
    assert_chain_run,
    backfill_puller as _puller,
    hosted_pair,
    pair,
    run_backfill,
    run_handshake,
)
from scaiwave_federation.core import (
    BackfillDone,
    BackfillPuller,
    Code,
    Failed,
    Head,
    Refused,
    SendRequest,
    StoreEvents,
    build_page,
    chain_event,
    decode_page,
)
from scaiwave_federation.core import backfill as backfill_module
from scaiwave_federation.core.backfill import MAX_PAGE_BYTES, PAGE_BYTES, PAGE_CAP, page_bytes
from scaiwave_federation.core.events import MAX_EVENT_BYTES
from scaiwave_federation.core.handshake import refusal_body

ROOM = GROUP_ROOM


# -- pages of 500, cut by bytes, and hosts that serve 100 --------------------------------


def test_a_pull_from_a_host_that_serves_100_a_page_fits_its_budget(monkeypatch):
    """PAGE_CAP went from 100 to 500: a puller asks for 500, but a host of
    before serves at most 100 a page. Its budget counts pages of
    BUDGET_PAGE (100), so a pull of 1,000 still completes there (with pages
    of 500 in the count, four requests plus slack, it stopped at 600 with
    ``no_progress``)."""
    link, chain, room_id = hosted_pair(1200)
    puller = _puller(link, limit=1000)
    assert puller.page_size == PAGE_CAP == 500 and puller.budget == 12
    monkeypatch.setattr(backfill_module, "PAGE_CAP", 100)  # the host (and page decoding) as before
    run = run_backfill(link, puller)
    assert run.done == BackfillDone(room_id, B, 1000, reached_start=False)
    assert_chain_run(run.stored, chain, 1000)
    asked = [x.target for x in link.log if "backfill" in x.target]
    assert len(asked) == 10 and asked[0].endswith("limit=500")  # served 100 each


def test_a_page_of_large_events_is_cut_at_page_bytes():
    """build_page keeps the newest events that fit in PAGE_BYTES (each counted
    as page_bytes says); the page decodes within MAX_PAGE_BYTES and its
    ``next`` follows the last event it holds."""
    big = [bytes([n % 251]) * MAX_EVENT_BYTES for n in range(130)]
    depths = list(range(130, 0, -1))
    body = build_page(ROOM, None, big, depths)
    page = decode_page(body)
    fit = PAGE_BYTES // page_bytes(big[0])
    assert len(body) <= MAX_PAGE_BYTES and 100 <= fit < 130
    assert page.events == tuple(big[:fit]) and page.next == depths[fit - 1]
    # Small events: the count caps the page, not the bytes.
    small = [b"x" * 600] * PAGE_CAP
    assert len(decode_page(build_page(ROOM, 7, small, list(range(PAGE_CAP, 0, -1)))).events) == PAGE_CAP
    # One event always fits, and an empty page stays empty.
    assert decode_page(build_page(ROOM, None, [], [])).events == ()


def test_a_pull_of_a_room_of_large_events_takes_the_pages_as_cut():
    """A room of 130 events of about 64 KiB: the host's first page holds what
    fits in PAGE_BYTES (fewer than asked), the next the rest; the pull stores
    all 130, linked, within its budget."""
    a, b = pair()
    link = FakeLink(a, b)
    assert run_handshake(link, A, B)[0].state == "peered"
    key, sender, head, chain = b.keyring.current, f"@alice:{B}", None, []
    for i in range(1, 131):
        etype, content = ("m.create", {"creator": sender}) if i == 1 else ("m.message", {"body": "x" * 65_000})
        event = chain_event(key, head=head, room_id=ROOM, room_type="group", sender=sender, type=etype,
                            ts=NOW + i, content=content)
        chain.append(event)
        head = Head(event.depth, event.event_id)
    link.server(B).rooms[ROOM] = HostedRoom("group", chain, member_servers={A})
    run = run_backfill(link, _puller(link, limit=200))
    assert run.done == BackfillDone(ROOM, B, 130, reached_start=True)
    assert_chain_run(run.stored, chain, 130)
    sizes = [len(x.reply) for x in link.log if "backfill" in x.target]
    assert len(sizes) == 2 and all(s <= MAX_PAGE_BYTES for s in sizes)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.sampled_from([1, 200, 4_000, 60_000, MAX_EVENT_BYTES]), max_size=PAGE_CAP + 20),
       before=st.one_of(st.none(), st.integers(1, 10**6)))
def test_a_built_page_is_the_longest_prefix_that_fits(sizes, before):
    """Whatever storage hands it, build_page keeps the newest envelopes that
    fit in PAGE_BYTES (at least one), decodes within MAX_PAGE_BYTES, and
    names the last one's depth as ``next`` (None at depth 1 or for no events)."""
    envelopes = [bytes([n % 256]) * size for n, size in enumerate(sizes)]
    depths = list(range(len(sizes) + 5, 5, -1))
    body = build_page(ROOM, before, envelopes, depths)
    page = decode_page(body)
    assert not isinstance(page, Refused) and len(body) <= MAX_PAGE_BYTES
    kept = len(page.events)
    assert page.events == tuple(envelopes[:kept]) and (kept > 0) == (len(envelopes) > 0)
    assert sum(map(page_bytes, envelopes[:kept])) <= PAGE_BYTES or kept == 1
    if kept < len(envelopes):
        assert sum(map(page_bytes, envelopes[:kept + 1])) > PAGE_BYTES
    assert page.next == (depths[kept - 1] if kept else None) and page.before == before


# -- a host that says "not now" ----------------------------------------------------------

def _pull_through(link, puller, busy, now=NOW):
    """Drive ``puller`` over ``link``; ``busy(n)`` (n: requests so far) names a
    refusal the host answers instead of the page, or None. Honours not_before
    by moving the clock. Returns (run effects, [(request, the time it went)])."""
    from scaiwave_federation.core.codes import HTTP_STATUS

    effects, sent, out = puller.start(now), [], []
    while effects:
        following = []
        for eff in effects:
            out.append(eff)
            if isinstance(eff, SendRequest):
                now = max(now, eff.not_before)
                sent.append((eff, now))
                refusal = busy(len(sent))
                if refusal is not None:
                    status, body = HTTP_STATUS[refusal.code], refusal_body(refusal)
                else:
                    status, body = link.deliver(puller.server_name, eff, now)
                now += 1
                following += puller.page_received(status, body, now)
        effects = following
    return out, sent


@pytest.mark.parametrize("code", sorted(backfill_module.PAGE_RETRY_CODES, key=lambda c: c.value))
def test_a_page_the_host_refuses_for_the_moment_is_asked_again_later(code):
    link, chain, room_id = hosted_pair(250)
    puller = _puller(link, limit=200, page_size=60)
    effects, sent = _pull_through(link, puller, lambda n: Refused(code, "not now") if n in (2, 3) else None)
    done = effects[-1]
    assert done == BackfillDone(room_id, B, 200, False) and not any(isinstance(e, Failed) for e in effects)
    assert_chain_run([e for s in effects if isinstance(s, StoreEvents) for e in s.events], chain, 200)
    # The second page was asked three times: the same target, 1 s then 2 s after the refusal.
    (first, t1), (again, t2), (third, t3) = sent[1:4]
    assert first.target == again.target == third.target and first.not_before == 0
    assert (again.not_before, third.not_before) == (t1 + 1 + 1000, t2 + 1 + 2000) == (t2, t3)
    # A retry is the same page: the budget counts pages (4 for 200 events of 60 a page).
    assert puller.requests == 4 and len(sent) == 6


def test_a_host_that_keeps_saying_not_now_ends_the_pull_with_its_refusal():
    link, chain, room_id = hosted_pair(250)
    puller = _puller(link, limit=200, page_size=60)
    effects, sent = _pull_through(link, puller, lambda n: Refused(Code.RATE_LIMITED, "slow down") if n > 1 else None)
    assert len(sent) == 2 + backfill_module.PAGE_RETRIES
    waits = [req.not_before - at for (_, at), (req, _) in zip(sent[1:], sent[2:])]
    assert waits == [1 + backfill_module.PAGE_RETRY_MS * 2 ** k for k in range(backfill_module.PAGE_RETRIES)]
    done = effects[-1]
    assert done.refusal.code is Code.RATE_LIMITED and done.stored == 60  # the first page stays stored
    assert Failed(B, done.refusal) in effects
    # Resumable: a later pull from its cursor stores the rest.
    cursor = [e for e in effects if isinstance(e, StoreEvents)][-1].cursor
    a = link.server(A).node
    again = BackfillPuller.resume(cursor, server_name=A, key=a.keyring.current, keys=a.keys, page_size=60)
    more, _ = _pull_through(link, again, lambda n: None, now=NOW + 60_000)
    assert more[-1] == BackfillDone(room_id, B, 200, False)


def test_the_count_of_retries_starts_again_with_each_page():
    # "Not now" before every page: more refusals in all than PAGE_RETRIES, never that many in a row.
    link, chain, room_id = hosted_pair(250)
    puller = _puller(link, limit=250, page_size=30)
    effects, sent = _pull_through(link, puller, lambda n: Refused(Code.RATE_LIMITED) if n % 2 else None)
    assert effects[-1] == BackfillDone(room_id, B, 250, True)
    assert len(sent) // 2 > backfill_module.PAGE_RETRIES


@pytest.mark.parametrize("refusal", [Refused(Code.INTERNAL_ERROR), Refused(Code.NOT_PEERED), Refused(Code.FORBIDDEN)])
def test_other_refusals_end_the_pull_at_once(refusal):
    link, chain, room_id = hosted_pair(50)
    effects, sent = _pull_through(link, _puller(link), lambda n: refusal)
    assert len(sent) == 1 and effects[-1].refusal.code is refusal.code
