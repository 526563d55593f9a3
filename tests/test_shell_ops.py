"""The operator's view of a running daemon: /metrics, /healthz, /readyz.

Two daemons in this process over real sockets and real TLS; storage is the
real SQLite file (a second connection to it plays the other process that
holds its write lock, or the rows an outbox would hold).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import trustme
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from shellhelpers import ADMIN_TOKEN, FED, Remote, error_code, make_env, peered_dm, two_daemons, wait_for
from scaiwave_federation.core import KeyRing, Policy
from scaiwave_federation.core.requests import sign_request
from scaiwave_federation.shell.config import load_config
from scaiwave_federation.shell.observe.metrics import MAX_OPEN_PEER_LABELS, OTHER, labelled_peers, peer_label
from scaiwave_federation.shell.observe.requests import ROUTES, route_template
from scaiwave_federation.shell.runtime.ops import Ops
from scaiwave_federation.shell.runtime.service import Service


async def scrape(server: Remote, token: str | None = ADMIN_TOKEN) -> httpx.Response:
    headers = {"host": server.server_name}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return await server.client.get(f"https://127.0.0.1:{server.port}/metrics", headers=headers,
                                   extensions={"sni_hostname": server.host})


async def samples(server: Remote) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``{sample name: [(labels, value)]}`` from one scrape."""
    resp = await scrape(server)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(found: dict, name: str, **labels: str) -> float:
    matches = [v for lab, v in found.get(name, []) if all(lab.get(k) == want for k, want in labels.items())]
    assert matches, (name, labels, found.get(name))
    return sum(matches)


def db_path(server_root: Path) -> Path:
    return server_root / "data" / "scaiwave.db"


async def test_metrics_need_the_admin_token(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    async with two_daemons(tmp_path, ca) as (a, _b):
        resp = await scrape(a, token=None)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
        resp = await scrape(a, token="not-the-admin-token-at-all")
        assert resp.status_code == 401
        assert (await scrape(a)).status_code == 200


async def test_metrics_count_federation_by_peer_route_and_code(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    async with two_daemons(tmp_path, ca) as (a, b):
        room, alice, _bob = await peered_dm(a, b)
        assert (await a.request("POST", f"/v1/rooms/{room}/messages", {"body": "hi"}, token=alice))[0] == 200
        A, B = a.server_name, b.server_name

        async def delivered():
            return value(await samples(b), "scaiwave_requests_received_total", route=f"{FED}/send/{{txn_id}}",
                         peer=A, code="ok") >= 2
        await wait_for(delivered)
        on_a, on_b = await samples(a), await samples(b)
        # In: B served A's transactions, named by A (allowed_peers) and a route template.
        assert value(on_b, "scaiwave_requests_received_total", method="POST", route=f"{FED}/handshake", peer=A,
                     code="ok") == 1
        assert value(on_b, "scaiwave_request_authentications_total", peer=A, code="ok") >= 3
        assert value(on_b, "scaiwave_signatures_verified_total", result="valid") >= 2
        assert value(on_b, "scaiwave_signature_batch_duration_seconds_count") >= 1
        # Out: A's requests to B, and the user API without a peer.
        assert value(on_a, "scaiwave_requests_sent_total", peer=B, method="PUT", route=f"{FED}/send/{{txn_id}}",
                     code="ok") >= 2
        assert value(on_a, "scaiwave_requests_sent_total", peer=B, route="/.well-known/scaiwave", code="ok") >= 1
        assert value(on_a, "scaiwave_requests_received_total", method="POST",
                     route="/v1/rooms/{room_id}/messages", peer="", code="ok") == 1
        assert value(on_a, "scaiwave_request_duration_seconds_count", route="/v1/dms") == 1
        # Raw ids never become labels.
        text = (await scrape(a)).text + (await scrape(b)).text
        assert room not in text and room.split(":")[0] not in text
        # Handshake state and keys.
        assert value(on_a, "scaiwave_peers", peer=B, state="active") == 1
        assert value(on_b, "scaiwave_peers", peer=A, state="active") == 1
        assert value(on_a, "scaiwave_federation_key_present") == 1
        assert 0 <= value(on_a, "scaiwave_federation_key_age_seconds") < 60
        assert 364 * 86400 < value(on_a, "scaiwave_federation_key_rotation_due_seconds") <= 365 * 86400
        assert value(on_a, "scaiwave_peer_failures", peer=B) == 0
        # A backfill job and the events it stored.
        status, job = await b.admin("POST", f"/v1/admin/federation/rooms/{room}/backfill", {"peer": A, "wait": True})
        assert status == 200 and job["state"] == "done", job
        on_b = await samples(b)
        assert value(on_b, "scaiwave_backfill_jobs", kind="admin", state="done") == 1
        assert value(on_b, "scaiwave_backfill_jobs", kind="admin", state="failed") == 0
        assert value(on_b, "scaiwave_backfill_events_stored_total", kind="admin") == job["stored"]
        # A refused request is counted under its code.
        status, _ = await a.request("GET", "/v1/rooms", token="swu_not-a-token")
        assert status == 401
        assert value(await samples(a), "scaiwave_requests_received_total", route="/v1/rooms",
                     code="unauthorized") == 1


async def test_outbox_depth_and_age_per_peer(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    async with two_daemons(tmp_path, ca) as (a, b):
        policy = {"default_mode": "invite_only", "allowed_peers": [b.server_name], "blocked_peers": []}
        assert (await a.admin("PUT", "/v1/admin/federation/policy", policy))[0] == 200
        # Rows as the outbox holds them: two for B queued 90 s ago, one for a
        # server nobody allowed (counted as "other"). Not due for a day.
        created = int(time.time() * 1000) - 90_000
        with sqlite3.connect(db_path(tmp_path / "a")) as conn:
            for i, peer in enumerate([b.server_name, b.server_name, "stranger.example"]):
                conn.execute("INSERT INTO outbox (peer, txn_id, path, body, created_at, next_attempt_at)"
                             " VALUES (?, ?, ?, ?, ?, ?)", (peer, f"t{i}", f"{FED}/send/t{i}", b"\xa0",
                                                            created + i, created + 86_400_000))
        found = await samples(a)
        assert value(found, "scaiwave_outbox_depth", peer=b.server_name) == 2
        assert value(found, "scaiwave_outbox_depth", peer=OTHER) == 1
        assert 90 <= value(found, "scaiwave_outbox_oldest_age_seconds", peer=b.server_name) < 120
        assert "stranger.example" not in (await scrape(a)).text


async def test_claimed_peers_beyond_policy_are_counted_as_other(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    async with two_daemons(tmp_path, ca) as (a, b):
        await peered_dm(a, b)
        key = KeyRing().generate(b"\x09" * 32, 0).current
        assert key is not None
        for i in range(30):
            # Not admitted by policy: refused before any key lookup (policy
            # admission of the claimed origin comes first), but the request
            # still claims an origin of the attacker's choosing.
            origin = f"evil-{i}.example"
            auth = sign_request(key, origin=origin, destination="elsewhere.example", method="POST",
                                target=f"{FED}/handshake", body=b"", now=0)
            resp = await b.client.post(f"https://127.0.0.1:{b.port}{FED}/handshake", content=b"",
                                       headers={"host": b.server_name, "authorization": auth},
                                       extensions={"sni_hostname": b.host})
            assert resp.status_code == 403
        found = await samples(b)
        peers = {lab["peer"] for lab, _ in found["scaiwave_requests_received_total"]}
        assert peers == {"", a.server_name, OTHER}
        assert value(found, "scaiwave_requests_received_total", route=f"{FED}/handshake", peer=OTHER,
                     code="peer_not_allowed") == 30
        assert "evil-" not in (await scrape(b)).text


_names = st.from_regex(r"[a-z]{1,8}\.(test|example)(:[1-9][0-9]{0,3})?", fullmatch=True)


@given(allowed=st.sets(_names, max_size=5), blocked=st.sets(_names, max_size=3),
       rows=st.lists(st.tuples(_names, st.sampled_from(["active", "known", None])), max_size=120),
       mode=st.sampled_from(["open", "invite_only", "closed"]))
def test_peer_labels_are_bounded_and_chosen_by_our_admin(allowed, blocked, rows, mode) -> None:
    policy = Policy(mode, frozenset(allowed), frozenset(blocked))
    # The policy keeps names canonical (aa.test:443 is aa.test): judge by its lists.
    allowed, blocked = set(policy.allowed_peers), set(policy.blocked_peers)
    peers = [{"server_name": name, "state": state} for name, state in rows]
    labelled = labelled_peers(policy, peers)
    assert labelled == labelled_peers(policy, list(reversed(peers)))  # order does not matter
    assert not labelled & blocked
    assert allowed - blocked <= labelled
    extra = labelled - allowed
    assert len(extra) <= (MAX_OPEN_PEER_LABELS if mode == "open" else 0)
    assert all(any(p["server_name"] == n and p["state"] == "active" for p in peers) for n in extra)
    for name, _ in rows:
        assert peer_label(name, labelled) == (name if name in labelled else OTHER)
    assert len({peer_label(name, labelled) for name, _ in rows}) <= len(labelled) + 1
    assert peer_label(None, labelled) == ""


async def test_healthz_and_readyz_give_the_reason(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    async with two_daemons(tmp_path, ca) as (a, _b):
        assert await a.request("GET", "/healthz") == (200, {"alive": True})
        status, body = await a.request("GET", "/readyz")
        assert status == 503 and body["ready"] is False
        assert body["checks"] == {"storage": "ok", "listener": "ok",
                                  "key": "no federation key: run `scaiwave admin federation key generate`"}
        assert body["reason"] == "key: no federation key: run `scaiwave admin federation key generate`"
        assert (await a.admin("POST", "/v1/admin/federation/key/generate"))[0] == 200
        assert await a.request("GET", "/readyz") == (200, {"ready": True, "checks": {
            "storage": "ok", "key": "ok", "listener": "ok"}})
        # Another process holds the database's write lock: not ready, and why.
        holder = sqlite3.connect(db_path(tmp_path / "a"), isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")

            async def not_ready():
                status, body = await a.request("GET", "/readyz")
                return body if status == 503 else None
            body = await wait_for(not_ready)
            assert body["checks"]["storage"] == "not writable: database is locked"
            assert body["reason"] == "storage: not writable: database is locked"
            assert (await a.request("GET", "/healthz"))[0] == 200  # alive all the same
        finally:
            holder.execute("ROLLBACK")
            holder.close()

        async def ready():
            return (await a.request("GET", "/readyz"))[0] == 200
        await wait_for(ready)
        # Probes take GET only.
        assert error_code(await a.request("POST", "/readyz")) == "method_not_allowed"


async def test_readiness_names_a_listener_not_up_and_a_closed_database(tmp_path: Path,
                                                                       ca: tuple[trustme.CA, Path]) -> None:
    authority, ca_path = ca
    service = await Service.open(load_config(make_env(tmp_path / "a", ca_path, authority, "your-host.test")))
    ops = Ops(service)  # as the daemon builds it, before the listener is up
    await service.generate_key()
    status, body = await ops.health.ready()
    assert status == 503 and body["checks"] == {
        "storage": "ok", "key": "ok", "listener": "the HTTPS listener is not up (starting or shutting down)"}
    ops.health.listening = True
    ops.health.forget()
    assert (await ops.health.ready())[0] == 200
    await service.aclose()
    ops.health.forget()
    status, body = await ops.health.ready()
    assert status == 503 and body["checks"]["storage"].startswith("not writable: ")
    assert body["reason"].startswith("storage: not writable: ")


_segment = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="/?#"), min_size=1,
                   max_size=30)


@given(template=st.sampled_from(ROUTES), values=st.lists(_segment, min_size=3, max_size=3))
def test_a_filled_route_template_is_found_again(template: str, values: list[str]) -> None:
    parts = template.split("/")
    filled = iter(values)
    path = "/".join(next(filled) if p.startswith("{") else p for p in parts)
    assert route_template(path) == template


@given(path=st.text(max_size=200))
def test_any_path_gets_a_bounded_label(path: str) -> None:
    assert route_template(path) in (*ROUTES, "other")


@given(st.lists(st.tuples(st.sampled_from(["GET", "POST", "BREW"]), st.sampled_from(ROUTES[:4]),
                          st.sampled_from(["ok", "not_found", "nonsense"]),
                          st.floats(min_value=0, max_value=500, allow_nan=False)), max_size=30))
def test_requests_received_expose_what_prometheus_metrics_would(requests: list) -> None:
    """count_received keeps plain counts; a scrape shows them exactly as
    prometheus_client's Counter and Histogram fed the same requests would."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from scaiwave_federation.shell.observe import metrics as m

    reference = CollectorRegistry()
    count = Counter("scaiwave_requests_received", "HTTP requests served, by route template, claimed peer "
                    "(federation) and outcome code", ["method", "route", "peer", "code"], registry=reference)
    seconds = Histogram("scaiwave_request_duration_seconds", "Time to answer an HTTP request", ["method", "route"],
                        buckets=m._LATENCY, registry=reference)
    metrics = m.Metrics.__new__(m.Metrics)  # the counting half only: no service to read at scrape time
    metrics._received, metrics._received_seconds, metrics.labelled = {}, {}, frozenset()
    for method, route, code, duration in requests:
        metrics.count_received(method, route, None, code, duration)
        shown = method if method != "BREW" else OTHER
        count.labels(shown, route, "", code if code != "nonsense" else OTHER).inc()
        seconds.labels(shown, route).observe(duration)
    ours = CollectorRegistry()
    ours.register(m._ReceivedCollector(metrics))
    assert generate_latest(ours) == generate_latest(reference)
