"""The admin guide, end to end, between real daemons.

Two ``scaiwave serve`` processes (your-host.test, peer.test) on loopback, each
with its own data directory and a certificate from one trustme CA; names stay
in the TLS checks through SCAIWAVE_RESOLVE. A third server (outsider.test,
same CA) is not in anyone's allowed_peers, and a stranger (stranger.test) has a
certificate from another CA. Everything is driven through the CLI and HTTP,
as admins and users would. The tests run in file order and share the world:
each is one step of federation-guide.txt.
"""

from __future__ import annotations

import json
import os
import sqlite3
import ssl
import time
from pathlib import Path

import cbor2
import httpx
import pytest
import trustme

from scaiwave_federation.core import Event, SigningKey, decode_event, parse_descriptor, sign_request, verify_events
from scaiwave_federation.core.wire import encode
from scaiwave_federation.shell.demo.testbed import Testbed, wait_until

pytestmark = pytest.mark.e2e


class World:
    def __init__(self, root: Path) -> None:
        self.tb = Testbed(root)
        # Both record every federation exchange: the last test replays them.
        self.a = self.tb.add("your-host.test", extra={"SCAIWAVE_RECORD": str(root / "your-host.cbor")})
        self.b = self.tb.add("peer.test", extra={"SCAIWAVE_RECORD": str(root / "peer.cbor")})
        self.o = self.tb.add("outsider.test")
        self.s = self.tb.add("stranger.test", ca=trustme.CA())
        self.users: dict[str, dict] = {}
        self.rooms: dict[str, str] = {}


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    world = World(tmp_path_factory.mktemp("guide"))
    for server in (world.a, world.b, world.o, world.s):
        server.start()
    yield world
    world.tb.stop()


def _err(proc) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stderr.strip().splitlines()[-1]


def _code(status_body) -> str:
    status, body = status_body
    assert status >= 400, body
    return body["error"]["code"]


def _events(server, room_id: str) -> list[Event]:
    """Read the server's real SQLite file: every stored event of the room, by depth."""
    db = sqlite3.connect(server.root / "data" / "scaiwave.db")
    rows = db.execute("SELECT envelope FROM events WHERE room_id = ? ORDER BY depth", (room_id,)).fetchall()
    db.close()
    events = [decode_event(r[0]) for r in rows]
    assert all(isinstance(e, Event) for e in events)
    return events


def _chain_intact(events: list[Event]) -> None:
    for older, newer in zip(events, events[1:]):
        assert newer.depth == older.depth + 1
        assert newer.prev == older.event_id




def _peer(server, name: str) -> dict:
    peers = server.cli_json("admin", "federation", "peers")["peers"]
    return next(p for p in peers if p["server_name"] == name)


def test_step1_own_descriptor(w):
    desc = w.a.get("/.well-known/scaiwave")
    assert desc["server_name"] == w.a.server_name
    assert desc["public_key"] == "" and desc["key_id"] == ""
    assert desc["federation_endpoint"] == f"https://{w.a.server_name}/_scaiwave/federation/v1"
    # Without a key, federation refuses with the own-key-missing code.
    assert _err(w.a.cli("admin", "federation", "handshake", w.b.server_name)).startswith("error: own_key_missing")
    for server in (w.a, w.b, w.o):
        key = server.cli_json("admin", "federation", "key", "generate")
        assert key["key_id"].startswith("ed25519:")
    desc = w.a.get("/.well-known/scaiwave")
    assert desc["public_key"] and desc["signature"] and desc["protocol_versions"] == ["scaiwave-fed/1"]
    assert w.a.cli_json("admin", "federation", "key", "show")["public_key"] == desc["public_key"]


def test_step2_peer_descriptor(w):
    peer = w.a.cli_json("admin", "federation", "descriptor", "--server", w.b.server_name)
    assert peer["server_name"] == w.b.server_name and peer["public_key"]
    # A server whose certificate chains to another CA is refused with the TLS code.
    err = _err(w.a.cli("admin", "federation", "descriptor", "--server", w.s.server_name))
    assert err.startswith("error: tls_failure") and "certificate verify failed" in err


def test_steps3_4_policy_and_handshake(w):
    a, b = w.a.server_name, w.b.server_name
    pol = w.a.cli_json("admin", "federation", "policy", "set", "--mode", "invite_only", "--allow", b)
    assert pol["policy"] == {"default_mode": "invite_only", "allowed_peers": [b], "blocked_peers": []}
    w.b.cli_json("admin", "federation", "policy", "set", "--mode", "invite_only", "--allow", a)
    w.o.cli_json("admin", "federation", "policy", "set", "--mode", "open")
    done = w.a.cli_json("admin", "federation", "handshake", b)
    assert done["state"] == "active" and done["protocol_version"] == "scaiwave-fed/1"
    assert _peer(w.b, a)["state"] == "active"
    # A third server not in allowed_peers is refused with the not-allowed code.
    assert _err(w.o.cli("admin", "federation", "handshake", a)).startswith("error: peer_not_allowed")
    # closed refuses everyone.
    w.a.cli_json("admin", "federation", "policy", "set", "--mode", "closed")
    assert _err(w.b.cli("admin", "federation", "handshake", a)).startswith("error: federation_closed")
    w.a.cli_json("admin", "federation", "policy", "set", "--mode", "invite_only")
    assert w.a.cli_json("admin", "federation", "policy", "show")["allowed_peers"] == [b]


def test_step5_federated_dm(w):
    for server in (w.a, w.b):
        server.cli_json("admin", "tenant", "create", "acme")
    w.users["alice"] = w.a.cli_json("admin", "user", "create", "alice", "--tenant", "acme")
    w.users["bob"] = w.b.cli_json("admin", "user", "create", "bob", "--tenant", "acme")
    alice, bob = w.users["alice"]["access_token"], w.users["bob"]["access_token"]
    status, dm = w.a.request("POST", "/v1/dms", {"to": w.users["bob"]["user_id"]}, token=alice)
    assert status == 200, dm
    room = w.rooms["dm"] = dm["room_id"]
    notes = w.b.get("/v1/notifications", token=bob)["notifications"]
    assert [(n["type"], n["room_id"], n["inviter"]) for n in notes] == [("invite", room, w.users["alice"]["user_id"])]
    assert w.b.request("POST", f"/v1/invites/{room}/accept", token=bob)[0] == 200
    assert w.b.get("/v1/notifications", token=bob)["notifications"] == []
    assert w.a.request("POST", f"/v1/rooms/{room}/messages", {"body": "hello bob"}, token=alice)[0] == 200
    assert w.b.request("POST", f"/v1/rooms/{room}/messages", {"body": "hello alice"}, token=bob)[0] == 200
    assert w.a.request("POST", f"/v1/rooms/{room}/messages", {"body": "how are you?"}, token=alice)[0] == 200

    def both():
        ha = w.a.get(f"/v1/rooms/{room}/messages", token=alice)["messages"]
        hb = w.b.get(f"/v1/rooms/{room}/messages", token=bob)["messages"]
        return (ha, hb) if len(hb) == 3 else None

    ha, hb = wait_until(both)
    assert [m["body"] for m in ha] == ["hello bob", "hello alice", "how are you?"]
    assert ha == hb
    # Both post at once, again and again: both copies converge on the host's order.
    from concurrent.futures import ThreadPoolExecutor

    def post(server, token, text):
        return server.request("POST", f"/v1/rooms/{room}/messages", {"body": text}, token=token)[0]

    with ThreadPoolExecutor(2) as pool:
        for i in range(5):
            done = [pool.submit(post, w.a, alice, f"a{i}"), pool.submit(post, w.b, bob, f"b{i}")]
            assert [f.result() for f in done] == [200, 200]
    ha, hb = wait_until(lambda: (lambda x, y: (x, y) if x == y and len(x) == 13 else None)(
        w.a.get(f"/v1/rooms/{room}/messages", token=alice)["messages"],
        w.b.get(f"/v1/rooms/{room}/messages", token=bob)["messages"]))
    assert sorted(m["body"] for m in ha[3:]) == sorted([f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)])
    # An invite to a server that refuses comes back with the refusing code.
    status, body = w.a.request("POST", "/v1/dms", {"to": f"@x:{w.o.server_name}"}, token=alice)
    assert body["error"]["code"] == "peer_not_allowed"


def test_step6_backfill(w):
    bob, alice = w.users["bob"]["access_token"], w.users["alice"]["access_token"]
    status, room = w.b.request("POST", "/v1/rooms", {"room_type": "group"}, token=bob)
    room = w.rooms["group"] = room["room_id"]
    for i in range(1200):
        assert w.b.request("POST", f"/v1/rooms/{room}/messages", {"body": f"history {i}"}, token=bob)[0] == 200
    assert w.b.request("POST", f"/v1/rooms/{room}/invite", {"user": w.users["alice"]["user_id"]}, token=bob)[0] == 200
    assert w.a.request("POST", f"/v1/invites/{room}/accept", token=alice)[0] == 200
    joined = _events(w.a, room)
    assert len(joined) == 1 and joined[0].type == "m.member"
    proc = w.a.cli("admin", "federation", "backfill", room, "--from", w.b.server_name, "--limit", "1000", "--json")
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout)
    assert job["state"] == "done" and job["stored"] == 1000
    events = _events(w.a, room)
    assert len(events) == 1001
    _chain_intact(events)
    assert events[-1].event_id == joined[0].event_id
    # A second backfill stores nothing twice: only the 203 older events remain.
    job = w.a.cli_json("admin", "federation", "backfill", room, "--limit", "1000")
    assert job["state"] == "done" and job["stored"] == 203 and job["reached_start"]
    events = _events(w.a, room)
    assert [e.depth for e in events] == list(range(1, 1205))
    _chain_intact(events)


def _with_tests_on_path() -> str:
    """PYTHONPATH with tests/ first: the fault lives in the tests, never in the package."""
    here = str(Path(__file__).resolve().parent)
    return os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])


def test_step6_tampered_event_refused(w):
    bob, alice = w.users["bob"]["access_token"], w.users["alice"]["access_token"]
    status, room = w.b.request("POST", "/v1/rooms", {"room_type": "group"}, token=bob)
    room = w.rooms["tamper"] = room["room_id"]
    for i in range(40):
        w.b.request("POST", f"/v1/rooms/{room}/messages", {"body": f"m{i}"}, token=bob)
    w.b.request("POST", f"/v1/rooms/{room}/invite", {"user": w.users["alice"]["user_id"]}, token=bob)
    assert w.a.request("POST", f"/v1/invites/{room}/accept", token=alice)[0] == 200
    # peer.test turns deliberately broken: it serves the event at depth 20 tampered.
    w.b.stop()
    w.b.start(extra_env={"TAMPERED_EVENT": f"{room}@20", "PYTHONPATH": _with_tests_on_path()},
              module="faulty_daemon")
    proc = w.a.cli("admin", "federation", "backfill", room, "--json")
    assert _err(proc).startswith("error: bad_signature")
    events = _events(w.a, room)
    # The good ones above the tampered event are stored, nothing below it (no hole).
    assert [e.depth for e in events] == list(range(21, 45))
    _chain_intact(events)
    # Healthy again: the pull resumes where it stopped and stores nothing twice.
    w.b.stop()
    w.b.start()
    job = w.a.cli_json("admin", "federation", "backfill", room)
    assert job["state"] == "done" and job["reached_start"]
    events = _events(w.a, room)
    assert [e.depth for e in events] == list(range(1, 45))
    _chain_intact(events)


def test_step7_monitor(w):
    alice = w.users["alice"]["access_token"]
    b = w.b.server_name
    peer = _peer(w.a, b)
    assert peer["state"] == "active" and peer["last_seen"] and peer["last_error"] is None
    w.b.stop()
    room = w.rooms["dm"]
    assert w.a.request("POST", f"/v1/rooms/{room}/messages", {"body": "are you there?"}, token=alice)[0] == 200
    failed = wait_until(lambda: _peer(w.a, b)["last_error"])
    # Queued while the peer is down, delivered later in order.
    assert w.a.request("POST", f"/v1/rooms/{room}/messages", {"body": "hello?"}, token=alice)[0] == 200
    assert failed["code"] == "peer_unreachable" and failed["at"]
    w.b.start()
    w.a.cli_json("admin", "federation", "retry", b)
    wait_until(lambda: _peer(w.a, b)["last_error"] is None)
    bob = w.users["bob"]["access_token"]
    wait_until(lambda: [m["body"] for m in w.b.get(f"/v1/rooms/{room}/messages", token=bob)["messages"]][-2:]
          == ["are you there?", "hello?"])
    assert w.b.get(f"/v1/rooms/{room}/messages", token=bob)["messages"] == \
        w.a.get(f"/v1/rooms/{room}/messages", token=alice)["messages"]
    refreshed = w.a.cli_json("admin", "federation", "refresh", w.users["bob"]["user_id"])
    assert refreshed["server_name"] == b and refreshed["key_id"] == _peer(w.a, b)["key_id"]


def test_step8_rotation(w):
    b = w.b.server_name
    db = sqlite3.connect(w.b.root / "data" / "scaiwave.db")
    seed, created = db.execute("SELECT seed, created_at FROM keys WHERE expired_at IS NULL").fetchone()
    db.close()
    old_key = SigningKey.from_seed(seed, created)
    rotated = w.b.cli_json("admin", "federation", "key", "rotate")
    assert rotated["key_id"] != old_key.key_id
    assert [o["key_id"] for o in rotated["old_keys"]] == [old_key.key_id]
    desc = w.b.get("/.well-known/scaiwave")
    assert desc["key_id"] == rotated["key_id"] and desc["old_keys"][0]["key_id"] == old_key.key_id
    # New traffic under the new key verifies on your-host without a manual refresh.
    # Step 7's refresh fetched peer.test's descriptor moments ago, and a host
    # fetches again at most once a second: bob's first try is refused for the
    # moment (unknown_key), and peer.test tries once more a little later.
    bob, alice = w.users["bob"]["access_token"], w.users["alice"]["access_token"]
    room = w.rooms["dm"]
    status, body = w.b.request("POST", f"/v1/rooms/{room}/messages", {"body": "new key here"}, token=bob)
    assert status == 200, body
    assert w.a.get(f"/v1/rooms/{room}/messages", token=alice)["messages"][-1]["body"] == "new key here"
    assert _peer(w.a, b)["key_id"] == rotated["key_id"]
    # 31 days later (simulated clock on your-host, SCAIWAVE_CLOCK_OFFSET):
    # live traffic under the old key is refused as expired, under the new key
    # it passes authentication; history signed under the old key still verifies.
    db = sqlite3.connect(w.b.root / "data" / "scaiwave.db")
    seed, created = db.execute("SELECT seed, created_at FROM keys WHERE expired_at IS NULL").fetchone()
    db.close()
    new_key = SigningKey.from_seed(seed, created)
    w.a.stop()
    w.a.start(extra_env={"SCAIWAVE_CLOCK_OFFSET": "31d"})
    try:
        now = int(time.time() * 1000) + 31 * 86_400_000
        target = "/_scaiwave/federation/v1/send/key-age-probe"
        body = encode({"events": []})
        ctx = ssl.create_default_context(cafile=str(w.tb.ca_path))
        for key, status, code in ((old_key, 401, "expired_key"), (new_key, 400, "malformed")):
            auth = sign_request(key, origin=b, destination=w.a.server_name, method="PUT", target=target,
                                body=body, now=now)
            with httpx.Client(verify=ctx, trust_env=False) as c:
                resp = c.put(f"https://127.0.0.1:{w.a.port}{target}", content=body,
                             headers={"host": w.a.server_name, "authorization": auth},
                             extensions={"sni_hostname": w.a.name})
            assert (resp.status_code, cbor2.loads(resp.content)["error"]["code"]) == (status, code)
        keys = {s.server_name: parse_descriptor(json.dumps(s.get("/.well-known/scaiwave")).encode(), s.server_name)[0]
                for s in (w.a, w.b)}
        history = [e.envelope for e in _events(w.a, w.rooms["group"]) if e.origin == b]
        results = verify_events(history, keys.get)
        assert [r for r in results if not isinstance(r, Event)] == []
        assert len(results) == 1204
        assert {r.key_id for r in results} == {old_key.key_id}
    finally:
        w.a.stop()
        w.a.start()


def test_what_cannot_be_federated(w):
    alice = w.users["alice"]["access_token"]
    bob_id = w.users["bob"]["user_id"]
    for room_type, code in (("incognito", "room_incognito"), ("bridge", "room_bridge"), ("sidekick", "room_sidekick")):
        status, room = w.a.request("POST", "/v1/rooms", {"room_type": room_type}, token=alice)
        assert status == 200
        assert _code(w.a.request("POST", f"/v1/rooms/{room['room_id']}/invite", {"user": bob_id}, token=alice)) == code
    w.a.cli_json("admin", "tenant", "create", "secretco", "--federation", "disabled")
    carol = w.a.cli_json("admin", "user", "create", "carol", "--tenant", "secretco")
    assert _code(w.a.request("POST", "/v1/dms", {"to": bob_id}, token=carol["access_token"])) == "tenant_federation_disabled"


def test_replay_of_the_walkthrough_matches_the_live_decisions(w):
    """scaiwave replay drives a fresh core with each recording: same decisions as live."""
    from scaiwave_federation.shell.research.replay import open_recording, replay

    for server, path in ((w.a, w.tb.root / "your-host.cbor"), (w.b, w.tb.root / "peer.cbor")):
        recording = open_recording(path)
        assert recording.server_name == server.server_name
        result = replay(recording)
        decisions = result.decisions
        # (Fewer since pages hold up to 500 events: the guide's pulls make fewer page requests.)
        assert len([d for d in decisions if d.comparable]) > 15, (len(decisions), len(recording), result.notes[:5])
        assert result.differing == [], [(d.index, d.target, d.replay, d.live) for d in result.differing]
        # The walkthrough's refusals are among them, with their codes.
        codes = {d.replay.code for d in decisions if d.replay.code}
        assert server is not w.a or {"peer_not_allowed", "federation_closed", "expired_key"} <= codes
    # Two replays print identical bytes.
    first = server.cli("replay", str(w.tb.root / "your-host.cbor")).stdout
    assert first and first == server.cli("replay", str(w.tb.root / "your-host.cbor")).stdout
