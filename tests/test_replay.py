"""Record real federation traffic, replay it through a fresh core, compare.

The end-to-end part starts three real daemons (your-host.test records,
peer.test, third.test) with the testbed, runs the guide's DM flow, a group
room hosted on peer.test (an inbound invite, proposals, a backfill we pull)
and a handshake from third.test that your-host.test's policy refuses. The
replay must reproduce every live decision; a what-if policy changes exactly
the decisions it should. The synthetic part builds recordings in memory from
fixed seeds (no sockets) for the paths live traffic rarely takes.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest

from scaiwave_federation.core import Policy, sign_request
from scaiwave_federation.core.replay import replay_records
from scaiwave_federation.core.wire import encode
from scaiwave_federation.shell.recorder import Recorder
from scaiwave_federation.shell.research.replay import load_policy, open_recording, render, replay, replay_main
from scaiwave_federation.shell.demo.testbed import Testbed, wait_until

from corehelpers import A, B, NOW, build_chain, descriptor_bytes, endpoint, make_node, tamper_envelope




class Live:
    """What the recorded run left behind."""

    def __init__(self, path: Path, tokens: list[str]) -> None:
        self.path = path
        self.tokens = tokens


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Live:
    root = tmp_path_factory.mktemp("replay")
    rec = root / "rec.cbor"
    tb = Testbed(root / "tb")
    a = tb.add("your-host.test", extra={"SCAIWAVE_RECORD": str(rec)})
    b = tb.add("peer.test")
    c = tb.add("third.test")
    try:
        for s in (a, b, c):
            s.start()
            s.cli("admin", "federation", "key", "generate", check=True)
        a.cli("admin", "federation", "policy", "set", "--mode", "invite_only", "--allow", b.server_name, check=True)
        b.cli("admin", "federation", "policy", "set", "--mode", "invite_only", "--allow", a.server_name, check=True)
        c.cli("admin", "federation", "policy", "set", "--mode", "open", check=True)
        a.cli("admin", "federation", "handshake", b.server_name, check=True)
        refused = c.cli("admin", "federation", "handshake", a.server_name)
        assert refused.returncode == 1 and "peer_not_allowed" in refused.stderr
        for s in (a, b):
            s.cli("admin", "tenant", "create", "acme", check=True)
        alice = a.cli_json("admin", "user", "create", "alice", "--tenant", "acme")
        bob = b.cli_json("admin", "user", "create", "bob", "--tenant", "acme")
        at, bt = alice["access_token"], bob["access_token"]
        # The guide's DM: hosted on your-host.test.
        status, dm = a.request("POST", "/v1/dms", {"to": bob["user_id"]}, token=at)
        assert status == 200, dm
        dm_id = dm["room_id"]
        assert b.request("POST", f"/v1/invites/{dm_id}/accept", token=bt)[0] == 200
        assert a.request("POST", f"/v1/rooms/{dm_id}/messages", {"body": "hi bob"}, token=at)[0] == 200
        assert b.request("POST", f"/v1/rooms/{dm_id}/messages", {"body": "hi alice"}, token=bt)[0] == 200
        # A restart appends to the recording: the key cache and replay window
        # it restores are recorded too, so the replay starts from the same state.
        a.stop()
        a.start()
        # A group room hosted on peer.test: an invite to us, our join and a message pushed to us.
        status, group = b.request("POST", "/v1/rooms", {"room_type": "group"}, token=bt)
        assert status == 200, group
        gid = group["room_id"]
        assert b.request("POST", f"/v1/rooms/{gid}/invite", {"user": alice["user_id"]}, token=bt)[0] == 200
        assert a.request("POST", f"/v1/invites/{gid}/accept", token=at)[0] == 200
        assert b.request("POST", f"/v1/rooms/{gid}/messages", {"body": "welcome"}, token=bt)[0] == 200
        wait_until(lambda: any(m["body"] == "welcome"
                               for m in a.request("GET", f"/v1/rooms/{gid}/messages", token=at)[1]["messages"]))
        wait_until(lambda: any(m["body"] == "hi bob"
                               for m in b.request("GET", f"/v1/rooms/{dm_id}/messages", token=bt)[1]["messages"]))
        # Backfills both ways: we pull the group room's start, peer.test pulls the DM's.
        a.cli("admin", "federation", "backfill", gid, "--from", b.server_name, check=True)
        b.cli("admin", "federation", "backfill", dm_id, "--from", a.server_name, check=True)
    finally:
        tb.stop()
    return Live(rec, [a.admin_token, b.admin_token, c.admin_token, at, bt])


def _cli_replay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scaiwave_federation.shell.cli", "replay", *args],
                          capture_output=True, timeout=120)


@pytest.mark.e2e
def test_replay_reproduces_every_live_decision(live):
    result = replay(live.path)
    assert result.differing == [], render(result)
    assert not result.notes and not result.what_if
    seen = {(d.kind, d.method, d.target.split("/")[4].split("?")[0], d.replay.short()) for d in result.decisions}
    assert ("handshake", "POST", "handshake", "peered") in seen
    assert ("inbound", "POST", "handshake", "refused peer_not_allowed") in seen
    assert ("inbound", "PUT", "invite", "accepted") in seen
    assert ("inbound", "PUT", "send", "accepted") in seen
    assert ("inbound", "GET", "rooms", "accepted") in seen
    pulls = [d for d in result.decisions if d.kind == "backfill"]
    assert len(pulls) == 1 and pulls[0].replay.verdict == "done" and pulls[0].replay.count >= 3
    assert all(d.comparable for d in result.decisions)
    recording = open_recording(live.path)
    assert any(r["kind"] == "descriptor" and r.get("cached") for r in recording.records)  # the restart
    text = render(result)
    assert "refused peer_not_allowed | live 403 refused peer_not_allowed" in text
    assert "mismatches: 0" in text


@pytest.mark.e2e
def test_two_replays_print_identical_bytes(live):
    first, second = _cli_replay(str(live.path)), _cli_replay(str(live.path))
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.decode() == render(replay(live.path))


@pytest.mark.e2e
def test_what_if_closed_policy_changes_the_decisions(live, tmp_path):
    policy = tmp_path / "closed.json"
    policy.write_text(json.dumps({"default_mode": "closed", "allowed_peers": [], "blocked_peers": []}))
    proc = _cli_replay(str(live.path), "--policy", str(policy))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert "CHANGED live=accepted replay=refused federation_closed" in out
    assert "CHANGED live=peered replay=refused federation_closed" in out
    result = replay(live.path, policy=load_policy(policy))
    assert result.what_if
    for d in result.decisions:
        # Every decision that got past policy live is now refused by it.
        if d.live.verdict != "refused" or d.live.code == "peer_not_allowed":
            assert not d.same and d.replay.code == "federation_closed", d
    assert len(result.differing) == len(result.decisions)


POLICY_CODES = ("peer_not_allowed", "peer_blocked", "federation_closed")


@pytest.mark.e2e
def test_what_if_clock_offset_refuses_with_clock_skew(live):
    result = replay(live.path, clock_offset="31d")
    inbound = [d for d in result.decisions if d.kind == "inbound"]
    # Policy admission of the claimed origin comes first; every request it
    # admitted is then refused for its time.
    assert inbound and all(d.replay.code == "clock_skew" for d in inbound if d.live.code not in POLICY_CODES)
    assert any(d.replay.code == "clock_skew" for d in inbound)
    assert all(d.replay.code == d.live.code for d in inbound if d.live.code in POLICY_CODES)


@pytest.mark.e2e
def test_truncated_recording_replays_up_to_the_last_complete_record(live, tmp_path):
    data = live.path.read_bytes()
    full = open_recording(live.path)
    full_result = replay(full)
    # Where each record ends in the file.
    stream = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(stream)
    decoder.decode()
    ends = [stream.tell()]
    while stream.tell() < len(data):
        decoder.decode()
        ends.append(stream.tell())
    assert len(ends) == len(full.records) + 1
    for kept in range(len(full.records)):
        cut = tmp_path / "cut.cbor"
        cut.write_bytes(data[: (ends[kept] + ends[kept + 1]) // 2])  # mid-record
        torn = open_recording(cut)
        assert torn.torn and torn.records == full.records[:kept]
        result = replay(torn)
        assert [d.index for d in result.decisions] == [d.index for d in full_result.decisions if d.index < kept]
        assert result.notes[-1].startswith("the file ends inside a record")
        # A cut only hides later answers; whatever was decided before it decides the same.
        assert all(d.same or not d.comparable or d.kind != "inbound" for d in result.decisions)
    assert replay_main(cut) in (0, 1)


@pytest.mark.e2e
def test_no_token_reaches_the_recording(live):
    data = live.path.read_bytes()
    for token in live.tokens:
        assert token.encode() not in data
    assert b"Bearer" not in data


# -- synthetic recordings (fixed seeds, no sockets) ------------------------------------------


def _synthetic(tmp_path: Path, *, tamper: bool = False) -> Path:
    """your-host.test receives one transaction of 3 chained events from peer.test (seed 2)."""
    a, b = make_node(A, 1, allowed=[B]), make_node(B, 2, allowed=[A])
    room = f"!grp:{B}"
    chain = build_chain(b.keyring.current, room, 3)
    envelopes = [e.envelope for e in chain]
    if tamper:
        envelopes[1] = tamper_envelope(chain[1])
    body = encode({"events": envelopes})
    target = "/_scaiwave/federation/v1/send/t1"
    auth = sign_request(b.keyring.current, origin=B, destination=A, method="PUT", target=target, body=body, now=NOW)
    results = [{"ok": True}, {"error": {"code": "bad_signature", "message": "x"}} if tamper else {"ok": True},
               # the third no longer links once the second is refused
               {"error": {"code": "chain_broken", "message": "x"}} if tamper else {"ok": True}]
    path = tmp_path / "syn.cbor"
    rec = Recorder.open(path, A, now=NOW)
    rec.record("policy", NOW, policy=a.policy.as_dict())
    rec.record("own_keys", NOW, public=a.descriptor(endpoint(A)))
    rec.record("descriptor", NOW, server=B, body=descriptor_bytes(b))
    rec.record("inbound", NOW + 5, received_at=NOW + 1, method="PUT", target=target, authorization=auth, body=body,
               context={"peered": True, "heads": {room: {"known": True, "host": B, "head": None}}},
               status=200, response=encode({"results": results, "events": []}))
    rec.record("inbound", NOW + 6, received_at=NOW + 2, method="PUT", target=target, authorization=auth, body=body,
               context={"peered": True}, status=409,
               response=encode({"error": {"code": "replayed_request", "message": "x"}}))
    rec.record("inbound", NOW + 7, received_at=NOW + 3, method="GET", target="/nowhere", authorization=None,
               body=b"", context={}, status=404, response=encode({"error": {"code": "not_found", "message": "x"}}))
    rec.record("outbound", NOW + 8, peer=B, method="PUT", target=target, body=body, status=200, response=b"")
    rec.record("inbound", NOW + 9, method="PUT")  # malformed: no target
    rec.close()
    return path


def test_synthetic_transaction_replays_per_event(tmp_path):
    result = replay(_synthetic(tmp_path, tamper=True))
    assert result.differing == [], render(result)
    send, again, nowhere = result.decisions
    assert send.replay.events == ("ok", "bad_signature", "chain_broken")
    assert send.replay.detail == "1 event would be stored"
    assert again.replay.code == "replayed_request"
    assert nowhere.replay.code == "not_found" and nowhere.peer == "?"
    assert result.skipped == {"outbound": 1}
    assert result.notes == ["#7 inbound: skipped, malformed record (inbound record without a valid 'target')"]


def test_synthetic_mismatch_is_flagged(tmp_path):
    # The recording claims the tampered event was accepted: the replay disagrees.
    path = _synthetic(tmp_path, tamper=True)
    rec = open_recording(path)
    first = rec.records[3]
    first["response"] = encode({"results": [{"ok": True}] * 3, "events": []})
    result = replay_records(rec.server_name, rec.records)
    assert [d.index for d in result.differing] == [3]
    assert "MISMATCH live=accepted replay=accepted [ok, bad_signature, chain_broken]" in render(result)


def test_policy_files_and_exit_codes(tmp_path, capsys):
    toml = tmp_path / "p.toml"
    toml.write_text('default_mode = "open"\nblocked_peers = ["peer.test:8449"]\n')
    assert load_policy(toml) == Policy("open", frozenset(), frozenset({B}))
    blocked = replay(_synthetic(tmp_path), policy=toml)
    assert blocked.decisions[0].replay.code == "peer_blocked"
    bad = tmp_path / "bad.json"
    bad.write_text('{"default_mode": "sometimes"}')
    assert replay_main(_synthetic(tmp_path), policy_file=bad) == 2
    assert replay_main(_synthetic(tmp_path), clock_offset="soon") == 2
    assert replay_main(tmp_path / "missing.cbor") == 2
    (tmp_path / "junk.cbor").write_bytes(b"\x01\x02")
    assert replay_main(tmp_path / "junk.cbor") == 2
    err = capsys.readouterr().err
    assert "--policy" in err and "--clock-offset" in err and "not a scaiwave recording" in err


def test_replay_is_pure_and_repeatable(tmp_path):
    rec = open_recording(_synthetic(tmp_path))
    one = render(replay_records(rec.server_name, rec.records))
    two = render(replay_records(rec.server_name, rec.records))
    assert one == two and "mismatches: 0" in one
    # Without our recorded public keys the replay still decides (the substitute key stands in).
    without = [r for r in rec.records if r["kind"] != "own_keys"]
    assert replay_records(rec.server_name, without).differing == []


def test_handshakes_we_started_replay_from_their_recorded_answers():
    policy = {"default_mode": "invite_only", "allowed_peers": [], "blocked_peers": []}
    records = [
        {"kind": "policy", "now": NOW, "policy": policy},
        # Refused by our own policy at start: nothing was fetched.
        {"kind": "handshake_start", "now": NOW, "peer": B, "nonce": b"n" * 16},
        {"kind": "handshake_end", "now": NOW, "peer": B, "error": {"code": "peer_not_allowed", "message": "x"}},
        {"kind": "policy", "now": NOW + 1, "policy": {**policy, "allowed_peers": [B]}},
        # Allowed, but the descriptor fetch failed.
        {"kind": "handshake_start", "now": NOW + 2, "peer": B, "nonce": b"m" * 16},
        {"kind": "descriptor", "now": NOW + 3, "server": B, "error": {"code": "tls_failure", "message": "x"}},
        {"kind": "handshake_end", "now": NOW + 3, "peer": B, "error": {"code": "tls_failure", "message": "x"}},
    ]
    result = replay_records(A, records)
    assert [(d.kind, d.replay.short()) for d in result.decisions] == [
        ("handshake", "refused peer_not_allowed"), ("handshake", "refused tls_failure")]
    assert result.differing == [] and result.skipped == {}
    # What-if open: the first handshake would have fetched a descriptor the recording does not hold.
    opened = replay_records(A, records, policy=Policy("open"))
    first, second = opened.decisions
    assert first.replay.verdict == "diverged" and not first.same
    assert second.replay.short() == "refused tls_failure" and second.same
