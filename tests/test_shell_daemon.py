"""The Trio daemon inside one test process.

1. The daemon's HTTP handler (``make_handler``) over in-memory streams, in
   front of a real :class:`Service` on a real SQLite file: what admins and
   users see from each endpoint, byte for byte through h11.
2. (Two daemons walking the guide, and federation's repairs: see
   test_shell_federation.py.)
3. The yearly key rotation, done by the daemon's own timer.
4. Graceful shutdown: a request in flight when the daemon is stopped still
   gets its answer.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
import trio
import trustme

from shellhelpers import ADMIN_TOKEN, FED, InMemory, Remote, error_code, make_env, trusting, wait_for
from scaiwave_federation.core import Code, KeyRing, Refused, SigningKey, build_descriptor, parse_descriptor
from scaiwave_federation.core.keys import DAY_MS, ROTATION_PERIOD_MS
from scaiwave_federation.shell.config import Config, load_config
from scaiwave_federation.shell.runtime.daemon import serve
from scaiwave_federation.shell.http.server import Request, Response, serve_http
from scaiwave_federation.shell.runtime.service import Service
from scaiwave_federation.shell.demo.testbed import free_port

# -- 1. the handler in memory, a real Service and SQLite ----------------------------------


async def test_descriptor_is_empty_until_key_generate_then_signed(daemon: InMemory) -> None:
    status, headers, data = await daemon.exchange("GET", "/.well-known/scaiwave")
    assert status == 200 and headers["content-type"] == "application/json"
    desc = json.loads(data)
    assert desc["server_name"] == "your-host.test"
    assert desc["public_key"] == "" and desc["key_id"] == "" and desc["old_keys"] == []
    assert desc["federation_endpoint"] == "https://your-host.test/_scaiwave/federation/v1"

    status, key = await daemon.admin("POST", "/v1/admin/federation/key/generate")
    assert status == 200 and key["key_id"].startswith("ed25519:") and key["public_key"]
    assert key["rotation_due_at"] == key["created_at"] + ROTATION_PERIOD_MS

    status, headers, data = await daemon.exchange("GET", "/.well-known/scaiwave")
    desc = json.loads(data)
    assert (desc["key_id"], desc["public_key"]) == (key["key_id"], key["public_key"])
    assert desc["signature"] and desc["protocol_versions"] == ["scaiwave-fed/1"]
    # What a peer would check: the descriptor verifies under its own key, for this name.
    parsed = parse_descriptor(data, "your-host.test")
    assert isinstance(parsed, tuple) and parsed[0].key_id == key["key_id"]
    mismatch = parse_descriptor(data, "other.test")
    assert isinstance(mismatch, Refused) and mismatch.code == Code.SERVER_NAME_MISMATCH

    # A second generate is a conflict: the key stays.
    assert error_code(await daemon.admin("POST", "/v1/admin/federation/key/generate")) == "conflict"
    assert (await daemon.admin("GET", "/v1/admin/federation/key"))[1]["key_id"] == key["key_id"]


async def test_the_descriptor_answers_statically_as_its_route_would(daemon: InMemory) -> None:
    """GET /.well-known/scaiwave is answered before route matching (Route.static):
    the same bytes as the route's handler, HEAD alike without a body, and a
    query string still goes through the route's checks."""
    from scaiwave_federation.shell.http.routes import all_routes

    await daemon.admin("POST", "/v1/admin/federation/key/generate")
    status, headers, data = await daemon.exchange("GET", "/.well-known/scaiwave")
    route, _ = all_routes().match("GET", "/.well-known/scaiwave")
    assert route.static is not None and status == 200
    assert data == route.static(daemon.service.ctx).body
    status, head_headers, empty = await daemon.exchange("HEAD", "/.well-known/scaiwave")
    assert (status, empty, head_headers["content-length"]) == (200, b"", headers["content-length"])
    status, _, refused = await daemon.exchange("GET", "/.well-known/scaiwave?x=1")
    assert status == 400 and json.loads(refused)["error"]["code"] == "bad_request"


async def test_admin_endpoints_need_the_admin_token(daemon: InMemory) -> None:
    for token in (None, "wrong-token-0123456789abcdef", ADMIN_TOKEN + "x", ADMIN_TOKEN[:-1]):
        status, body = await daemon.request("GET", "/v1/admin/federation/policy", token=token)
        assert status == 401 and error_code((status, body)) == "unauthorized"
    # Not a bearer token: refused too.
    status, headers, data = await daemon.exchange(
        "GET", "/v1/admin/federation/policy", headers=[("authorization", f"Basic {ADMIN_TOKEN}")])
    assert status == 401 and headers["content-type"] == "application/json"
    assert json.loads(data)["error"]["code"] == "unauthorized"
    # Nothing was done on a refused write.
    status, _ = await daemon.request("POST", "/v1/admin/federation/key/generate", token="nope-nope-nope-nope")
    assert status == 401 and daemon.service.node.keyring.current is None
    status, body = await daemon.admin("GET", "/v1/admin/federation/policy")
    assert status == 200 and body == {"default_mode": "invite_only", "allowed_peers": [], "blocked_peers": []}


async def test_unknown_endpoints_are_404_not_found(daemon: InMemory) -> None:
    assert error_code(await daemon.request("GET", "/nowhere")) == "not_found"
    assert error_code(await daemon.admin("GET", "/v1/admin/nothing/here")) == "not_found"
    status, body = await daemon.admin("GET", "/v1/admin/nothing/here")
    assert status == 404


async def test_a_known_path_with_another_method_is_405_with_allow(daemon: InMemory) -> None:
    for method, target, allow in [("POST", "/.well-known/scaiwave", "GET"),
                                  ("DELETE", "/v1/admin/federation/policy", "GET, PUT"),
                                  ("GET", "/v1/admin/federation/key/generate", "POST"),
                                  ("PATCH", "/v1/rooms/%21a%3Ab/messages", "POST, GET")]:
        status, headers, data = await daemon.exchange(method, target)
        assert (status, headers["allow"], headers["content-type"]) == (405, allow, "application/json"), target
        assert json.loads(data)["error"]["code"] == "method_not_allowed"
    # Nothing was done: no key was generated by a GET.
    assert daemon.service.node.keyring.current is None
    # HEAD is GET without a body; a path without GET answers 405.
    status, headers, data = await daemon.exchange("HEAD", "/.well-known/scaiwave")
    assert (status, data) == (200, b"") and int(headers["content-length"]) > 0
    status, headers, data = await daemon.exchange("HEAD", "/v1/admin/federation/key/rotate")
    assert (status, headers["allow"]) == (405, "POST")


async def test_federation_refusals_are_cbor(daemon: InMemory) -> None:
    # No key yet: every federation request is refused with own_key_missing.
    status, headers, data = await daemon.exchange("POST", f"{FED}/handshake", body=cbor2.dumps({}))
    assert (status, headers["content-type"]) == (503, "application/cbor")
    assert cbor2.loads(data)["error"]["code"] == "own_key_missing"

    assert (await daemon.admin("POST", "/v1/admin/federation/key/generate"))[0] == 200
    # With a key: an unsigned request is unauthorized, in the CBOR error shape.
    status, headers, data = await daemon.exchange("POST", f"{FED}/handshake", body=cbor2.dumps({}))
    assert (status, headers["content-type"]) == (401, "application/cbor")
    body = cbor2.loads(data)
    assert set(body) == {"error"} and body["error"]["code"] == "unauthorized" and body["error"]["message"]
    # A bogus signature scheme, and an unknown federation endpoint.
    status, headers, data = await daemon.exchange(
        "PUT", f"{FED}/send/t1", body=b"\xa0", headers=[("authorization", "Bearer abc")])
    assert status == 401 and cbor2.loads(data)["error"]["code"] == "unauthorized"
    status, headers, data = await daemon.exchange("GET", f"{FED}/nothing")
    assert (status, headers["content-type"]) == (404, "application/cbor")
    assert cbor2.loads(data)["error"]["code"] == "not_found"


async def test_policy_put_and_bad_mode_leaves_it_unchanged(daemon: InMemory) -> None:
    policy = {"default_mode": "invite_only", "allowed_peers": ["peer.test:8449"], "blocked_peers": ["evil.test"]}
    assert await daemon.admin("PUT", "/v1/admin/federation/policy", policy) == (200, policy)
    for bad in ({"default_mode": "sometimes"}, {"default_mode": "open", "allowed_peers": ["not a name"]},
                {"default_mode": "open", "colour": "blue"}, ["open"]):
        status, body = await daemon.admin("PUT", "/v1/admin/federation/policy", bad)
        assert status == 400 and error_code((status, body)) == "bad_request", bad
    status, body = await daemon.request("PUT", "/v1/admin/federation/policy", raw=b"{not json", token=ADMIN_TOKEN)
    assert status == 400 and body["error"]["code"] == "bad_request"
    assert await daemon.admin("GET", "/v1/admin/federation/policy") == (200, policy)
    assert await daemon.service.store.get_policy() == policy  # what is on disk too


async def test_tenants_and_users(daemon: InMemory) -> None:
    status, tenant = await daemon.admin("POST", "/v1/admin/tenants", {"name": "acme"})
    assert status == 200 and tenant["name"] == "acme"
    assert error_code(await daemon.admin("POST", "/v1/admin/tenants", {"name": "acme"})) == "conflict"
    assert error_code(await daemon.admin("POST", "/v1/admin/tenants", {})) == "bad_request"
    assert [t["name"] for t in (await daemon.admin("GET", "/v1/admin/tenants"))[1]["tenants"]] == ["acme"]

    status, alice = await daemon.admin("POST", "/v1/admin/users", {"name": "alice", "tenant": "acme"})
    assert status == 200
    assert alice["user_id"] == "@alice:your-host.test" and alice["tenant"] == "acme"
    assert alice["access_token"].startswith("swu_")
    status, body = await daemon.admin("POST", "/v1/admin/users", {"name": "alice", "tenant": "acme"})
    assert status == 409 and error_code((status, body)) == "conflict"
    assert error_code(await daemon.admin("POST", "/v1/admin/users", {"name": "carol", "tenant": "nope"})) == "not_found"
    assert error_code(await daemon.admin("POST", "/v1/admin/users", {"name": "no way", "tenant": "acme"})) == "bad_request"
    status, users = await daemon.admin("GET", "/v1/admin/users")
    assert [u["user_id"] for u in users["users"]] == ["@alice:your-host.test"]
    assert alice["access_token"] not in json.dumps(users) and "token_hash" not in users["users"][0]


async def test_user_endpoints(daemon: InMemory) -> None:
    await daemon.admin("POST", "/v1/admin/tenants", {"name": "acme"})
    await daemon.admin("POST", "/v1/admin/tenants", {"name": "closed-co", "federation": False})
    alice = (await daemon.admin("POST", "/v1/admin/users", {"name": "alice", "tenant": "acme"}))[1]["access_token"]
    bob = (await daemon.admin("POST", "/v1/admin/users", {"name": "bob", "tenant": "acme"}))[1]["access_token"]
    carol = (await daemon.admin("POST", "/v1/admin/users", {"name": "carol", "tenant": "closed-co"}))[1]["access_token"]

    # No token, a wrong token, the admin token: not a user.
    for token in (None, "swu_nope", ADMIN_TOKEN):
        assert error_code(await daemon.request("GET", "/v1/notifications", token=token)) == "unauthorized"
    # Without a federation key there are no signed events, so no rooms.
    status, body = await daemon.request("POST", "/v1/rooms", {"room_type": "group"}, token=alice)
    assert status == 503 and error_code((status, body)) == "own_key_missing"
    await daemon.admin("POST", "/v1/admin/federation/key/generate")

    status, room = await daemon.request("POST", "/v1/rooms", {"room_type": "group"}, token=alice)
    assert status == 200 and room["room_type"] == "group" and room["room_id"].endswith(":your-host.test")
    room_id = room["room_id"]
    assert error_code(await daemon.request("POST", "/v1/rooms", {"room_type": "dm"}, token=alice)) == "bad_request"
    for text in ("first", "second", "third"):
        status, posted = await daemon.request("POST", f"/v1/rooms/{room_id}/messages", {"body": text}, token=alice)
        assert status == 200 and posted["event_id"]
    assert error_code(await daemon.request("POST", f"/v1/rooms/{room_id}/messages", {"body": ""}, token=alice)) \
        == "bad_request"
    status, history = await daemon.request("GET", f"/v1/rooms/{room_id}/messages", token=alice)
    assert status == 200
    assert [(m["sender"], m["body"]) for m in history["messages"]] == [
        ("@alice:your-host.test", "first"), ("@alice:your-host.test", "second"), ("@alice:your-host.test", "third")]
    depths = [m["depth"] for m in history["messages"]]
    assert depths == sorted(depths) and len(set(depths)) == 3
    # Bob is not in the room: he can neither read nor write it.
    assert error_code(await daemon.request("GET", f"/v1/rooms/{room_id}/messages", token=bob)) == "not_member"
    assert error_code(await daemon.request("POST", f"/v1/rooms/{room_id}/messages", {"body": "hi"}, token=bob)) \
        == "not_member"
    # A local invite lands in bob's notifications; accepting lets him in.
    status, _ = await daemon.request("POST", f"/v1/rooms/{room_id}/invite", {"user": "@bob:your-host.test"},
                                     token=alice)
    assert status == 200
    notes = (await daemon.request("GET", "/v1/notifications", token=bob))[1]["notifications"]
    assert [(n["type"], n["room_id"], n["inviter"]) for n in notes] == [("invite", room_id, "@alice:your-host.test")]
    assert (await daemon.request("POST", f"/v1/invites/{room_id}/accept", token=bob))[0] == 200
    assert (await daemon.request("GET", "/v1/notifications", token=bob))[1]["notifications"] == []
    assert (await daemon.request("POST", f"/v1/rooms/{room_id}/messages", {"body": "hi all"}, token=bob))[0] == 200
    history = (await daemon.request("GET", f"/v1/rooms/{room_id}/messages", token=alice))[1]["messages"]
    assert [m["body"] for m in history] == ["first", "second", "third", "hi all"]
    assert (await daemon.request("GET", "/v1/rooms", token=bob))[1]["rooms"][0]["room_id"] == room_id

    # Rooms that never leave the server refuse a federated invite before any network use.
    status, incognito = await daemon.request("POST", "/v1/rooms", {"room_type": "incognito"}, token=alice)
    status, body = await daemon.request("POST", f"/v1/rooms/{incognito['room_id']}/invite",
                                        {"user": "@bob:peer.test"}, token=alice)
    assert status == 403 and error_code((status, body)) == "room_incognito"
    # So does a tenant with federation disabled.
    status, body = await daemon.request("POST", "/v1/dms", {"to": "@bob:peer.test"}, token=carol)
    assert status == 403 and error_code((status, body)) == "tenant_federation_disabled"
    # And our own policy (invite_only, nobody allowed) refuses peer.test.
    assert error_code(await daemon.request("POST", "/v1/dms", {"to": "@bob:peer.test"}, token=alice)) \
        == "peer_not_allowed"


async def test_concurrent_posts_to_one_room_all_land_in_one_chain(daemon: InMemory) -> None:
    """Many members writing at once: every post is answered 200 and chained once
    (two writers must never both chain onto the same head)."""
    await daemon.admin("POST", "/v1/admin/federation/key/generate")
    await daemon.admin("POST", "/v1/admin/tenants", {"name": "acme"})
    token = (await daemon.admin("POST", "/v1/admin/users", {"name": "alice", "tenant": "acme"}))[1]["access_token"]
    room = (await daemon.request("POST", "/v1/rooms", {"room_type": "group"}, token=token))[1]["room_id"]
    answers: list[tuple[int, Any]] = []

    async def post(i: int) -> None:
        answers.append(await daemon.request("POST", f"/v1/rooms/{room}/messages", {"body": f"m{i}"}, token=token))

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(post, i)
    assert [status for status, _ in answers] == [200] * 20, [b for s, b in answers if s != 200][:1]
    history = (await daemon.request("GET", f"/v1/rooms/{room}/messages", token=token))[1]
    assert sorted(m["body"] for m in history["messages"]) == sorted(f"m{i}" for i in range(20))
    depths = [m["depth"] for m in history["messages"]]
    assert depths == list(range(depths[0], depths[0] + 20))
    assert sorted(a["depth"] for _, a in answers) == depths


async def test_key_rotate_publishes_new_key_and_keeps_old(daemon: InMemory) -> None:
    assert error_code(await daemon.admin("POST", "/v1/admin/federation/key/rotate")) == "own_key_missing"
    first = (await daemon.admin("POST", "/v1/admin/federation/key/generate"))[1]
    status, second = await daemon.admin("POST", "/v1/admin/federation/key/rotate")
    assert status == 200 and second["key_id"] != first["key_id"]
    status, desc = await daemon.request("GET", "/.well-known/scaiwave")
    assert (desc["key_id"], desc["public_key"]) == (second["key_id"], second["public_key"])
    assert [(o["key_id"], o["public_key"]) for o in desc["old_keys"]] == [(first["key_id"], first["public_key"])]
    assert first["created_at"] <= desc["old_keys"][0]["expired_at"] <= second["created_at"]
    parsed = parse_descriptor(json.dumps(desc).encode(), "your-host.test")
    assert isinstance(parsed, tuple) and parsed[0].knows(first["key_id"]) and parsed[0].knows(second["key_id"])
    # Again: both old keys stay, newest first.
    third = (await daemon.admin("POST", "/v1/admin/federation/key/rotate"))[1]
    desc = (await daemon.request("GET", "/.well-known/scaiwave"))[1]
    assert desc["key_id"] == third["key_id"]
    assert [o["key_id"] for o in desc["old_keys"]] == [second["key_id"], first["key_id"]]


async def test_state_survives_a_restart(tmp_path: Path, ca: tuple[trustme.CA, Path], nursery: trio.Nursery) -> None:
    authority, ca_path = ca
    config = load_config(make_env(tmp_path / "srv", ca_path, authority, "your-host.test"))
    first = InMemory(await Service.open(config), nursery)
    key = (await first.admin("POST", "/v1/admin/federation/key/generate"))[1]
    policy = {"default_mode": "open", "allowed_peers": [], "blocked_peers": ["evil.test"]}
    await first.admin("PUT", "/v1/admin/federation/policy", policy)
    await first.admin("POST", "/v1/admin/tenants", {"name": "acme"})
    token = (await first.admin("POST", "/v1/admin/users", {"name": "alice", "tenant": "acme"}))[1]["access_token"]
    room = (await first.request("POST", "/v1/rooms", {}, token=token))[1]["room_id"]
    await first.request("POST", f"/v1/rooms/{room}/messages", {"body": "kept"}, token=token)
    await first.service.aclose()

    again = InMemory(await Service.open(config), nursery)
    try:
        desc = (await again.request("GET", "/.well-known/scaiwave"))[1]
        assert desc["key_id"] == key["key_id"]
        assert (await again.admin("GET", "/v1/admin/federation/policy"))[1] == policy
        history = (await again.request("GET", f"/v1/rooms/{room}/messages", token=token))[1]["messages"]
        assert [m["body"] for m in history] == ["kept"]
        # The chain continues from the stored head.
        posted = (await again.request("POST", f"/v1/rooms/{room}/messages", {"body": "more"}, token=token))[1]
        assert posted["depth"] == history[0]["depth"] + 1
    finally:
        await again.service.aclose()

# -- 3. yearly rotation by the daemon's own timer --------------------------------------------


async def test_daemon_rotates_a_year_old_key_by_itself(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    authority, ca_path = ca
    port = free_port()
    env = make_env(tmp_path / "a", ca_path, authority, "your-host.test", port)

    async def run(config: Config, body) -> Any:
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery, httpx.AsyncClient(
                    verify=trusting(authority), trust_env=False, timeout=10) as http:
                await nursery.start(serve, config)
                result = await body(Remote(http, "your-host.test", port))
                nursery.cancel_scope.cancel()
        return result

    async def generate(server: Remote) -> dict:
        status, key = await server.admin("POST", "/v1/admin/federation/key/generate")
        assert status == 200
        return key

    # First run: a key is made today.
    first = await run(load_config(env), generate)

    # Second run, 366 days later (the test clock offset): the daemon rotates by itself.
    later = load_config({**env, "SCAIWAVE_CLOCK_OFFSET": "366d"})

    async def watch(server: Remote) -> dict:
        async def rotated():
            desc = (await server.request("GET", "/.well-known/scaiwave"))[1]
            return desc if desc["key_id"] != first["key_id"] else None

        desc = await wait_for(rotated, timeout=5)
        return {"desc": desc, "key": (await server.admin("GET", "/v1/admin/federation/key"))[1]}

    seen = await run(later, watch)
    desc, key = seen["desc"], seen["key"]
    assert desc["key_id"] and desc["public_key"] != first["public_key"]
    assert [(o["key_id"], o["public_key"]) for o in desc["old_keys"]] == [(first["key_id"], first["public_key"])]
    expired_at = desc["old_keys"][0]["expired_at"]
    assert expired_at - first["created_at"] >= 366 * DAY_MS - 60_000
    assert key["key_id"] == desc["key_id"] and key["created_at"] == expired_at
    assert key["rotation_due_at"] == key["created_at"] + ROTATION_PERIOD_MS
    assert isinstance(parse_descriptor(json.dumps(desc).encode(), f"your-host.test:{port}"), tuple)

    # A third run at the same clock: the new key is not due, nothing rotates again.
    async def unchanged(server: Remote) -> dict:
        await trio.sleep(0.3)
        return (await server.request("GET", "/.well-known/scaiwave"))[1]

    again = await run(later, unchanged)
    assert again["key_id"] == desc["key_id"] and len(again["old_keys"]) == 1


# -- 4. graceful shutdown ------------------------------------------------------------------


async def test_request_in_flight_is_answered_during_shutdown(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    """An admin asks for a slow peer's descriptor; the daemon is stopped meanwhile.
    The listener closes at once, the admin still gets the answer, then the daemon returns."""
    authority, ca_path = ca
    slow_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("slow.test").configure_cert(slow_ctx)
    reached, release = trio.Event(), trio.Event()
    slow_port = free_port()
    slow_name = f"slow.test:{slow_port}"
    slow_key = KeyRing(current=SigningKey.from_seed(bytes(range(32)), 1))
    descriptor = json.dumps(build_descriptor(slow_name, slow_key,
                                             federation_endpoint=f"https://{slow_name}{FED}")).encode()

    async def slow_peer(request: Request) -> Response:
        reached.set()
        await release.wait()
        return Response(200, descriptor)

    port = free_port()
    config = load_config(make_env(tmp_path / "a", ca_path, authority, "your-host.test", port,
                                  f"slow.test:{slow_port}:127.0.0.1"))
    daemon_scope = trio.CancelScope()
    daemon_done = trio.Event()
    answer: dict[str, httpx.Response] = {}

    async def run_daemon(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with daemon_scope:
            await serve(config, task_status=task_status)
        daemon_done.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery, httpx.AsyncClient(
                verify=trusting(authority), trust_env=False, timeout=10) as http:
            await nursery.start(lambda task_status: serve_http(
                slow_peer, host="127.0.0.1", port=slow_port, ssl_context=slow_ctx, task_status=task_status))
            await nursery.start(run_daemon)
            admin = Remote(http, "your-host.test", port)

            async def ask() -> None:
                answer["resp"] = await http.get(
                    f"https://127.0.0.1:{port}/v1/admin/federation/descriptor?server={slow_name}",
                    headers={"host": admin.server_name, "authorization": f"Bearer {ADMIN_TOKEN}"},
                    extensions={"sni_hostname": "your-host.test"})
                answered.set()

            answered = trio.Event()
            nursery.start_soon(ask)
            await reached.wait()
            daemon_scope.cancel()
            await trio.sleep(0.2)
            assert not daemon_done.is_set()  # waiting for the request in flight
            with pytest.raises(OSError):  # but no longer accepting
                await trio.open_tcp_stream("127.0.0.1", port)
            release.set()
            with trio.fail_after(5):
                await answered.wait()
                await daemon_done.wait()
            nursery.cancel_scope.cancel()
    resp = answer["resp"]
    assert resp.status_code == 200 and resp.json()["server_name"] == slow_name
    assert resp.headers["connection"] == "close"


async def test_the_descriptor_is_signed_once_per_key_ring(daemon: InMemory) -> None:
    """``/.well-known/scaiwave`` is served from bytes cached on the key ring:
    signed once, and never stale after a key event."""
    node = daemon.service.node
    built = []
    original = node.descriptor
    node.descriptor = lambda endpoint: built.append(endpoint) or original(endpoint)  # type: ignore[method-assign]
    empty = (await daemon.request("GET", "/.well-known/scaiwave"))[1]
    assert empty["key_id"] == ""
    first = (await daemon.admin("POST", "/v1/admin/federation/key/generate"))[1]
    bodies = [await daemon.exchange("GET", "/.well-known/scaiwave") for _ in range(3)]
    assert len({body for _status, _headers, body in bodies}) == 1
    assert json.loads(bodies[0][2])["key_id"] == first["key_id"]
    rotated = (await daemon.admin("POST", "/v1/admin/federation/key/rotate"))[1]
    desc = (await daemon.request("GET", "/.well-known/scaiwave"))[1]
    assert desc["key_id"] == rotated["key_id"] and desc["old_keys"][0]["key_id"] == first["key_id"]
    # A ring swapped in any other way (the core's own timer, a test) is followed too.
    daemon.service.node.keyring = daemon.service.node.keyring.rotate(bytes(32), daemon.service.now())
    assert (await daemon.request("GET", "/.well-known/scaiwave"))[1]["key_id"] == node.keyring.current.key_id
    # Built once per ring (the admin key views may build it too; the GETs add nothing).
    gets = len(built)
    await daemon.exchange("GET", "/.well-known/scaiwave")
    assert len(built) == gets
