"""Replay of recorded traffic through a fresh core, with synthetic recordings.

Each recording here is built in memory from fixed seeds the way the daemon
writes one (see shell/recorder.py): state records, then inbound requests with
the context they read and the reply sent, and outbound handshakes and
backfills with the answers that came back. The replay must reproduce the live
decisions, flag the ones it cannot, and a what-if must change exactly the
decisions it should. No files, no sockets.
"""

from __future__ import annotations

import pytest

from corehelpers import (
    A,
    B,
    NOW,
    build_chain,
    descriptor_bytes,
    endpoint,
    events_body,
    invite_event,
    make_node,
    tamper_envelope,
)
from scaiwave_federation.core import Authenticated, BackfillPuller, Code, Initiator, Policy, Refused, make_event
from scaiwave_federation.core.backfill import backfill_target, build_page
from scaiwave_federation.core.handshake import HANDSHAKE_TARGET, refusal_body
from scaiwave_federation.core.replay import UNKNOWN, Decision, Outcome, replay_records
from scaiwave_federation.core.wire import encode

P = "/_scaiwave/federation/v1/"
GROUP = f"!grp:{B}"  # hosted by peer.test
MINE = f"!mine:{A}"  # hosted by us
BOB_A = f"@bob:{A}"
CAROL_B = f"@carol:{B}"


class Script:
    """Builds a recording of your-host.test (A) while driving real cores."""

    def __init__(self):
        self.a = make_node(A, 1, allowed=[B])
        self.b = make_node(B, 2, allowed=[A])
        self.records: list[dict] = []
        self.clock = NOW

    def tick(self, ms: int = 10) -> int:
        self.clock += ms
        return self.clock

    def add(self, kind: str, **fields) -> int:
        self.records.append({"kind": kind, "now": fields.pop("now", self.tick()), **fields})
        return len(self.records) - 1

    def state(self):
        self.add("settings", refetch_interval_ms=30_000, skew_ms=120_000)
        self.add("policy", policy=self.a.policy.as_dict())
        self.add("own_keys", public=self.a.descriptor(endpoint(A)))
        return self

    def inbound(self, method: str, target: str, body: bytes = b"", *, context=None, status=None, response=None,
                fetch_descriptor=False, sign_now=None, authorization=None) -> int:
        """B sends a request to A; A's core decides it live; both are recorded."""
        now = self.tick()
        if authorization is None:
            authorization = self.b.sign(destination=A, method=method, target=target, body=body,
                                        now=sign_now if sign_now is not None else now)
        if fetch_descriptor:
            self.add("descriptor", server=B, body=descriptor_bytes(self.b), now=now)
            self.a.learn_descriptor(B, descriptor_bytes(self.b), now)
        return self.add("inbound", now=now + 1, received_at=now, method=method, target=target,
                        authorization=authorization, body=body, context=context or {}, status=status,
                        response=response)

    def auth(self) -> Authenticated:
        return Authenticated(B, self.b.keyring.current.key_id, b"x" * 32, NOW)


def _error(code: str) -> bytes:
    return encode({"error": {"code": code, "message": "live"}})


def _welcome_for(script: Script, responder, initiator_name: str, nonce: bytes) -> tuple[bytes, Initiator]:
    """The welcome ``responder`` sends to ``initiator_name``'s hello with ``nonce``."""
    initiator = script.a if initiator_name == A else script.b
    ini = Initiator(server_name=initiator_name, peer=responder.server_name, keyring=initiator.keyring,
                    policy=initiator.policy, keys=initiator.keys)
    ini.start(nonce)
    (hello,) = ini.descriptor_received(descriptor_bytes(responder), NOW)
    reply, _ = responder.on_handshake(Authenticated(initiator_name, "k", b"n", 0), hello.body)
    return reply, ini


def _full_script() -> tuple[Script, dict[str, int]]:
    s = Script().state()
    at: dict[str, int] = {}
    # An inbound handshake from B; A fetched B's descriptor to check it.
    ini = Initiator(server_name=B, peer=A, keyring=s.b.keyring, policy=s.b.policy, keys=s.b.keys)
    ini.start(b"h" * 16)
    (hello,) = ini.descriptor_received(descriptor_bytes(s.a), NOW)
    reply, _ = s.a.on_handshake(s.auth(), hello.body)
    at["handshake"] = s.inbound("POST", HANDSHAKE_TARGET, hello.body, fetch_descriptor=True, status=200, response=reply)
    # An invite of our bob into B's group room.
    chain = build_chain(s.b.keyring.current, GROUP, 3, sender=CAROL_B)
    invite = invite_event(s.b.keyring.current, chain, BOB_A)
    at["invite"] = s.inbound("PUT", P + f"invite/{GROUP}", events_body([invite]),
                             context={"peered": True, "local_users": [BOB_A]}, status=200,
                             response=encode({"ok": True}))
    # A transaction: B's chained events of its room, then the same txn again.
    envelopes = [e.envelope for e in chain]
    body = encode({"events": envelopes})
    ok3 = encode({"results": [{"event_id": e.id_text, "ok": True} for e in chain], "events": []})
    heads = {GROUP: {"known": True, "host": B, "head": None}}
    at["send"] = s.inbound("PUT", P + "send/t1", body, context={"peered": True, "heads": heads}, status=200,
                           response=ok3)
    at["send again"] = s.inbound("PUT", P + "send/t1", body, context={"peered": True, "replayed_txn": True},
                                 status=200, response=ok3)
    # A transaction of proposals into our room: carol may post, dave is no member.
    mine_chain = build_chain(s.a.keyring.current, MINE, 2)
    post = make_event(s.b.keyring.current, room_id=MINE, room_type="group", depth=0, prev=None, origin=B,
                      sender=CAROL_B, type="m.message", ts=NOW, content={"body": "hello"})
    stranger = make_event(s.b.keyring.current, room_id=MINE, room_type="group", depth=0, prev=None, origin=B,
                          sender=f"@dave:{B}", type="m.message", ts=NOW, content={"body": "hi"})
    lost = make_event(s.b.keyring.current, room_id=f"!gone:{A}", room_type="group", depth=0, prev=None,
                      origin=B, sender=CAROL_B, type="m.message", ts=NOW, content={"body": "?"})
    context = {
        "peered": True,
        "heads": {MINE: {"known": True, "host": A, "head": [2, mine_chain[1].event_id]},
                  f"!gone:{A}": {"known": False, "host": None, "head": None}},
        "rooms": {MINE: {"room_type": "group", "tenant_federates": True, "membership": "join"}},
        "proposals": {post.id_text: {"room_type": "group", "tenant_federates": True, "membership": "join"},
                      stranger.id_text: {"room_type": "group", "tenant_federates": True, "membership": None}},
    }
    live = encode({"results": [{"ok": True}, {"error": {"code": "not_member", "message": "x"}},
                               {"error": {"code": "not_found", "message": "x"}}], "events": []})
    at["proposals"] = s.inbound("PUT", P + "send/t2", events_body([post, stranger, lost]), context=context,
                                status=200, response=live)
    # B pulls our room's history.
    page = build_page(MINE, None, [e.envelope for e in reversed(mine_chain)], [2, 1])
    at["serve backfill"] = s.inbound("GET", P + f"rooms/{MINE}/backfill?limit=50", context={
        "peered": True, "room_type": "group", "tenant_federates": True, "origin_is_member": True},
        status=200, response=page)
    # Refusals: a request from long ago, an unknown endpoint.
    at["skewed"] = s.inbound("PUT", P + "send/t3", events_body(chain[:1]), sign_now=NOW - 10**9, status=401,
                             response=_error("clock_skew"))
    at["nowhere"] = s.inbound("GET", P + "nowhere", status=404, response=_error("not_found"))
    # Our own handshake with B.
    welcome, _ = _welcome_for(s, s.b, A, b"w" * 16)
    at["handshake out"] = s.add("handshake_start", peer=B, nonce=b"w" * 16)
    s.add("descriptor", server=B, body=descriptor_bytes(s.b))
    s.add("outbound", peer=B, method="POST", target=HANDSHAKE_TARGET, body=b"", status=200, response=welcome)
    s.add("handshake_end", peer=B, protocol_version="scaiwave-fed/1")
    # Our backfill of B's group room.
    puller = BackfillPuller(server_name=A, room_id=GROUP, peer=B, key=s.a.keyring.current, keys=s.a.keys)
    at["backfill"] = s.add("backfill_start", room_id=GROUP, peer=B, limit=1000, cursor=puller.cursor())
    s.add("outbound", peer=B, method="GET", target=backfill_target(GROUP, None, 100), body=b"", status=200,
          response=build_page(GROUP, None, [e.envelope for e in reversed(chain)], [3, 2, 1]))
    s.add("backfill_end", room_id=GROUP, peer=B, stored=3, reached_start=True, error=None)
    return s, at


def _by_index(result) -> dict[int, Decision]:
    return {d.index: d for d in result.decisions}


def test_replay_reproduces_every_live_decision():
    s, at = _full_script()
    result = replay_records(A, s.records)
    assert result.differing == [], [(d.index, d.live.short(), d.replay.short()) for d in result.differing]
    assert result.notes == [] and result.what_if is False
    d = _by_index(result)
    assert set(at.values()) == set(d)
    assert d[at["handshake"]].replay.verdict == "accepted" and d[at["handshake"]].peer == B
    assert d[at["invite"]].replay.detail == f"invite of {BOB_A} would be stored"
    assert d[at["send"]].replay.events == ("ok", "ok", "ok")
    assert d[at["send again"]].replay.detail == "repeated transaction: the stored reply"
    assert d[at["proposals"]].replay.events == ("ok", "not_member", "not_found")
    assert d[at["proposals"]].replay.detail == "1 event would be stored"
    assert d[at["serve backfill"]].replay.detail == "would serve a page before=None limit=50"
    assert d[at["serve backfill"]].live.detail == "served 2 events"
    assert d[at["skewed"]].replay.code == "clock_skew"
    assert d[at["nowhere"]].replay.code == "not_found" and d[at["nowhere"]].live.status == 404
    assert d[at["handshake out"]].replay == Outcome("peered", detail="scaiwave-fed/1")
    assert d[at["backfill"]].replay.short() == "done 3 stored"
    assert d[at["backfill"]].live.matches(d[at["backfill"]].replay)
    assert result.skipped == {}


def test_replay_is_deterministic():
    s, _ = _full_script()
    assert replay_records(A, s.records) == replay_records(A, s.records)


def test_what_if_closed_policy_refuses_exactly_what_needs_policy():
    s, at = _full_script()
    result = replay_records(A, s.records, policy=Policy("closed"))
    assert result.what_if
    differing = {d.index: d.replay.code for d in result.differing}
    assert differing == {at[k]: "federation_closed" for k in (
        "handshake", "invite", "send", "send again", "proposals", "serve backfill", "handshake out", "backfill",
        "skewed")}
    # An unknown route comes before any policy: it does not change. Policy
    # admission of the claimed origin comes before everything else, the
    # clock check included (a stranger costs us one header decode).
    same = _by_index(result)
    assert same[at["nowhere"]].same


def test_what_if_clock_offset_refuses_with_clock_skew():
    s, at = _full_script()
    result = replay_records(A, s.records, clock_offset_ms=3_600_000)
    codes = {d.index: d.replay.code for d in result.differing}
    assert codes[at["handshake"]] == "clock_skew" and codes[at["invite"]] == "clock_skew"


def test_mismatch_is_flagged():
    s, at = _full_script()
    s.records[at["invite"]]["status"] = 403
    s.records[at["invite"]]["response"] = _error("peer_blocked")
    result = replay_records(A, s.records)
    (d,) = result.differing
    assert d.index == at["invite"] and not d.same and d.comparable
    assert d.live.text() == "403 refused peer_blocked" and d.replay.short() == "accepted"


def test_tampered_event_in_a_transaction_is_refused_per_event():
    s = Script().state()
    s.a.learn_descriptor(B, descriptor_bytes(s.b), NOW)
    s.add("descriptor", server=B, body=descriptor_bytes(s.b), cached=True, fetched_at=NOW)
    chain = build_chain(s.b.keyring.current, GROUP, 3)
    body = encode({"events": [chain[0].envelope, tamper_envelope(chain[1]), chain[2].envelope]})
    live = encode({"results": [{"ok": True}, {"error": {"code": "bad_signature", "message": "x"}},
                               {"error": {"code": "chain_broken", "message": "x"}}], "events": []})
    i = s.inbound("PUT", P + "send/t9", body, context={"peered": True, "heads": {
        GROUP: {"known": True, "host": B, "head": None}}}, status=200, response=live)
    (d,) = replay_records(A, s.records).decisions
    assert d.index == i and d.same
    assert d.replay.events == ("ok", "bad_signature", "chain_broken")
    assert d.replay.short() == "accepted [ok, bad_signature, chain_broken]"


def test_unknown_room_in_a_transaction_is_not_found():
    s = Script().state()
    s.add("descriptor", server=B, body=descriptor_bytes(s.b), cached=True, fetched_at=NOW)
    chain = build_chain(s.b.keyring.current, GROUP, 1)
    s.inbound("PUT", P + "send/t1", events_body(chain), context={"peered": True, "heads": {
        GROUP: {"known": False, "host": None, "head": None}}}, status=200,
        response=encode({"results": [{"error": {"code": "not_found", "message": "x"}}], "events": []}))
    (d,) = replay_records(A, s.records).decisions
    assert d.replay.events == ("not_found",) and d.same


def test_keys_the_recording_never_fetched_are_peer_unreachable():
    s = Script().state()
    s.inbound("POST", HANDSHAKE_TARGET, b"\xa0", status=401, response=_error("unknown_key"))
    (d,) = replay_records(A, s.records).decisions
    assert d.replay.code == "peer_unreachable" and not d.same


def test_failed_descriptor_fetch_is_replayed_with_its_error():
    s = Script().state()
    s.add("descriptor", server=B, error={"code": "tls_failure", "message": "bad chain"})
    s.inbound("POST", HANDSHAKE_TARGET, b"\xa0", status=502, response=_error("tls_failure"))
    (d,) = replay_records(A, s.records).decisions
    assert d.replay.code == "tls_failure" and d.same


def test_outbound_handshake_variants():
    s = Script().state()
    welcome, _ = _welcome_for(s, s.b, A, b"w" * 16)
    # 1: the descriptor fetch failed live.
    one = s.add("handshake_start", peer=B, nonce=b"w" * 16)
    s.add("descriptor", server=B, error={"code": "tls_failure", "message": "x"})
    s.add("handshake_end", peer=B, error={"code": "tls_failure", "message": "x"})
    # 2: the hello could not be delivered.
    two = s.add("handshake_start", peer=B, nonce=b"w" * 16)
    s.add("descriptor", server=B, body=descriptor_bytes(s.b))
    s.add("outbound", peer=B, method="POST", target=HANDSHAKE_TARGET, body=b"",
          error={"code": "peer_unreachable", "message": "refused"})
    s.add("handshake_end", peer=B, error={"code": "peer_unreachable", "message": "x"})
    # 3: the peer refused the hello.
    three = s.add("handshake_start", peer=B, nonce=b"w" * 16)
    s.add("descriptor", server=B, body=descriptor_bytes(s.b))
    s.add("outbound", peer=B, method="POST", target=HANDSHAKE_TARGET, body=b"", status=403,
          response=refusal_body(Refused(Code.PEER_NOT_ALLOWED, "live")))
    s.add("handshake_end", peer=B, error={"code": "peer_not_allowed", "message": "x"})
    # 4: the recording ends before the descriptor (a crash): no live outcome, replay diverged.
    four = s.add("handshake_start", peer=B, nonce=b"w" * 16)
    result = replay_records(A, s.records)
    d = _by_index(result)
    assert d[one].replay.code == "tls_failure" and d[one].same
    assert d[two].replay.code == "peer_unreachable" and d[two].same
    assert d[three].replay.code == "peer_not_allowed" and d[three].same
    assert d[four].replay.verdict == "diverged" and d[four].live.verdict == UNKNOWN
    assert not d[four].comparable and d[four].same


def test_outbound_handshake_without_an_answer_diverges():
    s = Script().state()
    i = s.add("handshake_start", peer=B, nonce=b"w" * 16)
    s.add("descriptor", server=B, body=descriptor_bytes(s.b))
    s.add("handshake_end", peer=B, protocol_version="scaiwave-fed/1")
    (d,) = replay_records(A, s.records).decisions
    assert d.index == i and d.replay.verdict == "diverged" and not d.same


def _pull_script():
    """A script, the cursor of a fresh pull of B's group room, and the page of its 4 events."""
    s = Script().state()
    chain = build_chain(s.b.keyring.current, GROUP, 4)
    cursor = BackfillPuller(server_name=A, room_id=GROUP, peer=B, key=s.a.keyring.current,
                            keys=s.a.keys).cursor()
    return s, cursor, build_page(GROUP, None, [e.envelope for e in reversed(chain)], [4, 3, 2, 1])


def test_backfill_variants():
    s, cursor, page = _pull_script()
    # 1: keys fetched in the middle of the pull (NeedKeys), then a full page.
    one = s.add("backfill_start", room_id=GROUP, peer=B, limit=1000, cursor=cursor)
    s.add("outbound", peer=B, method="GET", target=backfill_target(GROUP, None, 100), body=b"", status=200,
          response=page)
    s.add("descriptor", server=B, body=descriptor_bytes(s.b))
    s.add("backfill_end", room_id=GROUP, peer=B, stored=4, reached_start=True, error=None)
    # 2: the transport failed.
    two = s.add("backfill_start", room_id=GROUP, peer=B, limit=1000, cursor=cursor)
    s.add("outbound", peer=B, method="GET", target=backfill_target(GROUP, None, 100), body=b"",
          error={"code": "peer_unreachable", "message": "x"})
    s.add("backfill_end", room_id=GROUP, peer=B, stored=0, reached_start=False,
          error={"code": "peer_unreachable", "message": "x"})
    # 3: no answer recorded.
    three = s.add("backfill_start", room_id=GROUP, peer=B, limit=1000, cursor=cursor)
    s.add("backfill_end", room_id=GROUP, peer=B, stored=0, reached_start=False, error=None)
    # 4: recorded since pages hold 500 (1-3 asked for 100, as recordings made before did):
    # the replay asks what the recording did.
    four = s.add("backfill_start", room_id=GROUP, peer=B, limit=1000, cursor=cursor)
    s.add("outbound", peer=B, method="GET", target=backfill_target(GROUP, None, 500), body=b"", status=200,
          response=page)
    s.add("backfill_end", room_id=GROUP, peer=B, stored=4, reached_start=True, error=None)
    # 5: a recording whose page request names no usable size (limit=0, junk):
    # the replay asks pages of PAGE_CAP, finds no such answer, and says so.
    fives = []
    for junk in ("0", "-3", "x", "99999999999", ""):
        fives.append(s.add("backfill_start", room_id=GROUP, peer=B, limit=1000, cursor=cursor))
        s.add("outbound", peer=B, method="GET", target=f"{backfill_target(GROUP, None, 1)[:-1]}{junk}", body=b"",
              status=200, response=page)
        s.add("backfill_end", room_id=GROUP, peer=B, stored=4, reached_start=True, error=None)
    d = _by_index(replay_records(A, s.records))
    assert d[four].replay.short() == "done 4 stored" and d[four].same
    assert all(d[five].replay.verdict == "diverged" and not d[five].same for five in fives)
    assert d[one].replay.short() == "done 4 stored" and d[one].same
    assert d[two].replay.code == "peer_unreachable" and d[two].same
    assert d[three].replay.verdict == "diverged" and not d[three].same


def test_backfill_without_own_key_or_against_policy():
    s = Script()
    s.add("own_keys", public={"public_key": ""})
    cursor = BackfillPuller(server_name=A, room_id=GROUP, peer=B, key=s.a.keyring.current,
                            keys=s.a.keys).cursor()
    s.add("backfill_start", room_id=GROUP, peer=B, limit=10, cursor=cursor)
    s.add("own_keys", public=s.a.descriptor(endpoint(A)))
    s.add("policy", policy={"default_mode": "open", "blocked_peers": [B]})
    s.add("backfill_start", room_id=GROUP, peer=B, limit=10, cursor=cursor)
    first, second = replay_records(A, s.records).decisions
    assert first.replay.code == "own_key_missing"
    assert second.replay.code == "peer_blocked"


def test_state_records_and_malformed_ones():
    s = Script()
    s.add("settings", refetch_interval_ms=5, skew_ms=1000)
    s.add("nonces", nonces=[[b"n" * 32, NOW + 10_000]])
    s.add("descriptor", server=B, body=b"older fetch")  # superseded: learned (and refused) as it came
    s.add("descriptor", server=B, body=descriptor_bytes(s.b))
    s.add("descriptor", server="third.test", body=b"never used")
    s.add("policy", policy="open")  # malformed
    s.add("own_keys", public={"public_key": "AAAA", "server_name": A})  # does not check
    s.add("nonces", nonces=5)  # malformed
    s.add("outbound", peer=B, method="GET", target="/x", status=200, response=b"")
    s.add("mystery")
    s.records.append("not a record")
    s.add("inbound", method="PUT")  # no target
    s.add("handshake_end", peer=B)
    result = replay_records(A, s.records)
    assert result.decisions == []
    assert len(result.notes) == 4 and all("malformed record" in n for n in result.notes)
    assert result.skipped == {"outbound": 1, "mystery": 1, "None": 1, "descriptor": 2}


def test_outcome_text_forms():
    assert Outcome("refused", "peer_blocked", detail="why", status=403).text() == "403 refused peer_blocked (why)"
    assert Outcome("accepted", events=("ok", "bad_signature")).short() == "accepted [ok, bad_signature]"
    assert Outcome("accepted", events=("ok", "ok")).short() == "accepted"
    assert Outcome("done", count=3).matches(Outcome("done"))
    assert not Outcome("done", count=3).matches(Outcome("done", count=4))
    assert not Outcome("refused", "a").matches(Outcome("refused", "b"))


@pytest.mark.parametrize("room_type", ["incognito", "sidekick"])
def test_serving_a_room_that_never_leaves_is_refused_in_replay_too(room_type):
    s = Script().state()
    s.add("descriptor", server=B, body=descriptor_bytes(s.b), cached=True, fetched_at=NOW)
    s.inbound("GET", P + f"rooms/{MINE}/backfill", context={"peered": True, "room_type": room_type,
                                                             "origin_is_member": True},
              status=403, response=_error(f"room_{room_type}"))
    (d,) = replay_records(A, s.records).decisions
    assert d.replay.code == f"room_{room_type}" and d.same


def test_a_backfill_page_the_host_said_not_now_to_is_replayed_with_its_retry():
    s, cursor, page = _pull_script()
    target = backfill_target(GROUP, None, 500)
    # Recorded since pulls retry: the refusal, then the same page asked again and answered.
    retried = s.add("backfill_start", room_id=GROUP, peer=B, limit=1000, cursor=cursor)
    s.add("outbound", peer=B, method="GET", target=target, body=b"", status=429, response=_error("rate_limited"))
    s.add("outbound", peer=B, method="GET", target=target, body=b"", status=200, response=page)
    s.add("descriptor", server=B, body=descriptor_bytes(s.b))
    s.add("backfill_end", room_id=GROUP, peer=B, stored=4, reached_start=True, error=None)
    # Recorded before: the pull ended at the refusal. Today's core asks again,
    # and the recording holds no answer to that.
    old = s.add("backfill_start", room_id=GROUP, peer=B, limit=1000, cursor=cursor)
    s.add("outbound", peer=B, method="GET", target=target, body=b"", status=429, response=_error("rate_limited"))
    s.add("backfill_end", room_id=GROUP, peer=B, stored=0, reached_start=False,
          error={"code": "rate_limited", "message": "x"})
    d = _by_index(replay_records(A, s.records))
    assert d[retried].replay.short() == "done 4 stored" and d[retried].same
    assert d[old].replay.verdict == "diverged" and "holds no answer" in d[old].replay.detail and not d[old].same
