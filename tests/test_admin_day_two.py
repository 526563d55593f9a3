"""An admin's second day (issue 11), done as the admin does it: the ``scaiwave``
CLI against two real daemon processes over real TLS.

Policy edits (one entry at a time, repeated flags, what changed, whom it cuts
off, ``--dry-run``), peers (forget, pause and resume, what ``last_error``
records), users (list, deactivate, new token), atomic DMs, idempotent sends.
"""

from __future__ import annotations

import json
import time

import pytest

from scaiwave_federation.shell.demo.testbed import Testbed, wait_until


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """your-host.test (a) and peer.test (b), keys made, allowing each other,
    peered; alice on a and bob on b share a DM hosted on a."""
    bed = Testbed(tmp_path_factory.mktemp("day2"))
    a, b = bed.add("your-host.test"), bed.add("peer.test")
    a.start()
    b.start()
    try:
        for server, other in ((a, b), (b, a)):
            server.cli("admin", "federation", "key", "generate", check=True)
            server.cli("admin", "federation", "policy", "allow", other.server_name, check=True)
            server.cli("admin", "tenant", "create", "acme", check=True)
        a.cli("admin", "federation", "handshake", b.server_name, check=True)
        alice = a.cli_json("admin", "user", "create", "alice", "--tenant", "acme")
        bob = b.cli_json("admin", "user", "create", "bob", "--tenant", "acme")
        status, dm = a.request("POST", "/v1/dms", {"to": bob["user_id"]}, token=alice["access_token"])
        assert status == 200, dm
        wait_until(lambda: b.request("POST", f"/v1/invites/{dm['room_id']}/accept",
                                     token=bob["access_token"])[0] == 200)
        yield a, b, dm["room_id"], alice, bob
    finally:
        bed.stop()


def _policy(server) -> dict:
    return server.admin("GET", "/v1/admin/federation/policy")[1]


def test_policy_edits_change_one_entry_and_warn_whom_they_cut_off(pair) -> None:
    a, b, *_ = pair
    before = _policy(a)
    # `set` with repeated --allow accumulates; it would replace the list and cut b off: a dry run shows it.
    proc = a.cli("admin", "federation", "policy", "set", "--allow", "x.test", "--allow", "y.test", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "dry run, nothing changed:" in proc.stdout
    assert "allowed_peers: + x.test" in proc.stdout and "allowed_peers: + y.test" in proc.stdout
    assert f"allowed_peers: - {b.server_name}" in proc.stdout
    assert f"would cut off the active peer {b.server_name} (peer_not_allowed" in proc.stderr
    assert _policy(a) == before
    data = json.loads(a.cli("admin", "federation", "policy", "set", "--allow", "x.test", "--allow", "y.test",
                            "--dry-run", "--json").stdout)
    assert data["policy"]["allowed_peers"] == ["x.test", "y.test"] and data["dry_run"] is True
    # One entry at a time, in any spelling; b stays allowed, nobody is cut off.
    proc = a.cli("admin", "federation", "policy", "allow", "X.Test:443", "y.test")
    assert proc.returncode == 0 and "allowed_peers: + x.test" in proc.stdout and "warning" not in proc.stderr
    assert _policy(a)["allowed_peers"] == sorted([b.server_name, "x.test", "y.test"])
    proc = a.cli("admin", "federation", "policy", "disallow", "x.test")
    assert "allowed_peers: - x.test" in proc.stdout
    proc = a.cli("admin", "federation", "policy", "unblock", "never.test")
    assert proc.returncode == 0 and proc.stdout.startswith("unchanged:")
    # Blocking an active peer: the dry run warns and changes nothing; for real it warns and blocks.
    proc = a.cli("admin", "federation", "policy", "block", b.server_name, "--dry-run")
    assert f"would cut off the active peer {b.server_name} (peer_blocked" in proc.stderr
    assert _policy(a)["blocked_peers"] == []
    proc = a.cli("admin", "federation", "policy", "block", b.server_name)
    assert f"warning: this cut off the active peer {b.server_name}" in proc.stderr
    assert _policy(a)["blocked_peers"] == [b.server_name]
    a.cli("admin", "federation", "policy", "unblock", b.server_name, check=True)
    a.cli("admin", "federation", "policy", "disallow", "y.test", check=True)
    assert _policy(a) == before
    # A name that is no server name is refused, and nothing changes.
    proc = a.cli("admin", "federation", "policy", "allow", "https://x.test")
    assert proc.returncode == 1 and proc.stderr.startswith("error: bad_request:") and "Traceback" not in proc.stderr
    assert _policy(a) == before


def _peer(server, name):
    peers = server.admin("GET", "/v1/admin/federation/peers")[1]["peers"]
    return next((p for p in peers if p["server_name"] == name), None)


def test_typos_leave_nothing_forget_cannot_remove(pair) -> None:
    a, b, *_ = pair
    proc = a.cli("admin", "federation", "handshake", "peer.tset")
    assert proc.returncode == 1
    proc = a.cli("admin", "federation", "refresh", "@bob:peer.tset")
    assert proc.returncode == 1
    if _peer(a, "peer.tset") is not None:
        proc = a.cli("admin", "federation", "peers", "forget", "peer.tset")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("forgot peer.tset")
    assert _peer(a, "peer.tset") is None
    proc = a.cli("admin", "federation", "peers", "forget", "nobody.test")
    assert proc.returncode == 1 and proc.stderr.startswith("error: not_found: no peer 'nobody.test'")
    # Pausing a name we never dealt with is refused too, and makes no row.
    assert a.cli("admin", "federation", "peers", "pause", "nobody.test").returncode == 1
    assert _peer(a, "nobody.test") is None


def test_our_own_mistaken_requests_do_not_mark_a_healthy_peer(pair) -> None:
    a, b, room, *_ = pair
    # A backfill (from b) of a room id that does not exist on a: our mistake, not a's.
    proc = b.cli("admin", "federation", "backfill", f"!nope:{a.server_name}", "--quiet")
    assert proc.returncode == 1 and proc.stderr.startswith("error: not_found:"), proc.stderr
    assert _peer(b, a.server_name)["last_error"] is None
    # A backfill of the real room works, and says what it stored.
    proc = b.cli("admin", "federation", "backfill", room, "--quiet")
    assert proc.returncode == 0 and proc.stdout.startswith("backfill done:"), proc.stderr
    assert proc.stderr == ""


def _bodies(server, room, token) -> list[str]:
    status, body = server.request("GET", f"/v1/rooms/{room}/messages", token=token)
    assert status == 200, body
    return [m["body"] for m in body["messages"]]


def test_a_paused_peer_keeps_its_queue_and_gets_it_in_order_on_resume(pair) -> None:
    a, b, room, alice, bob = pair
    proc = a.cli("admin", "federation", "peers", "pause", b.server_name)
    assert proc.returncode == 0 and "paused: its queue is kept" in proc.stdout
    sent = [f"paused {i}" for i in range(3)]
    for text in sent:
        assert a.request("POST", f"/v1/rooms/{room}/messages", {"body": text}, token=alice["access_token"])[0] == 200
    time.sleep(1.5)  # several outbox passes
    assert not set(sent) & set(_bodies(b, room, bob["access_token"]))
    assert _peer(a, b.server_name)["pending"] == 3 and _peer(a, b.server_name)["paused"] is True
    assert "paused" in a.cli("admin", "federation", "peers").stdout
    # Forgetting a peer with a queue is refused unless forced (then the queue is dropped).
    proc = a.cli("admin", "federation", "peers", "forget", b.server_name)
    assert proc.returncode == 1 and proc.stderr.startswith("error: conflict: 3 transactions are queued")
    proc = a.cli("admin", "federation", "peers", "resume", b.server_name)
    assert proc.returncode == 0 and "delivering" in proc.stdout
    wait_until(lambda: all(t in _bodies(b, room, bob["access_token"]) for t in sent))
    got = _bodies(b, room, bob["access_token"])
    assert [t for t in got if t in sent] == sent
    assert _peer(a, b.server_name)["pending"] == 0


def test_users_list_deactivate_and_new_token(pair) -> None:
    a, b, room, alice, bob = pair
    carol = a.cli_json("admin", "user", "create", "carol", "--tenant", "acme")
    token = carol["access_token"]
    assert a.request("GET", "/v1/rooms", token=token)[0] == 200
    proc = a.cli("admin", "user", "token", "carol")
    assert proc.returncode == 0 and "the old token no longer works" in proc.stdout
    new = proc.stdout.split("access_token: ")[1].split()[0]
    assert a.request("GET", "/v1/rooms", token=token)[0] == 401
    assert a.request("GET", "/v1/rooms", token=new)[0] == 200
    # carol joins a group; deactivated, her token stops at once and her membership stays.
    group = a.request("POST", "/v1/rooms", {"room_type": "group"}, token=alice["access_token"])[1]["room_id"]
    a.request("POST", f"/v1/rooms/{group}/invite", {"user": carol["user_id"]}, token=alice["access_token"])
    assert a.request("POST", f"/v1/invites/{group}/accept", token=new)[0] == 200
    proc = a.cli("admin", "user", "deactivate", carol["user_id"])
    assert proc.returncode == 0 and "deactivated" in proc.stdout
    assert a.request("GET", "/v1/rooms", token=new)[0] == 401
    listing = a.cli("admin", "user", "list").stdout.splitlines()
    assert listing[0].split() == ["USER", "TENANT", "STATE"]
    assert [carol["user_id"], "acme", "deactivated"] in [line.split() for line in listing]
    assert a.cli("admin", "user", "token", "carol").stderr.startswith("error: conflict:")
    assert a.cli("admin", "user", "deactivate", "nobody").stderr.startswith("error: not_found:")
    # Nobody can invite her any more, here or from a peer; her membership in the group stays.
    status, body = a.request("POST", "/v1/dms", {"to": carol["user_id"]}, token=alice["access_token"])
    assert status == 404 and body["error"]["code"] == "not_found", body
    status, body = b.request("POST", "/v1/dms", {"to": carol["user_id"]}, token=bob["access_token"])
    assert status == 404 and body["error"]["code"] == "not_found", body
    assert a.request("POST", f"/v1/rooms/{group}/messages", {"body": "still here"}, token=alice["access_token"])[0] \
        == 200


def test_a_refused_dm_leaves_nothing_behind(pair) -> None:
    a, b, room, alice, bob = pair
    token = alice["access_token"]
    rooms_before = a.request("GET", "/v1/rooms", token=token)[1]["rooms"]
    # An unknown remote user: b refuses the invite.
    status, body = a.request("POST", "/v1/dms", {"to": f"@nobody:{b.server_name}"}, token=token)
    assert status == 404 and body["error"]["code"] == "not_found", body
    # A peer that refuses a's invites (a is blocked there).
    b.cli("admin", "federation", "policy", "block", a.server_name, check=True)
    try:
        status, body = a.request("POST", "/v1/dms", {"to": bob["user_id"]}, token=token)
        assert status >= 400, body
    finally:
        b.cli("admin", "federation", "policy", "unblock", a.server_name, check=True)
    assert a.request("GET", "/v1/rooms", token=token)[1]["rooms"] == rooms_before


def test_a_retried_send_is_stored_once(pair) -> None:
    a, b, room, alice, bob = pair
    for server, user in ((a, alice), (b, bob)):  # hosted here, and a proposal to the host
        path = f"/v1/rooms/{room}/send/retry-{server.name}"
        first = server.request("PUT", path, {"body": f"once from {server.name}"}, token=user["access_token"])
        again = server.request("PUT", path, {"body": f"once from {server.name}"}, token=user["access_token"])
        assert first[0] == 200 and again == first
        # The same txn id for another text is a conflict; another user's same txn id is their own.
        assert server.request("PUT", path, {"body": "other"}, token=user["access_token"])[1]["error"]["code"] \
            == "conflict"
        wait_until(lambda name=server.name: f"once from {name}" in _bodies(a, room, alice["access_token"]))
        assert _bodies(a, room, alice["access_token"]).count(f"once from {server.name}") == 1
    # POST .../messages still works (and is not idempotent: each is a message).
    assert a.request("POST", f"/v1/rooms/{room}/messages", {"body": "plain"}, token=alice["access_token"])[0] == 200


def test_four_backfill_mistakes_get_four_messages(pair) -> None:
    a, b, room, *_ = pair
    group = a.request("POST", "/v1/rooms", {"room_type": "group"}, token=pair[3]["access_token"])[1]["room_id"]
    mistakes = [
        (b, [f"!nope:{a.server_name}"], "error: not_found: peer refused:"),     # no such room on its host
        (b, [group], "error: not_member: peer refused:"),                      # a room b has nobody in
        (a, [room], "error: bad_request: the peer to pull from is this server"),  # a room hosted here
        (b, [room, "--limit", "0"], "error: bad_request: limit: must be 1 to"),  # out of range
    ]
    messages = set()
    for server, args, start in mistakes:
        proc = server.cli("admin", "federation", "backfill", *args, "--quiet")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith(start), line
        messages.add(line.split(": ", 2)[2])
    assert len(messages) == 4
    assert _peer(b, a.server_name)["last_error"] is None


def test_backfill_progress_on_a_terminal_and_off_it(pair) -> None:
    import os
    import pty
    import subprocess
    import sys

    a, b, _, alice, bob = pair
    # A group with history from before bob joined: b has only the top of it.
    room = a.request("POST", "/v1/rooms", {"room_type": "group"}, token=alice["access_token"])[1]["room_id"]
    for i in range(150):
        a.request("POST", f"/v1/rooms/{room}/messages", {"body": f"history {i}"}, token=alice["access_token"])
    a.request("POST", f"/v1/rooms/{room}/invite", {"user": bob["user_id"]}, token=alice["access_token"])
    wait_until(lambda: b.request("POST", f"/v1/invites/{room}/accept", token=bob["access_token"])[0] == 200)
    leader, follower = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "scaiwave_federation.shell.cli", "admin", "federation", "backfill",
                           room], env={**os.environ, **b.env}, stdout=subprocess.PIPE, stderr=follower,
                          timeout=120)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert proc.returncode == 0, shown
    text = shown.decode()
    # The bar's total is the work (the room's events), not --limit; with a rate.
    assert f"backfill {room} from {a.server_name}: [" in text, text
    assert "/1000 events" not in text and "/s" in text
    stored = int(proc.stdout.decode().split("verified events stored")[0].split()[-1])
    assert stored > 150 and f"{stored}/{stored} events" in text, (stored, text)
    # Off a terminal: the result only, no progress noise.
    off = b.cli("admin", "federation", "backfill", room)
    assert off.returncode == 0 and len(off.stderr.splitlines()) <= 2


async def test_concurrent_policy_edits_lose_nothing(daemon) -> None:
    import trio

    hosts = [f"h{i}.test" for i in range(12)]

    async def allow(host: str) -> None:
        status, body = await daemon.admin("POST", "/v1/admin/federation/policy/allow", {"peers": [host]})
        assert status == 200, body

    async with trio.open_nursery() as nursery:
        for host in hosts:
            nursery.start_soon(allow, host)
    status, policy = await daemon.admin("GET", "/v1/admin/federation/policy")
    assert policy["allowed_peers"] == sorted(hosts)
