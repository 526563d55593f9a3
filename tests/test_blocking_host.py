"""examples/blocking_host.py against a real daemon, over real TLS, with threads only.

The daemon (peer.test, a testbed process) hosts a group room. The example runs
in its own Python process with no event loop (http.server, http.client, ssl,
threads): it peers, is invited, joins and posts through signed proposals,
backfills the room, and receives a reply pushed by the daemon. The test checks
both directions on both sides, every event against the published keys and the
hash chain, and that the process imported no event loop or async HTTP stack.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scaiwave_federation.core import Event, KeyRing, decode_event, parse_descriptor, verify_events
from scaiwave_federation.core.wire import b64d
from scaiwave_federation.shell.demo.testbed import wait_until

from examplehelpers import example_bed, host_a_room

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "blocking_host.py"
SEED = bytes([10]) * 32
RUNNER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("blocking_host", sys.argv[1])
host = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host)
out = host.main(sys.argv[2], int(sys.argv[3]), *sys.argv[4:9], seed=bytes([10]) * 32)
from scaiwave_federation.core.wire import b64e
print(json.dumps({"room_id": out["room_id"], "chain": [b64e(e) for e in out["chain"]], "received": out["received"],
                  "imported": sorted(m for m in ("trio", "httpx", "h11", "anyio", "asyncio") if m in sys.modules)}))
"""


def test_blocking_host_peers_exchanges_messages_both_ways_and_backfills(tmp_path):
    tb, d, name, port = example_bed(tmp_path, "blocking.test")
    proc = None
    try:
        d.start()
        bob, room_id = host_a_room(d, name)
        for text in ("first", "second"):
            assert d.request("POST", f"/v1/rooms/{room_id}/messages", {"body": text}, token=bob)[0] == 200
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(EXAMPLE), name, str(port), str(tmp_path / "cert.pem"),
             str(tmp_path / "key.pem"), str(tb.ca_path), d.server_name, "127.0.0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_until(lambda: any(p["server_name"] == name and p["state"] == "active"
                               for p in d.admin("GET", "/v1/admin/federation/peers")[1]["peers"])
                   or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()
        assert d.request("POST", f"/v1/rooms/{room_id}/invite", {"user": f"@dave:{name}"}, token=bob)[0] == 200

        def bodies() -> list:
            return [m["body"] for m in d.request("GET", f"/v1/rooms/{room_id}/messages", token=bob)[1]["messages"]]

        # The blocking host's user joined and wrote, through proposals the daemon chained.
        wait_until(lambda: "backfilled" in bodies() or proc.poll() is not None, timeout=60)
        assert bodies() == ["first", "second", "hello from a blocking host", "backfilled"]
        assert d.request("POST", f"/v1/rooms/{room_id}/messages", {"body": "reply to dave"}, token=bob)[0] == 200
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        descriptor = json.dumps(d.get("/.well-known/scaiwave")).encode()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        tb.stop()
    result = json.loads(out)
    assert result["imported"] == [] and result["room_id"] == room_id
    assert result["received"] == ["reply to dave"]
    events = [decode_event(b64d(e)) for e in result["chain"]]
    parsed = parse_descriptor(descriptor, d.server_name)
    assert isinstance(parsed, tuple), parsed
    ours = KeyRing().generate(SEED, 0).public(name)
    checked = verify_events([e.envelope for e in events],
                            lambda s: parsed[0] if s == d.server_name else ours if s == name else None)
    assert all(isinstance(c, Event) for c in checked), checked
    assert [e.depth for e in events] == list(range(1, len(events) + 1))
    for older, newer in zip(events, events[1:]):
        assert newer.prev == older.event_id
    mine = [e for e in events if e.sender == f"@dave:{name}"]
    assert [(e.type, e.content) for e in mine] == [
        ("m.member", {"membership": "join", "user": f"@dave:{name}"}),
        ("m.message", {"body": "hello from a blocking host"}), ("m.message", {"body": "backfilled"})]
    assert all(e.source is not None for e in mine)
    assert [e.content.get("body") for e in events if e.type == "m.message"] == [
        "first", "second", "hello from a blocking host", "backfilled", "reply to dave"]
