"""Two daemons in this process, over real sockets and real TLS (one trustme CA,
names kept in the TLS checks by SCAIWAVE_RESOLVE): the guide walked through the
admin and user APIs, and what federation does when something goes wrong on
the way: refusals of the moment retried, a lost peering restored, missed
events caught up.
"""

from __future__ import annotations

from pathlib import Path

import cbor2
import httpx
import pytest
import trio
import trustme

from shellhelpers import Remote, error_code, make_env, peered_dm, trusting, two_daemons, wait_for
from scaiwave_federation.shell.config import load_config
from scaiwave_federation.shell.runtime.daemon import serve
from scaiwave_federation.shell.demo.testbed import free_port


async def test_two_daemons_walk_the_guide(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    authority, ca_path = ca
    port_a, port_b = free_port(), free_port()
    resolve = f"your-host.test:{port_a}:127.0.0.1,peer.test:{port_b}:127.0.0.1"
    config_a = load_config(make_env(tmp_path / "a", ca_path, authority, "your-host.test", port_a, resolve))
    config_b = load_config(make_env(tmp_path / "b", ca_path, authority, "peer.test", port_b, resolve))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, httpx.AsyncClient(verify=trusting(authority),
                                                                     trust_env=False, timeout=10) as http:
            assert await nursery.start(serve, config_a) == port_a
            assert await nursery.start(serve, config_b) == port_b
            a, b = Remote(http, "your-host.test", port_a), Remote(http, "peer.test", port_b)
            await _walk_the_guide(a, b)
            start = trio.current_time()
            nursery.cancel_scope.cancel()
        # Graceful shutdown returned promptly (no request in flight: no grace to wait out).
        assert trio.current_time() - start < 3
    # The listeners are gone.
    for port in (port_a, port_b):
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)


async def _walk_the_guide(a: Remote, b: Remote) -> None:
    A, B = a.server_name, b.server_name
    # Step 1: keys.
    for server in (a, b):
        assert (await server.request("GET", "/.well-known/scaiwave"))[1]["public_key"] == ""
        status, key = await server.admin("POST", "/v1/admin/federation/key/generate")
        assert status == 200 and key["key_id"]
    # Step 2: each sees the other's descriptor over verified TLS.
    status, desc = await a.admin("GET", f"/v1/admin/federation/descriptor?server={B}")
    assert status == 200 and desc["server_name"] == B and desc["public_key"]
    # Step 3: invite_only policies that allow each other.
    for server, other in ((a, B), (b, A)):
        policy = {"default_mode": "invite_only", "allowed_peers": [other], "blocked_peers": []}
        assert await server.admin("PUT", "/v1/admin/federation/policy", policy) == (200, policy)
    # Step 4: the handshake; both sides see an active peer.
    status, done = await a.admin("POST", f"/v1/admin/federation/peers/{B}/handshake")
    assert status == 200, done
    assert done["state"] == "active" and done["protocol_version"] == "scaiwave-fed/1"
    assert done["key_id"] == (await b.request("GET", "/.well-known/scaiwave"))[1]["key_id"]
    peer_a_on_b = await b.peer(A)
    assert peer_a_on_b["state"] == "active" and peer_a_on_b["last_seen"]
    # Step 5: a federated DM.
    for server in (a, b):
        assert (await server.admin("POST", "/v1/admin/tenants", {"name": "acme"}))[0] == 200
    status, alice = await a.admin("POST", "/v1/admin/users", {"name": "alice", "tenant": "acme"})
    status, bob = await b.admin("POST", "/v1/admin/users", {"name": "bob", "tenant": "acme"})
    assert (alice["user_id"], bob["user_id"]) == (f"@alice:{A}", f"@bob:{B}")
    at, bt = alice["access_token"], bob["access_token"]
    status, dm = await a.request("POST", "/v1/dms", {"to": bob["user_id"]}, token=at)
    assert status == 200, dm
    room = dm["room_id"]
    assert room.endswith(f":{A}")
    notes = (await b.request("GET", "/v1/notifications", token=bt))[1]["notifications"]
    assert [(n["type"], n["room_id"], n["inviter"], n["room_type"]) for n in notes] == [
        ("invite", room, alice["user_id"], "dm")]
    assert (await b.request("POST", f"/v1/invites/{room}/accept", token=bt))[0] == 200
    assert (await b.request("GET", "/v1/notifications", token=bt))[1]["notifications"] == []

    async def history(server: Remote, token: str, count: int):
        status, body = await server.request("GET", f"/v1/rooms/{room}/messages", token=token)
        assert status == 200, body
        return body["messages"] if len(body["messages"]) == count else None

    # Each writes after seeing the last message, as people in a conversation do.
    assert (await a.request("POST", f"/v1/rooms/{room}/messages", {"body": "hello bob"}, token=at))[0] == 200
    await wait_for(lambda: history(b, bt, 1))
    status, posted = await b.request("POST", f"/v1/rooms/{room}/messages", {"body": "hello alice"}, token=bt)
    assert status == 200, posted
    assert (await a.request("POST", f"/v1/rooms/{room}/messages", {"body": "how are you?"}, token=at))[0] == 200
    hb = await wait_for(lambda: history(b, bt, 3))
    ha = await history(a, at, 3)
    assert [m["body"] for m in ha] == ["hello bob", "hello alice", "how are you?"]
    assert [m["sender"] for m in ha] == [alice["user_id"], bob["user_id"], alice["user_id"]]
    assert ha == hb

    # Monitoring: last_seen is set and recent, no error.
    peer_b = await a.peer(B)
    assert peer_b["state"] == "active" and peer_b["last_error"] is None
    assert peer_b["last_seen"] and peer_b["key_id"] == done["key_id"]
    seen = peer_b["last_seen"]

    # The peer closes federation: a new DM to bob is refused with its code.
    closed = {"default_mode": "closed", "allowed_peers": [A], "blocked_peers": []}
    assert (await b.admin("PUT", "/v1/admin/federation/policy", closed))[0] == 200
    status, body = await a.request("POST", "/v1/dms", {"to": bob["user_id"]}, token=at)
    assert status == 403 and error_code((status, body)) == "federation_closed"
    peer_b = await a.peer(B)
    assert peer_b["last_error"]["code"] == "federation_closed" and peer_b["last_seen"] >= seen
    # And bob has no new invite.
    assert (await b.request("GET", "/v1/notifications", token=bt))[1]["notifications"] == []


async def test_a_refusal_of_the_moment_is_retried_not_dropped(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    """The host rotates its key moments after the member server fetched its
    descriptor: the member cannot fetch again for a second (the refetch floor)
    and refuses the host's next transaction with ``unknown_key``. That refusal
    describes the moment, not the transaction, so the host's outbox keeps it
    and retries after its backoff, and the message arrives. (It used to be
    dropped: bob would never have seen it.)"""
    from scaiwave_federation.shell.recorder import read_recording

    recording = tmp_path / "a" / "recording.cbor"
    (tmp_path / "a").mkdir()
    async with two_daemons(tmp_path, ca, SCAIWAVE_RECORD=str(recording)) as (a, b):
        room, at, bt = await peered_dm(a, b)

        async def bob_sees(count: int):
            messages = (await b.request("GET", f"/v1/rooms/{room}/messages", token=bt))[1]["messages"]
            return messages if len(messages) == count else None

        assert (await a.request("POST", f"/v1/rooms/{room}/messages", {"body": "before"}, token=at))[0] == 200
        await wait_for(lambda: bob_sees(1))
        # The race: peer.test fetches your-host's descriptor, your-host rotates at once.
        assert (await b.admin("POST", f"/v1/admin/federation/foreign/{a.server_name}/refresh"))[0] == 200
        assert (await a.admin("POST", "/v1/admin/federation/key/rotate"))[0] == 200
        assert (await a.request("POST", f"/v1/rooms/{room}/messages", {"body": "after"}, token=at))[0] == 200
        seen = await wait_for(lambda: bob_sees(2))
        assert [m["body"] for m in seen] == ["before", "after"]
    _header, records, _torn = read_recording(recording)
    sends = [r for r in records if r["kind"] == "outbound" and "/send/" in r["target"]]
    attempts = [r.get("status") for r in sends if r["target"] == sends[-1]["target"]]
    assert attempts == [401, 200], f"the second message's transaction: {attempts} (401 unknown_key, then 200)"
    refused = cbor2.loads(next(r for r in sends if r.get("status") == 401)["response"])
    assert refused["error"]["code"] == "unknown_key"


async def test_a_users_write_refused_for_the_moment_is_tried_once_more(
        tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    """The same race on the other path: bob (on peer.test) writes into a room
    hosted on your-host right after peer.test rotated its key and your-host
    fetched the old descriptor. The host refuses the proposal for the moment;
    bob's server tries once more a little later, and bob's write succeeds."""
    from scaiwave_federation.shell.recorder import read_recording

    recording = tmp_path / "b" / "recording.cbor"
    (tmp_path / "b").mkdir()
    async with two_daemons(tmp_path, ca, env_b={"SCAIWAVE_RECORD": str(recording)}) as (a, b):
        room, at, bt = await peered_dm(a, b)
        assert (await a.admin("POST", f"/v1/admin/federation/foreign/{b.server_name}/refresh"))[0] == 200
        assert (await b.admin("POST", "/v1/admin/federation/key/rotate"))[0] == 200
        status, posted = await b.request("POST", f"/v1/rooms/{room}/messages", {"body": "new key"}, token=bt)
        assert status == 200, posted
        history = (await a.request("GET", f"/v1/rooms/{room}/messages", token=at))[1]["messages"]
        assert [m["body"] for m in history] == ["new key"]
    _header, records, _torn = read_recording(recording)
    sends = [r for r in records if r["kind"] == "outbound" and "/send/" in r["target"]]
    assert [r.get("status") for r in sends[-2:]] == [401, 200]
    assert sends[-2]["target"] == sends[-1]["target"]  # the same transaction, tried again


async def test_a_peer_that_lost_the_peering_is_peered_again_and_gets_the_event(
        tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    """peer.test loses its record of the peering (say, restored from an old
    backup) and refuses your-host's transaction with ``not_peered``. The outbox
    runs the handshake again and retries: the message arrives, in order."""
    import sqlite3

    async with two_daemons(tmp_path, ca) as (a, b):
        room, at, bt = await peered_dm(a, b)
        db = sqlite3.connect(tmp_path / "b" / "data" / "scaiwave.db")
        with db:
            db.execute("UPDATE peers SET state = 'known' WHERE server_name = ?", (a.server_name,))
        db.close()
        assert (await b.peer(a.server_name))["state"] == "known"
        for text in ("one", "two"):
            assert (await a.request("POST", f"/v1/rooms/{room}/messages", {"body": text}, token=at))[0] == 200

        async def bob_sees_both():
            messages = (await b.request("GET", f"/v1/rooms/{room}/messages", token=bt))[1]["messages"]
            return [m["body"] for m in messages] if len(messages) == 2 else None

        assert await wait_for(bob_sees_both) == ["one", "two"]
        assert (await b.peer(a.server_name))["state"] == "active"


async def test_a_member_server_that_missed_events_catches_up_from_the_host(
        tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    """peer.test blocks your-host for a while: your-host's outbox drops the
    transaction peer.test refuses for good (``peer_blocked``). After the
    unblock, the next event arrives above a gap; peer.test pulls the missing
    events from the host (a catch-up: stored all at once, linked to its head)
    and bob sees the whole conversation, in order. A replay of peer.test's
    recording makes the same decisions, the catch-up included."""
    from scaiwave_federation.shell.research.replay import open_recording, replay

    recording = tmp_path / "b" / "recording.cbor"
    (tmp_path / "b").mkdir()
    async with two_daemons(tmp_path, ca, env_b={"SCAIWAVE_RECORD": str(recording)}) as (a, b):
        room, at, bt = await peered_dm(a, b)

        async def bob_sees(count: int):
            messages = (await b.request("GET", f"/v1/rooms/{room}/messages", token=bt))[1]["messages"]
            return [m["body"] for m in messages] if len(messages) == count else None

        async def post(text: str) -> None:
            assert (await a.request("POST", f"/v1/rooms/{room}/messages", {"body": text}, token=at))[0] == 200

        await post("one")
        await wait_for(lambda: bob_sees(1))
        allowing = (await b.admin("GET", "/v1/admin/federation/policy"))[1]
        blocking = {"default_mode": "invite_only", "allowed_peers": [], "blocked_peers": [a.server_name]}
        assert (await b.admin("PUT", "/v1/admin/federation/policy", blocking))[0] == 200
        await post("two")

        async def dropped():
            return (await a.peer(b.server_name))["last_error"] or None

        assert (await wait_for(dropped))["code"] == "peer_blocked"
        assert (await a.peer(b.server_name))["pending"] == 0  # a final refusal: dropped, not queued
        assert (await b.admin("PUT", "/v1/admin/federation/policy", allowing))[0] == 200
        await post("three")
        assert await wait_for(lambda: bob_sees(3)) == ["one", "two", "three"]
        assert (await b.request("GET", f"/v1/rooms/{room}/messages", token=bt))[1]["messages"] == \
            (await a.request("GET", f"/v1/rooms/{room}/messages", token=at))[1]["messages"]
        status, job = await b.admin("GET", "/v1/admin/federation/backfills/1")
        assert status == 200 and job["catch_up"] and job["state"] == "done" and job["peer"] == a.server_name
        assert job["stored"] == 2  # "two", "three"
    result = replay(open_recording(recording))
    catch_ups = [d for d in result.decisions if d.kind == "backfill"]
    outcomes = [(d.live.verdict, d.live.count, d.replay.verdict, d.replay.count) for d in catch_ups]
    assert outcomes == [("done", 2, "done", 2)]
    assert result.differing == [], [str(d) for d in result.differing]
