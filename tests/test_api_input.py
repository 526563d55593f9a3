"""Strict input on the client and admin APIs (issue 9 item 5, issue 13).

Each bad body, query or path parameter is answered ``400 bad_request`` with a
message that names the field, never a 500, and changes nothing: the policy,
tenants and users are read back after every refusal. Through the daemon's
handler (h11 over memory streams) in front of a real Service and SQLite file;
the typed fields themselves are property-tested at the end.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shellhelpers import ADMIN_TOKEN, InMemory, error_code
from scaiwave_federation.shell.http.inputs import BadInput, Bool, Int, Obj, Str, parse_json_body, parse_query

POLICY = "/v1/admin/federation/policy"
GOOD_POLICY = {"default_mode": "invite_only", "allowed_peers": ["peer.test:8449"], "blocked_peers": ["evil.test"]}


def refused(answer: tuple[int, Any], *words: str) -> str:
    """Assert a 400 bad_request whose message holds every one of ``words``; return the message."""
    status, body = answer
    assert status == 400 and error_code(answer) == "bad_request", answer
    message = body["error"]["message"]
    for word in words:
        assert word in message, (word, message)
    return message


async def raw(daemon: InMemory, method: str, target: str, payload: bytes, token: str = ADMIN_TOKEN) -> tuple[int, Any]:
    return await daemon.request(method, target, raw=payload, token=token)


async def test_policy_put_refuses_bad_bodies_and_changes_nothing(daemon: InMemory) -> None:
    assert await daemon.admin("PUT", POLICY, GOOD_POLICY) == (200, GOOD_POLICY)
    # An empty PUT does not reset the policy: PUT replaces the whole policy,
    # so every field is required, and a body without them is refused.
    refused(await raw(daemon, "PUT", POLICY, b""), "default_mode", "required")
    refused(await daemon.admin("PUT", POLICY, {}), "allowed_peers", "blocked_peers", "default_mode")
    refused(await daemon.admin("PUT", POLICY, {"default_mode": "open"}), "allowed_peers", "required")
    full = {"default_mode": "open", "allowed_peers": [], "blocked_peers": []}
    cases: list[tuple[Any, tuple[str, ...]]] = [
        ({**full, "allowed_peers": [["peer.test"]]}, ("allowed_peers[0]", "string")),
        ({**full, "allowed_peers": [[]]}, ("allowed_peers[0]",)),
        ({**full, "blocked_peers": ["ok.test", {"a": 1}]}, ("blocked_peers[1]",)),
        ({**full, "blocked_peers": ["ok.test", "not a name"]}, ("blocked_peers[1]", "server name")),
        ({**full, "allowed_peers": "peer.test"}, ("allowed_peers", "list")),
        ({**full, "allowed_peers": None}, ("allowed_peers", "list")),
        ({**full, "default_mode": 1}, ("default_mode",)),
        ({**full, "default_mode": "sometimes"}, ("default_mode", "open, invite_only, closed")),
        ({**full, "colour": "blue"}, ("colour", "unknown")),
        (["open"], ("body", "object")),
        ("open", ("body", "object")),
        (None, ("body", "object")),
        (7, ("body", "object")),
    ]
    for body, words in cases:
        refused(await raw(daemon, "PUT", POLICY, json.dumps(body).encode()), *words)
    for payload, words in [
        (b'{"default_mode": "open", "default_mode": "closed", "allowed_peers": [], "blocked_peers": []}',
         ("default_mode", "twice")),
        (b'{"default_mode": NaN}', ("NaN",)),
        (b"{not json", ("not JSON",)),
        (b"\xff\xfe{}", ("not JSON",)),
        (b"[" * 100_000, ("not JSON",)),
    ]:
        refused(await raw(daemon, "PUT", POLICY, payload), *words)
    assert await daemon.admin("GET", POLICY) == (200, GOOD_POLICY)
    assert await daemon.service.store.get_policy() == GOOD_POLICY


async def test_tenant_federation_takes_only_a_boolean(daemon: InMemory) -> None:
    for body, words in [
        ({"name": "strings", "federation": "disabled"}, ("federation", "true or false")),
        ({"name": "numbers", "federation": 0}, ("federation",)),
        ({"name": "nulls", "federation": None}, ("federation",)),
        ({"name": 123}, ("name", "string")),
        ({"name": ""}, ("name", "characters")),
        ({"name": "x" * 129}, ("name", "characters")),
        ({"name": "a\nb"}, ("name", "U+000A", "control")),
        ({"name": "\ud800"}, ("name", "surrogate")),
        ({"name": "acme\u202e"}, ("name", "U+202E", "format")),
        ({"name": "ac\u200dme"}, ("name", "format")),
        ({"federation": False}, ("name", "required")),
        ({"name": "extra", "owner": "me"}, ("owner", "unknown")),
    ]:
        refused(await daemon.admin("POST", "/v1/admin/tenants", body), *words)
    assert (await daemon.admin("GET", "/v1/admin/tenants"))[1] == {"tenants": []}

    assert (await daemon.admin("POST", "/v1/admin/tenants", {"name": "closed-co", "federation": False}))[0] == 200
    # Neither a truthy string nor an empty update turns federation back on.
    for body, words in [({"federation": "enabled"}, ("federation",)), ({"federation": "disabled"}, ("federation",)),
                        ({}, ("federation", "required")), ({"federation": 1}, ("federation",)),
                        ({"federation": True, "name": "other"}, ("name", "unknown"))]:
        refused(await daemon.admin("PUT", "/v1/admin/tenants/closed-co", body), *words)
    refused(await raw(daemon, "PUT", "/v1/admin/tenants/closed-co", b""), "federation", "required")
    assert await daemon.service.store.get_tenant("closed-co") == {"name": "closed-co", "federation_enabled": False}
    status, tenant = await daemon.admin("PUT", "/v1/admin/tenants/closed-co", {"federation": True})
    assert status == 200 and tenant == {"name": "closed-co", "federation_enabled": True}


async def test_user_create_refuses_non_strings(daemon: InMemory) -> None:
    await daemon.admin("POST", "/v1/admin/tenants", {"name": "acme"})
    for body, words in [
        ({"name": 123, "tenant": "acme"}, ("name", "string")),
        ({"name": ["bob"], "tenant": "acme"}, ("name",)),
        ({"name": "Bob Smith", "tenant": "acme"}, ("name", "user names")),
        ({"name": "bob", "tenant": ["acme"]}, ("tenant", "string")),
        ({"name": "bob"}, ("tenant", "required")),
        ({"name": "bob", "tenant": "acme", "admin": True}, ("admin", "unknown")),
    ]:
        refused(await daemon.admin("POST", "/v1/admin/users", body), *words)
    refused(await raw(daemon, "POST", "/v1/admin/users", b""), "name", "tenant", "required")
    assert (await daemon.admin("GET", "/v1/admin/users"))[1] == {"users": []}


async def test_backfill_numbers_in_range_and_job_ids(daemon: InMemory) -> None:
    target = "/v1/admin/federation/rooms/!abc:peer.test/backfill"
    for body, words in [
        ({"limit": 10**20}, ("limit", "1 to 1000")),
        ({"limit": -(10**20)}, ("limit",)),
        ({"limit": 0}, ("limit",)),
        ({"limit": True}, ("limit", "integer")),
        ({"limit": 1.5}, ("limit", "integer")),
        ({"limit": "10"}, ("limit", "integer")),
        ({"peer": 5}, ("peer", "string")),
        ({"peer": "not a name"}, ("peer", "server name")),
        ({"wait": "yes"}, ("wait",)),
        ({"before": 10**20}, ("before", "unknown")),
    ]:
        refused(await daemon.admin("POST", target, body), *words)
    refused(await raw(daemon, "POST", target, b'{"limit": 1e400}'), "limit", "integer")
    refused(await raw(daemon, "POST", target, b'{"limit": ' + b"9" * 5000 + b"}"), "not JSON")
    refused(await daemon.admin("POST", target + "?before=100000000000000000000", {}), "before", "unknown")
    refused(await daemon.admin("POST", "/v1/admin/federation/rooms/nope/backfill", {}), "room_id", "room id")
    assert daemon.service.jobs == {}  # nothing was started

    jobs = "/v1/admin/federation/backfills/"
    for job_id in ("9" * 5000, "0", "-1", "abc", "1.0", "%D9%A1", "%20%31", "12345678901"):
        refused(await daemon.admin("GET", jobs + job_id), "job_id")
    assert error_code(await daemon.admin("GET", jobs + "99")) == "not_found"


async def test_query_parameters_are_checked(daemon: InMemory) -> None:
    target = "/v1/admin/federation/descriptor"
    refused(await daemon.admin("GET", target + "?server="), "server", "characters")
    refused(await daemon.admin("GET", target + "?server=a.test&server=b.test"), "server", "twice")
    refused(await daemon.admin("GET", target + "?colour=blue"), "colour", "unknown")
    refused(await daemon.admin("GET", target + "?server=%ff"), "query")
    refused(await daemon.admin("GET", target + "?server"), "query")
    refused(await daemon.admin("GET", "/v1/admin/federation/policy?x=1"), "x", "unknown")
    status, own = await daemon.admin("GET", target)
    assert status == 200 and own["server_name"] == "your-host.test"


async def test_client_bodies(daemon: InMemory) -> None:
    await daemon.admin("POST", "/v1/admin/federation/key/generate")
    await daemon.admin("POST", "/v1/admin/tenants", {"name": "acme"})
    token = (await daemon.admin("POST", "/v1/admin/users", {"name": "alice", "tenant": "acme"}))[1]["access_token"]
    room = (await daemon.request("POST", "/v1/rooms", {}, token=token))[1]["room_id"]  # room_type defaults to group

    async def user(method: str, target: str, body: Any = None) -> tuple[int, Any]:
        return await daemon.request(method, target, body, token=token)

    refused(await user("POST", "/v1/rooms", {"room_type": "dm"}), "room_type")
    refused(await user("POST", "/v1/rooms", {"room_type": 1}), "room_type")
    refused(await user("POST", "/v1/dms", {"to": ["@bob:peer.test"]}), "to", "string")
    refused(await user("POST", "/v1/dms", {"to": "bob"}), "to", "user id")
    refused(await user("POST", "/v1/dms", {}), "to", "required")
    refused(await user("POST", f"/v1/rooms/{room}/invite", {"user": 123}), "user", "string")
    refused(await user("POST", f"/v1/rooms/{room}/invite", {"user": "!room:peer.test"}), "user", "user id")
    for body, words in [({"body": ""}, ("body",)), ({"body": 5}, ("body", "string")), ({}, ("body", "required")),
                        ({"body": "x" * 16_001}, ("body", "16000")), ({"body": "a\udfff"}, ("body", "surrogate")),
                        ({"body": "hi", "sender": "@bob:x"}, ("sender",))]:
        refused(await user("POST", f"/v1/rooms/{room}/messages", body), *words)
    refused(await user("POST", f"/v1/invites/{room}/accept", {"x": 1}), "x", "unknown")
    refused(await user("GET", "/v1/rooms/not-a-room/messages"), "room_id")
    # Free text keeps its newlines and tabs; the whole text is stored.
    text = "line one\n\tline two" + "é" * 15_000
    assert (await user("POST", f"/v1/rooms/{room}/messages", {"body": text}))[0] == 200
    messages = (await user("GET", f"/v1/rooms/{room}/messages"))[1]["messages"]
    assert [m["body"] for m in messages] == [text]


async def test_strangers_get_401_before_any_input_check(daemon: InMemory) -> None:
    answer = await daemon.request("PUT", POLICY, {"default_mode": 5}, token="wrong-token-0123456789")
    assert answer[0] == 401 and error_code(answer) == "unauthorized"
    answer = await daemon.request("GET", "/v1/admin/federation/backfills/" + "9" * 5000)
    assert answer[0] == 401


# -- the field types alone ----------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=10)


@given(json_values)
def test_fields_accept_only_their_type(value: Any) -> None:
    for field, ok in ((Bool(), lambda v: type(v) is bool), (Int(0, 10), lambda v: type(v) is int and 0 <= v <= 10),
                      (Str(max_len=5), lambda v: type(v) is str and 1 <= len(v) <= 5
                       and all(unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn") for c in v))):
        try:
            assert field.parse(value, "f") == value and ok(value)
        except BadInput as exc:
            assert not ok(value) and str(exc).startswith("f: ")


@given(st.text())
def test_integer_text_is_digits_in_range(text: str) -> None:
    try:
        value = Int(1, 2**31 - 1).parse_text(text, "job_id")
    except BadInput as exc:
        assert str(exc).startswith("job_id: ")
    else:
        assert text.isascii() and text.isdigit() and str(value) == text.lstrip("0") and 1 <= value < 2**31


@given(st.binary(max_size=64))
def test_any_body_bytes_parse_or_are_refused(payload: bytes) -> None:
    schema = Obj({"a": Int(), "b": Str()}, required={"a"})
    try:
        parsed = parse_json_body(payload, schema)
    except BadInput as exc:
        assert exc.refusal.code.value == "bad_request"
    else:
        assert set(parsed) <= {"a", "b"} and "a" in parsed


def test_no_body_endpoints_take_nothing_or_an_empty_object() -> None:
    assert parse_json_body(b"", None) == {} == parse_json_body(b" {} ", None)
    with pytest.raises(BadInput, match="unknown field 'x'"):
        parse_json_body(json.dumps({"x": 1}).encode(), None)
    with pytest.raises(BadInput, match="unknown parameter"):
        parse_query([("x", "1")], None)
