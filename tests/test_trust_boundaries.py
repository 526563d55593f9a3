"""Issue 9's holes, each tried as an attacker would against two real daemons
(in-process, real TLS on loopback), and refused with a clear code.

1. a local user who is not a member enters a room (invites themselves, posts, reads);
2. a non-member invites a remote user, and an *invited* (not joined) server
   reads the room's history;
3. a sealed room (a tenant with federation disabled) gains a member from
   another tenant or another server;
4. a blocked server gets in by spelling its name otherwise;
5. a host forges another server's user's words;
6. a stranger makes us work for it (descriptor fetches, peers rows,
   ``last_seen``), or makes us connect to loopback.

The rules themselves live in ``core.authz``, ``core.names`` and
``core.events``; ``tests/test_core_authz_stateful.py`` drives them without a
network.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import trio
import trustme

from scaiwave_federation.core import Head, SigningKey, chain_event, sign_request
from scaiwave_federation.core.handshake import HANDSHAKE_TARGET
from scaiwave_federation.core.rooms import encode_events_body
from scaiwave_federation.core.wire import decode, encode
from scaiwave_federation.shell.demo.testbed import free_port

from shellhelpers import FED, Remote, error_code, peer_up, peered_dm, two_daemons, wait_for


# -- helpers -------------------------------------------------------------------------------------


def signing_key(tmp_path: Path, which: str) -> SigningKey:
    """The daemon's own signing key, read from its database (to forge as that server would)."""
    db = sqlite3.connect(tmp_path / which / "data" / "scaiwave.db")
    seed, created_at = db.execute("SELECT seed, created_at FROM keys WHERE expired_at IS NULL").fetchone()
    db.close()
    return SigningKey.from_seed(seed, created_at)


async def raw(remote: Remote, method: str, target: str, body: bytes, authorization: str) -> tuple[int, dict]:
    """A hand-made federation request to ``remote``; the CBOR reply decoded."""
    resp = await remote.client.request(method, f"https://127.0.0.1:{remote.port}{target}", content=body,
                                       headers={"host": remote.server_name, "authorization": authorization,
                                                "content-type": "application/cbor"},
                                       extensions={"sni_hostname": remote.host})
    return resp.status_code, decode(resp.content, max_size=1 << 20)


async def user(server: Remote, name: str, tenant: str = "acme") -> tuple[str, str]:
    status, body = await server.admin("POST", "/v1/admin/users", {"name": name, "tenant": tenant})
    assert status == 200, body
    return body["user_id"], body["access_token"]


class Counter:
    """A TCP listener that counts connections: a stranger's name resolves here,
    so any descriptor fetch for it would show."""

    def __init__(self) -> None:
        self.port = free_port()
        self.accepted = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        task_status.started()

        async def handler(stream: trio.SocketStream) -> None:
            self.accepted += 1
            await stream.aclose()

        await trio.serve_listeners(handler, listeners)


# -- 1, 2: room membership ----------------------------------------------------------------------


async def test_a_local_non_member_cannot_enter_post_or_read(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    async with two_daemons(tmp_path, ca) as (a, b):
        await peer_up(a, b)
        alice, at = await user(a, "alice")
        mallory, mt = await user(a, "mallory")
        status, room = await a.request("POST", "/v1/rooms", {"room_type": "group"}, token=at)
        assert status == 200
        rid = room["room_id"]
        assert (await a.request("POST", f"/v1/rooms/{rid}/messages", {"body": "secret"}, token=at))[0] == 200
        # Inviting oneself, posting, reading, leaving: all need a joined membership.
        assert error_code(await a.request("POST", f"/v1/rooms/{rid}/invite", {"user": mallory}, token=mt)) == \
            "not_member"
        assert error_code(await a.request("POST", f"/v1/invites/{rid}/accept", token=mt)) == "not_found"
        assert error_code(await a.request("POST", f"/v1/rooms/{rid}/messages", {"body": "hi"}, token=mt)) == \
            "not_member"
        assert error_code(await a.request("GET", f"/v1/rooms/{rid}/messages", token=mt)) == "not_member"
        assert error_code(await a.request("POST", f"/v1/rooms/{rid}/leave", token=mt)) == "not_member"
        # A DM has exactly its two parties: its creator cannot add a third.
        carol, ct = await user(a, "carol")
        status, dm = await a.request("POST", "/v1/dms", {"to": carol}, token=at)
        assert status == 200, dm
        assert error_code(await a.request("POST", f"/v1/rooms/{dm['room_id']}/invite", {"user": mallory},
                                          token=at)) == "forbidden"
        # Nothing was stored for mallory anywhere.
        assert (await a.request("GET", "/v1/notifications", token=mt))[1]["notifications"] == []
        assert (await a.request("GET", "/v1/rooms", token=mt))[1]["rooms"] == []
        # Alice's room still reads as before.
        messages = (await a.request("GET", f"/v1/rooms/{rid}/messages", token=at))[1]["messages"]
        assert [m["body"] for m in messages] == ["secret"]


async def test_a_non_member_cannot_invite_out_and_an_invited_server_reads_nothing(
        tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    async with two_daemons(tmp_path, ca) as (a, b):
        await peer_up(a, b)
        alice, at = await user(a, "alice")
        _, mt = await user(a, "mallory")
        bob, bt = await user(b, "bob")
        rid = (await a.request("POST", "/v1/rooms", {"room_type": "group"}, token=at))[1]["room_id"]
        assert (await a.request("POST", f"/v1/rooms/{rid}/messages", {"body": "secret"}, token=at))[0] == 200
        # mallory (no member) cannot bring a remote user in.
        assert error_code(await a.request("POST", f"/v1/rooms/{rid}/invite", {"user": bob}, token=mt)) == \
            "not_member"
        # alice invites bob; bob has not accepted: peer.test reads nothing of the room.
        assert (await a.request("POST", f"/v1/rooms/{rid}/invite", {"user": bob}, token=at))[0] == 200
        status, job = await b.admin("POST", f"/v1/admin/federation/rooms/{rid}/backfill",
                                    {"peer": a.server_name, "wait": True})
        assert status == 200 and job["state"] == "failed" and job["stored"] == 0
        assert job["error"]["code"] == "not_member"
        # Once bob joins, the history flows.
        assert (await b.request("POST", f"/v1/invites/{rid}/accept", token=bt))[0] == 200
        status, job = await b.admin("POST", f"/v1/admin/federation/rooms/{rid}/backfill",
                                    {"peer": a.server_name, "wait": True})
        assert job["state"] == "done", job
        messages = (await b.request("GET", f"/v1/rooms/{rid}/messages", token=bt))[1]["messages"]
        assert [m["body"] for m in messages] == ["secret"]


# -- 3: sealed rooms ----------------------------------------------------------------------------


async def test_a_sealed_tenants_room_gains_no_foreign_member(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    async with two_daemons(tmp_path, ca) as (a, b):
        await peer_up(a, b)
        assert (await a.admin("POST", "/v1/admin/tenants", {"name": "sealed", "federation": False}))[0] == 200
        carol, ct = await user(a, "carol", tenant="sealed")
        alice, at = await user(a, "alice")
        bob, _ = await user(b, "bob")
        rid = (await a.request("POST", "/v1/rooms", {"room_type": "group"}, token=ct))[1]["room_id"]
        # Neither another server's user nor another tenant's user enters it.
        assert error_code(await a.request("POST", f"/v1/rooms/{rid}/invite", {"user": bob}, token=ct)) == \
            "tenant_federation_disabled"
        assert error_code(await a.request("POST", f"/v1/rooms/{rid}/invite", {"user": alice}, token=ct)) == \
            "tenant_federation_disabled"
        # alice, of a federating tenant, cannot invite herself in to relay it either.
        assert error_code(await a.request("POST", f"/v1/rooms/{rid}/invite", {"user": alice}, token=at)) == \
            "not_member"
        # A sealed tenant's user gets no DM out, and no invite in from another server.
        assert error_code(await a.request("POST", "/v1/dms", {"to": bob}, token=ct)) == \
            "tenant_federation_disabled"
        _, bt = await user(b, "bobby")
        assert error_code(await b.request("POST", "/v1/dms", {"to": carol}, token=bt)) == \
            "tenant_federation_disabled"
        # Incognito rooms likewise, whatever the tenant.
        inc = (await a.request("POST", "/v1/rooms", {"room_type": "incognito"}, token=at))[1]["room_id"]
        assert error_code(await a.request("POST", f"/v1/rooms/{inc}/invite", {"user": bob}, token=at)) == \
            "room_incognito"
        # Another federating tenant of this server may be invited into an unsealed room (rule A5).
        assert (await a.admin("POST", "/v1/admin/tenants", {"name": "globex"}))[0] == 200
        dave, dt = await user(a, "dave", tenant="globex")
        grp = (await a.request("POST", "/v1/rooms", {"room_type": "group"}, token=at))[1]["room_id"]
        assert (await a.request("POST", f"/v1/rooms/{grp}/invite", {"user": dave}, token=at))[0] == 200
        assert (await a.request("POST", f"/v1/invites/{grp}/accept", token=dt))[0] == 200


# -- 4: one spelling per name -------------------------------------------------------------------


async def test_a_blocked_server_is_refused_in_any_spelling(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    async with two_daemons(tmp_path, ca) as (a, b):
        await peer_up(a, b)
        shouted = b.server_name.upper()  # PEER.TEST:port
        status, policy = await a.admin("PUT", "/v1/admin/federation/policy",
                                       {"default_mode": "open", "allowed_peers": [], "blocked_peers": [shouted]})
        assert status == 200 and policy["blocked_peers"] == [b.server_name]  # kept canonical
        assert error_code(await b.admin("POST", f"/v1/admin/federation/peers/{a.server_name}/handshake")) == \
            "peer_blocked"
        # The same server signing with its name in capitals is malformed, never a new name.
        key = signing_key(tmp_path, "b")
        for origin in (shouted, f"{b.host}.:{b.port}", f"{b.host.title()}:{b.port}"):
            auth = sign_request(key, origin=origin, destination=a.server_name, method="POST",
                                target=HANDSHAKE_TARGET, body=b"", now=trio_now_ms())
            status, reply = await raw(a, "POST", HANDSHAKE_TARGET, b"", auth)
            assert status == 400 and reply["error"]["code"] == "malformed", (origin, reply)
        # Admin input in any spelling names the same peer.
        status, body = await a.admin("POST", f"/v1/admin/federation/peers/{b.host.upper()}.:{b.port}/retry")
        assert status == 200 and body["server_name"] == b.server_name
        assert error_code(await a.admin("POST", "/v1/admin/federation/peers/127.0.0.1:1/retry")) == "bad_request"


def trio_now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


# -- 5: sender authenticity ---------------------------------------------------------------------


async def test_a_host_cannot_forge_another_servers_users_words(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    async with two_daemons(tmp_path, ca) as (a, b):
        # A DM hosted on peer.test (b): alice there, bob on your-host (a) has joined.
        rid, alice_t, bob_t = await peered_dm(b, a)
        assert (await b.request("POST", f"/v1/rooms/{rid}/messages", {"body": "hello"}, token=alice_t))[0] == 200

        async def bob_sees(n: int):
            messages = (await a.request("GET", f"/v1/rooms/{rid}/messages", token=bob_t))[1]["messages"]
            return messages if len(messages) == n else None

        await wait_for(lambda: bob_sees(1))
        db = sqlite3.connect(tmp_path / "a" / "data" / "scaiwave.db")
        depth, event_id = db.execute("SELECT depth, event_id FROM events WHERE room_id = ? ORDER BY depth DESC",
                                     (rid,)).fetchone()
        db.close()
        bob = f"@bob:{a.server_name}"  # one of the receiver's own users
        key = signing_key(tmp_path, "b")
        forged = chain_event(key, head=Head(depth, event_id), room_id=rid, room_type="dm", sender=bob,
                             type="m.message", ts=trio_now_ms(), content={"body": "I resign"})
        body = encode_events_body([forged.envelope])
        target = f"{FED}/send/forged-1"
        auth = sign_request(key, origin=b.server_name, destination=a.server_name, method="PUT", target=target,
                            body=body, now=trio_now_ms())
        status, reply = await raw(a, "PUT", target, body, auth)
        assert status == 200
        assert reply["results"][0]["error"]["code"] == "forged_sender", reply
        assert [m["body"] for m in await bob_sees(1)] == ["hello"]
        # And words of a third server's user, likewise.
        mallory = "@mallory:third.test"
        forged = chain_event(key, head=Head(depth, event_id), room_id=rid, room_type="dm", sender=mallory,
                             type="m.message", ts=trio_now_ms(), content={"body": "hi"})
        body = encode_events_body([forged.envelope])
        auth = sign_request(key, origin=b.server_name, destination=a.server_name, method="PUT",
                            target=f"{FED}/send/forged-2", body=body, now=trio_now_ms())
        status, reply = await raw(a, "PUT", f"{FED}/send/forged-2", body, auth)
        assert status == 200 and reply["results"][0]["error"]["code"] == "forged_sender", reply


# -- 6: strangers -------------------------------------------------------------------------------


async def test_a_stranger_leaves_no_trace_and_makes_us_fetch_nothing(
        tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    counter = Counter()
    stranger = f"stranger.test:{counter.port}"
    async with trio.open_nursery() as nursery:
        await nursery.start(counter.serve)
        async with two_daemons(tmp_path, ca, extra_resolve=f"{stranger}:127.0.0.1") as (a, b):
            await peer_up(a, b)
            key = SigningKey.from_seed(b"\x05" * 32, trio_now_ms())
            for mode in ("closed", "invite_only"):
                policy = {"default_mode": mode, "allowed_peers": [b.server_name], "blocked_peers": []}
                assert (await a.admin("PUT", "/v1/admin/federation/policy", policy))[0] == 200
                for target, method in ((HANDSHAKE_TARGET, "POST"), (f"{FED}/send/t-{mode}", "PUT")):
                    body = encode({"events": []})
                    auth = sign_request(key, origin=stranger, destination=a.server_name, method=method,
                                        target=target, body=body, now=trio_now_ms())
                    status, reply = await raw(a, method, target, body, auth)
                    assert status == 403 and reply["error"]["code"] in ("federation_closed", "peer_not_allowed")
            assert counter.accepted == 0  # no descriptor fetch was tried
            peers = (await a.admin("GET", "/v1/admin/federation/peers"))[1]["peers"]
            assert [p["server_name"] for p in peers] == [b.server_name]
            # A blocked peer's refused requests do not count as seen, nor clear its error.
            before = await a.peer(b.server_name)
            policy = {"default_mode": "open", "allowed_peers": [], "blocked_peers": [b.server_name]}
            assert (await a.admin("PUT", "/v1/admin/federation/policy", policy))[0] == 200
            await trio.sleep(0.05)
            assert error_code(await b.admin("POST", f"/v1/admin/federation/peers/{a.server_name}/handshake")) == \
                "peer_blocked"
            after = await a.peer(b.server_name)
            assert after["last_seen"] == before["last_seen"] and after["last_error"] == before["last_error"]
        nursery.cancel_scope.cancel()


async def test_outbound_federation_never_connects_to_loopback_unless_pinned(
        tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    counter = Counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(counter.serve)
        async with two_daemons(tmp_path, ca) as (a, b):
            await peer_up(a, b)
            open_policy = {"default_mode": "open", "allowed_peers": [], "blocked_peers": []}
            assert (await a.admin("PUT", "/v1/admin/federation/policy", open_policy))[0] == 200
            # A request claiming an origin whose name leads to loopback (not pinned).
            claimed = f"localhost:{counter.port}"
            key = SigningKey.from_seed(b"\x06" * 32, trio_now_ms())
            auth = sign_request(key, origin=claimed, destination=a.server_name, method="POST",
                                target=HANDSHAKE_TARGET, body=b"", now=trio_now_ms())
            status, reply = await raw(a, "POST", HANDSHAKE_TARGET, b"", auth)
            assert status == 502 and reply["error"]["code"] == "address_blocked", reply
            # An admin's explicit fetch is refused the same way, with the reason.
            status, body = await a.admin("GET", f"/v1/admin/federation/descriptor?server={claimed}")
            assert status == 502 and body["error"]["code"] == "address_blocked"
            assert "127.0.0.1" in body["error"]["message"] and "SCAIWAVE_RESOLVE" in body["error"]["message"]
            assert counter.accepted == 0
            # Pinned names (SCAIWAVE_RESOLVE) still reach loopback: peer.test is one.
            assert (await a.admin("GET", f"/v1/admin/federation/descriptor?server={b.server_name}"))[0] == 200
        nursery.cancel_scope.cancel()


async def test_an_allowed_range_is_reached_and_said_at_start(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    """SCAIWAVE_OUTBOUND_ALLOW opens a non-public range on purpose (a lab, a private
    network): the fetch then reaches loopback, and the setting is never silent."""
    counter = Counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(counter.serve)
        async with two_daemons(tmp_path, ca, SCAIWAVE_OUTBOUND_ALLOW="127.0.0.0/8") as (a, b):
            await peer_up(a, b)
            status, body = await a.admin("GET", f"/v1/admin/federation/descriptor?server=localhost:{counter.port}")
            # The counter accepts and hangs up: not a descriptor, but it was reached.
            assert status == 502 and body["error"]["code"] != "address_blocked", body
            assert counter.accepted >= 1
        nursery.cancel_scope.cancel()
    from scaiwave_federation.shell.config import load_config
    from shellhelpers import make_env

    authority, ca_path = ca
    config = load_config(make_env(tmp_path / "c", ca_path, authority, "third.test", 8450,
                                  SCAIWAVE_OUTBOUND_ALLOW="10.0.0.0/8, fd00::/8"))
    assert any("SCAIWAVE_OUTBOUND_ALLOW" in line and "10.0.0.0/8" in line for line in config.warnings())
