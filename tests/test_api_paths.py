"""Percent-encoded path parameters (issue 11 item 1): every endpoint's ids sent
raw, as an HTTP library encodes them (``quote(id, safe="")``) and with every
byte encoded, to two real daemons over real TLS. Each spelling gets the same
answer as the raw id. The route table is read to check that no endpoint with a
path parameter is left out here.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
import trustme

from shellhelpers import Remote, peered_dm, two_daemons, wait_for
from scaiwave_federation.shell.http.routes import all_routes


def spellings(value: str) -> list[str]:
    """Raw, encoded as client libraries do, and every byte encoded."""
    return [value, quote(value, safe=""), "".join(f"%{b:02X}" for b in value.encode())]


#: The templates this test sends ids to; test_every_parameterized_route_is_covered keeps it complete.
COVERED = {
    ("POST", "/v1/admin/federation/peers/{peer}/handshake"),
    ("POST", "/v1/admin/federation/peers/{peer}/retry"),
    ("POST", "/v1/admin/federation/foreign/{participant_id}/refresh"),
    ("POST", "/v1/admin/federation/rooms/{room_id}/backfill"),
    ("GET", "/v1/admin/federation/backfills/{job_id}"),
    ("PUT", "/v1/admin/tenants/{name}"),
    ("POST", "/v1/rooms/{room_id}/messages"),
    ("GET", "/v1/rooms/{room_id}/messages"),
    ("POST", "/v1/rooms/{room_id}/invite"),
    ("POST", "/v1/invites/{room_id}/accept"),
    ("POST", "/v1/invites/{room_id}/decline"),
    ("POST", "/v1/rooms/{room_id}/leave"),
    ("PUT", "/v1/rooms/{room_id}/send/{txn_id}"),
    ("POST", "/v1/admin/federation/peers/{peer}/pause"),
    ("POST", "/v1/admin/federation/peers/{peer}/resume"),
    ("DELETE", "/v1/admin/federation/peers/{peer}"),
    ("POST", "/v1/admin/users/{user_id}/token"),
    ("POST", "/v1/admin/users/{user_id}/deactivate"),
}


def test_every_parameterized_route_is_covered() -> None:
    assert {(r.method, r.template) for r in all_routes().routes if r.params} == COVERED


async def ok(answer: tuple[int, object]) -> dict:
    status, body = answer
    assert status == 200, body
    assert isinstance(body, dict)
    return body


async def test_every_id_raw_and_encoded(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    async with two_daemons(tmp_path, ca) as (a, b):
        room, alice, bob = await peered_dm(a, b)
        await admin_paths(a, b, room)
        await client_paths(a, b, room, alice, bob)
        await day_two_paths(a, b, room, alice)


async def day_two_paths(a: Remote, b: Remote, room: str, alice: str) -> None:
    """Sends, peer verbs and user verbs, each id in each spelling."""
    for i, spelled in enumerate(spellings(room)):
        for txn in spellings(f"t.{i}~x"):
            sent = await ok(await a.request("PUT", f"/v1/rooms/{spelled}/send/{txn}", {"body": f"t{i}"}, token=alice))
        assert sent["event_id"]
    for verb, spelled in zip(("pause", "resume", "pause", "resume"), spellings(b.server_name) * 2):
        view = await ok(await a.admin("POST", f"/v1/admin/federation/peers/{spelled}/{verb}"))
        assert view["server_name"] == b.server_name and view["paused"] is (verb == "pause")
    await ok(await a.admin("POST", "/v1/admin/users", {"name": "gina", "tenant": "acme"}))
    for spelled in spellings(f"@gina:{a.server_name}"):
        assert (await ok(await a.admin("POST", f"/v1/admin/users/{spelled}/token")))["access_token"]
    for spelled in spellings(f"@gina:{a.server_name}"):
        assert (await ok(await a.admin("POST", f"/v1/admin/users/{spelled}/deactivate")))["deactivated_at"]
    spelled = spellings(b.server_name)
    forgotten = await ok(await a.admin("DELETE", f"/v1/admin/federation/peers/{spelled[2]}?force=true"))
    assert forgotten["server_name"] == b.server_name
    for other in spelled[:2]:
        assert (await a.admin("DELETE", f"/v1/admin/federation/peers/{other}"))[0] == 404


async def admin_paths(a: Remote, b: Remote, room: str) -> None:
    for peer in spellings(b.server_name):
        done = await ok(await a.admin("POST", f"/v1/admin/federation/peers/{peer}/handshake"))
        assert done["server_name"] == b.server_name and done["state"] == "active"
        assert (await ok(await a.admin("POST", f"/v1/admin/federation/peers/{peer}/retry")))["server_name"] \
            == b.server_name
    # A participant as a user id, as a server name, and a user id holding "/"
    # (legal in a local part): %2F stays inside its segment.
    for participant in (f"@bob:{b.server_name}", b.server_name, f"@a/b:{b.server_name}"):
        for spelled in spellings(participant)[1 if "/" in participant else 0:]:
            refreshed = await ok(await a.admin("POST", f"/v1/admin/federation/foreign/{spelled}/refresh"))
            assert refreshed["server_name"] == b.server_name
    for query in spellings(b.server_name):
        described = await ok(await a.admin("GET", f"/v1/admin/federation/descriptor?server={query}"))
        assert described["server_name"] == b.server_name

    # Backfill of the room (hosted on a) by b, in each spelling; then each job by id.
    jobs = []
    for spelled in spellings(room):
        job = await ok(await b.admin("POST", f"/v1/admin/federation/rooms/{spelled}/backfill", {"wait": True}))
        assert job["room_id"] == room and job["peer"] == a.server_name and job["state"] == "done", job
        jobs.append(job)
    for job in jobs:
        views = [await ok(await b.admin("GET", f"/v1/admin/federation/backfills/{s}")) for s in spellings(str(job["id"]))]
        assert views == [job] * 3

    # Tenants: a name only an encoded path can carry ("/"), and a plain one.
    for name in ("team/eu", "acme"):
        if name != "acme":
            await ok(await a.admin("POST", "/v1/admin/tenants", {"name": name}))
        for i, spelled in enumerate(spellings(name)[1 if "/" in name else 0:]):
            updated = await ok(await a.admin("PUT", f"/v1/admin/tenants/{spelled}", {"federation": i % 2 == 0}))
            assert updated == {"name": name, "federation_enabled": i % 2 == 0}
        await ok(await a.admin("PUT", f"/v1/admin/tenants/{quote(name, safe='')}", {"federation": True}))


async def client_paths(a: Remote, b: Remote, dm: str, alice: str, bob: str) -> None:
    # Messages in the DM (hosted on a) from both sides, each spelling; both read it alike.
    for i, spelled in enumerate(spellings(dm)):
        await ok(await a.request("POST", f"/v1/rooms/{spelled}/messages", {"body": f"a{i}"}, token=alice))
        await ok(await b.request("POST", f"/v1/rooms/{spelled}/messages", {"body": f"b{i}"}, token=bob))
    expected = ["a0", "b0", "a1", "b1", "a2", "b2"]
    for server, token in ((a, alice), (b, bob)):
        async def history(server: Remote = server, token: str = token) -> list[list[str]] | None:
            seen = [[m["body"] for m in (await ok(await server.request("GET", f"/v1/rooms/{s}/messages",
                                                                        token=token)))["messages"]]
                    for s in spellings(dm)]
            return seen if seen == [expected] * 3 else None

        await wait_for(history)

    # Local invites to a group room, answered in every spelling.
    group = (await ok(await a.request("POST", "/v1/rooms", {"room_type": "group"}, token=alice)))["room_id"]
    tokens = {}
    for name in ("carol", "dave", "erin", "frank"):
        tokens[name] = (await ok(await a.admin("POST", "/v1/admin/users", {"name": name, "tenant": "acme"})))[
            "access_token"]
    invitees = list(zip(("carol", "dave", "erin"), spellings(group)))
    for name, spelled in invitees:
        invited = await ok(await a.request("POST", f"/v1/rooms/{spelled}/invite",
                                           {"user": f"@{name}:{a.server_name}"}, token=alice))
        assert invited["room_id"] == group
    for (name, spelled), answer in zip(invitees, ("accept", "decline", "accept")):
        done = await ok(await a.request("POST", f"/v1/invites/{spelled}/{answer}", token=tokens[name]))
        assert done["room_id"] == group and done["membership"] == ("join" if answer == "accept" else "decline")
    for name, spelled in (("carol", spellings(group)[0]), ("erin", spellings(group)[2])):
        left = await ok(await a.request("POST", f"/v1/rooms/{spelled}/leave", token=tokens[name]))
        assert left["room_id"] == group and left["membership"] == "leave"
    await ok(await a.request("POST", f"/v1/rooms/{group}/invite", {"user": f"@frank:{a.server_name}"}, token=alice))
    done = await ok(await a.request("POST", f"/v1/invites/{spellings(group)[2]}/decline", token=tokens["frank"]))
    assert done["membership"] == "decline"

    # A remote invite (a new DM to bob) accepted through an encoded path: the
    # write goes to the room's host as a proposal.
    second = (await ok(await a.request("POST", "/v1/dms", {"to": f"@bob:{b.server_name}"}, token=alice)))["room_id"]
    await wait_for(lambda: _invited(b, bob, second))
    joined = await ok(await b.request("POST", f"/v1/invites/{quote(second, safe='')}/accept", token=bob))
    assert joined == {**joined, "room_id": second, "membership": "join"}


async def _invited(server: Remote, token: str, room: str) -> bool:
    notes = (await ok(await server.request("GET", "/v1/notifications", token=token)))["notifications"]
    return any(n["room_id"] == room for n in notes)


# -- the table's own rules -----------------------------------------------------------------


async def _ok_handler(call) -> object:  # pragma: no cover - never awaited here
    raise AssertionError


def test_route_table_rules() -> None:
    from scaiwave_federation.core import Code
    from scaiwave_federation.shell.http.inputs import ROOM_ID, BadInput
    from scaiwave_federation.shell.http.routes import PUBLIC, ApiFailure, Auth, RouteTable

    table = RouteTable()
    table.add("GET", "/v1/rooms/{room_id}/x", _ok_handler, auth=PUBLIC, summary="x", response={},
              params={"room_id": ROOM_ID})
    route, params = table.match("GET", "/v1/rooms/%21a%2Fb%3Apeer.test/x")
    assert route.template == "/v1/rooms/{room_id}/x" and params == {"room_id": "!a/b:peer.test"}
    assert table.match("GET", "/v1/%72ooms/!a:b/x")[1] == {"room_id": "!a:b"}  # literal segments decode too
    for path in ("/v1/rooms//x", "/v1/rooms/a/x/", "/v1/rooms/a", "//v1/rooms/a/x"):
        with pytest.raises(ApiFailure) as failure:
            table.match("GET", path)
        assert failure.value.refusal.code == Code.NOT_FOUND
    with pytest.raises(ApiFailure, match="this path takes GET"):
        table.match("POST", "/v1/rooms/a/x")
    with pytest.raises(BadInput, match="path: percent-encoding that is not UTF-8"):
        table.match("GET", "/v1/rooms/%FF/x")
    # A template and its typed parameters must agree; one endpoint, one entry.
    with pytest.raises(ValueError, match="path parameters"):
        table.add("GET", "/v1/y/{room}", _ok_handler, auth=PUBLIC, summary="y", response={})
    with pytest.raises(ValueError, match="registered twice"):
        table.add("GET", "/v1/rooms/{room_id}/x", _ok_handler, auth=PUBLIC, summary="x", response={},
                  params={"room_id": ROOM_ID})
    # Only a public route without input may answer statically (no Call, no checks).
    with pytest.raises(ValueError, match="statically"):
        table.add("GET", "/v1/s/{room_id}", _ok_handler, auth=PUBLIC, summary="s", response={},
                  params={"room_id": ROOM_ID}, static=lambda ctx: None)
    with pytest.raises(ValueError, match="statically"):
        table.add("GET", "/v1/s", _ok_handler, auth=Auth("user"), summary="s", response={}, static=lambda ctx: None)
