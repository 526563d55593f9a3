"""The fast layout readers (core.layouts) accept exactly what the generic
strict decoders accept, as the same values, and never refuse on their own.

Three kinds of input: generated valid objects across the whole layout (every
head width, empty and multi-key content, proposals, first events, sources),
the same objects with bytes flipped, inserted or cut, and objects that are
valid but outside the layout (which must still decode, generically).
"""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from corehelpers import B, NOW, build_chain, make_node
from scaiwave_federation.core import Code, Event, Head, Refused, chain_event, decode_event, make_event, verify_events
from scaiwave_federation.core.backfill import PAGE_CAP, Page, build_page, decode_page
from scaiwave_federation.core.events import _decode_event_generic
from scaiwave_federation.core.keys import Domain, sign
from scaiwave_federation.core.layouts import read_accepting_reply, read_event, read_events_body, read_page
from scaiwave_federation.core.rooms import MAX_TXN_EVENTS, decode_events_body, encode_events_body
from scaiwave_federation.core.wire import decode, encode

KEY = make_node(B, 2).keyring.current
ROOM = f"!r:{B}"

_text = st.text(max_size=300)
_short_text = st.text(min_size=0, max_size=30)


@st.composite
def envelopes(draw) -> bytes:
    """A validly signed envelope, mostly in the fast layout, sometimes just outside it."""
    depth = draw(st.sampled_from([0, 1, 2, 3, 23, 24, 255, 256, 65535, 65536, 2**32, 2**63 - 1]))
    room_host = B if depth else draw(st.sampled_from([B, "other.test"]))
    sender_server = draw(st.sampled_from([B, "your-host.test"])) if depth else B
    fields = {
        "v": 1,
        "room_id": draw(st.sampled_from([ROOM, f"!{'x' * 40}:{room_host}", f"!r:{room_host}"])),
        "room_type": draw(st.sampled_from(["group", "dm", "g" * 30])),
        "depth": depth,
        "prev": draw(st.binary(min_size=32, max_size=32)) if depth >= 2 else None,
        "origin": B,
        "sender": draw(st.sampled_from([f"@bob:{sender_server}", f"@{'é' * 20}:{sender_server}"])),
        "type": draw(st.sampled_from(["m.message", "m.member", "m.create", "x" * 24])),
        "ts": draw(st.sampled_from([NOW, 0, 23, 2**32 - 1, 2**32, 2**63 - 1])),
        "content": draw(st.one_of(
            st.dictionaries(_short_text, _text, max_size=5),
            st.fixed_dictionaries({"body": _text}),
            st.dictionaries(_short_text, st.integers() | st.none() | st.lists(st.integers(), max_size=2), max_size=2),
        )),
    }
    if depth and draw(st.booleans()):
        fields["source"] = draw(st.binary(max_size=300))
    body = cbor2.dumps(fields, canonical=True)
    key_id = draw(st.sampled_from([KEY.key_id, "k", "k" * 64, "ké" * 20]))
    return cbor2.dumps([body, key_id, sign(KEY, Domain.EVENT, body)], canonical=True)


def _damaged(data: bytes, draw) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(out) - 1)) if out else 0
        action = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if action == "flip" and out:
            out[pos] = draw(st.integers(0, 255))
        elif action == "insert":
            out[pos:pos] = bytes([draw(st.integers(0, 255))])
        elif action == "delete" and out:
            del out[pos]
        elif action == "cut":
            del out[pos:]
    return bytes(out)


def _generic(envelope: bytes) -> Event | Refused:
    return _decode_event_generic(envelope)


@given(envelopes())
def test_valid_envelopes_read_fast_or_fall_through_to_the_same_event(envelope):
    generic = _generic(envelope)
    fields = read_event(envelope)
    if fields is not None:
        assert isinstance(generic, Event)
        assert Event(*fields) == generic
    assert decode_event(envelope) == generic


@given(st.data())
def test_damaged_envelopes_never_read_fast_unless_the_generic_decoder_agrees(data):
    envelope = _damaged(data.draw(envelopes()), data.draw)
    fields = read_event(envelope)
    generic = _generic(envelope)
    if fields is not None:
        assert Event(*fields) == generic
    assert decode_event(envelope) == generic


def _signed(body: bytes) -> bytes:
    return encode([body, KEY.key_id, sign(KEY, Domain.EVENT, body)])


def test_the_usual_event_shapes_take_the_fast_layout():
    """The shortcut is worth having only if ordinary traffic takes it: the
    room's first event, memberships, messages, proposals and relayed proposals."""
    node = make_node(B, 2)
    chain = build_chain(node.keyring.current, ROOM, 5)
    proposal = make_event(KEY, room_id=ROOM, room_type="group", depth=0, prev=None, origin=B, sender=f"@bob:{B}",
                          type="m.message", ts=NOW, content={"body": "from afar"})
    relayed = chain_event(KEY, head=Head(chain[-1].depth, chain[-1].event_id), room_id=ROOM, room_type="group",
                          sender=f"@bob:{B}", type="m.message", ts=NOW, content={"body": "from afar"},
                          source=proposal.envelope)
    for event in [*chain, proposal, relayed]:
        fields = read_event(event.envelope)
        assert fields is not None, (event.type, event.depth)
        assert Event(*fields) == event


@pytest.mark.parametrize(
    "change",
    [
        {"ts": 5},  # a small timestamp: not the 8-byte head
        {"content": {"n": 1}},  # a number in content
        {"content": {"body": "x", "extra": {"nested": True}}},
        {"content": {f"k{i:02}": "v" for i in range(24)}},  # 24 keys: a two-byte map head
    ],
)
def test_valid_events_outside_the_layout_still_decode(change):
    """Valid, but outside the layout: these decode generically."""
    fields = {"v": 1, "room_id": ROOM, "room_type": "group", "depth": 2, "prev": bytes(32), "origin": B,
              "sender": f"@bob:{B}", "type": "m.message", "ts": NOW, "content": {"body": "hi"}, **change}
    envelope = _signed(encode(fields))
    assert read_event(envelope) is None
    event = decode_event(envelope)
    assert isinstance(event, Event) and event.content == fields["content"] and event.ts == fields["ts"]


def test_the_layout_reader_refuses_nothing_itself():
    """Whatever it cannot read goes to the generic decoder, whose verdict stands."""
    event = build_chain(KEY, ROOM, 3)[2]
    at = event.body.index(b"\x65depth") + 6
    assert event.body[at] == 3
    body = event.body[:at] + b"\x18\x03" + event.body[at + 1:]  # depth 3 with a needless one-byte argument
    bad = _signed(body)
    assert read_event(bad) is None
    result = decode_event(bad)
    assert isinstance(result, Refused) and result.code is Code.NON_CANONICAL
    # Key order swapped (content and room_id): malformed or non-canonical, never accepted.
    assert read_event(bad.replace(b"gcontent", b"groom_ix")) is None


def test_verify_events_takes_the_same_path_for_fast_and_generic_events():
    node = make_node(B, 2)
    lookup = {B: node.keyring.public(B)}.get
    fields = {"v": 1, "room_id": ROOM, "room_type": "group", "depth": 2, "prev": bytes(32), "origin": B,
              "sender": f"@bob:{B}", "type": "m.message", "ts": 5, "content": {"body": "hi"}}
    slow_body = encode(fields)
    fast_body = encode({**fields, "ts": NOW})
    slow, fast = _signed(slow_body), _signed(fast_body)
    assert read_event(slow) is None and read_event(fast) is not None
    results = verify_events([slow, fast, bytearray(fast)], lookup)
    assert [type(r) for r in results] == [Event, Event, Event]
    assert results[1] == results[2]


# -- transaction bodies and pages ---------------------------------------------------------

_envelope_lists = st.lists(st.binary(max_size=300), min_size=0, max_size=30)


@given(_envelope_lists, st.booleans())
def test_events_bodies_read_fast_as_the_generic_decoder_would(items, extra):
    data = encode({"events": items, **({"txn": 1} if extra else {})})
    fast = read_events_body(data, MAX_TXN_EVENTS)
    generic = decode_events_body(bytearray(data))  # bytearray: the generic path
    if fast is not None:
        assert generic == (fast, {})
    assert decode_events_body(data) == generic


@given(st.data())
def test_damaged_events_bodies_never_read_fast_unless_valid(data):
    body = encode_events_body(data.draw(_envelope_lists.filter(bool)))
    damaged = _damaged(body, data.draw)
    fast = read_events_body(damaged, MAX_TXN_EVENTS)
    generic = decode_events_body(bytearray(damaged))
    if fast is not None:
        assert generic == (fast, {})
    assert decode_events_body(damaged) == generic


_cursors = st.none() | st.integers(1, 2**63 - 1) | st.sampled_from([1, 23, 24, 255, 256, 65536, 2**32])


@given(st.data())
def test_pages_read_fast_as_the_generic_decoder_would(data):
    items = data.draw(st.lists(st.binary(max_size=200), max_size=PAGE_CAP + 2))
    page = encode({"room_id": data.draw(st.sampled_from([ROOM, "é" * 30, "x" * 300])),
                   "before": data.draw(_cursors), "events": items, "next": data.draw(_cursors)})
    if data.draw(st.booleans()):
        page = _damaged(page, data.draw)
    fast = read_page(page, PAGE_CAP)
    generic = decode_page(bytearray(page))
    if fast is not None:
        room_id, before, envelopes_, next_cursor = fast
        assert generic == Page(room_id, before, tuple(envelopes_), next_cursor)
    assert decode_page(page) == generic


def test_pages_the_server_builds_read_fast():
    page = build_page(ROOM, 40, [b"a" * 300, b"b" * 20], [39, 38])
    assert read_page(page, PAGE_CAP) == (ROOM, 40, [b"a" * 300, b"b" * 20], 38)
    assert decode_page(page) == decode_page(bytearray(page)) == Page(ROOM, 40, (b"a" * 300, b"b" * 20), 38)
    assert read_page(build_page(ROOM, None, [b"x"], [1]), PAGE_CAP) == (ROOM, None, [b"x"], None)
    # Over the page cap: the fast reader declines, the generic decoder refuses.
    big = build_page(ROOM, None, [b"x"] * (PAGE_CAP + 1), list(range(PAGE_CAP + 1, 0, -1)))
    assert read_page(big, PAGE_CAP) is None
    refused = decode_page(big)
    assert isinstance(refused, Refused) and refused.code is Code.MALFORMED
    assert decode(page, max_size=1 << 20)["events"] == [b"a" * 300, b"b" * 20]


# -- transaction replies (read back by the replay) ------------------------------------------

_results = st.lists(
    st.one_of(
        st.builds(lambda t: {"event_id": t, "ok": True}, st.text(max_size=50)),
        st.builds(lambda t, c: {"event_id": t, "error": {"code": c, "message": "m"}}, st.text(max_size=5),
                  st.sampled_from(["bad_signature", "chain_broken"])),
        st.builds(lambda t: {"event_id": t, "ok": True, "chained": t}, st.text(max_size=5)),
    ),
    max_size=30,
)


@given(st.data())
def test_accepting_replies_read_fast_only_when_every_event_was_accepted(data):
    results = data.draw(_results)
    reply = encode({"results": results, "events": data.draw(st.sampled_from([[], [b"x"]]))})
    if data.draw(st.booleans()):
        reply = _damaged(reply, data.draw)
    fast = read_accepting_reply(reply)
    generic = decode(reply, max_size=1 << 20)
    # The reference: a reply that created no event and accepted every one as is.
    accepting = (isinstance(generic, dict) and generic.keys() == {"results", "events"} and generic["events"] == []
                 and isinstance(generic["results"], list) and len(generic["results"]) > 0
                 and all(isinstance(r, dict) and r.keys() == {"ok", "event_id"} and r["ok"] is True
                         and isinstance(r["event_id"], str) for r in generic["results"]))
    assert (fast is not None) == accepting
    if accepting:
        assert fast == len(generic["results"])


def test_the_replay_reads_a_recorded_reply_the_same_either_way():
    from scaiwave_federation.core.replay import Replayer

    accepting = encode({"results": [{"event_id": f"$e{i}", "ok": True} for i in range(30)], "events": []})
    mixed = encode({"results": [{"event_id": "$a", "ok": True},
                                {"event_id": "$b", "error": {"code": "chain_broken", "message": "gap"}}],
                    "events": []})
    assert read_accepting_reply(accepting) == 30 and read_accepting_reply(mixed) is None
    fast = Replayer._live_inbound("/_scaiwave/federation/v1/send/t", 200, accepting)
    slow = Replayer._live_inbound("/_scaiwave/federation/v1/send/t", 200, accepting + b"")  # same bytes
    assert fast == slow and fast.events == ("ok",) * 30 and fast.detail == "30 ok"
    assert Replayer._live_inbound("/_scaiwave/federation/v1/send/t", 200, mixed).events == ("ok", "chain_broken")
