"""examples/asyncio_host.py against a real daemon, over real TLS, without Trio.

The daemon (peer.test, started with the testbed) hosts a group room with a few
messages and allows asyncio.test in its policy. The example runs in its own
Python process (so nothing Trio-shaped can help it): it serves its descriptor,
handshakes, receives the daemon's invite, joins, pulls the room's history,
posts a message and receives the daemon user's reply. The
test then checks every pulled event against the daemon's published key and
the hash chain, and that the process never imported trio, httpx or h11.
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

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "asyncio_host.py"
RUNNER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("asyncio_host", sys.argv[1])
host = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host)
events, replies = host.main(sys.argv[2], int(sys.argv[3]), *sys.argv[4:10], seed=bytes([9]) * 32)
from scaiwave_federation.core.wire import b64e
print(json.dumps({"envelopes": [b64e(e.envelope) for e in events], "replies": replies,
                  "imported": sorted(m for m in ("trio", "httpx", "h11", "anyio") if m in sys.modules)}))
"""




def test_asyncio_host_peers_and_backfills_over_tls(tmp_path):
    tb, d, name, port = example_bed(tmp_path, "asyncio.test")
    proc = None
    try:
        d.start()
        token, room_id = host_a_room(d, name)
        bob = {"access_token": token}
        for i in range(5):
            assert d.request("POST", f"/v1/rooms/{room_id}/messages", {"body": f"m{i}"}, token=bob["access_token"])[0] == 200
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(EXAMPLE), name, str(port), str(tmp_path / "cert.pem"),
             str(tmp_path / "key.pem"), str(tb.ca_path), d.server_name, "127.0.0.1", room_id],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # The host handshakes first; once the daemon lists it as active, bob invites its user.
        wait_until(lambda: any(p["server_name"] == name and p["state"] == "active"
                          for p in d.admin("GET", "/v1/admin/federation/peers")[1]["peers"])
              or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()
        status, invited = d.request("POST", f"/v1/rooms/{room_id}/invite", {"user": f"@carol:{name}"},
                                    token=bob["access_token"])
        assert status == 200, invited

        def bodies() -> list:
            messages = d.request("GET", f"/v1/rooms/{room_id}/messages", token=bob["access_token"])[1]["messages"]
            return [m["body"] for m in messages]

        # carol joined, backfilled and posted (a proposal the daemon chained); bob answers her.
        wait_until(lambda: "backfilled" in bodies() or proc.poll() is not None, timeout=60)
        assert bodies()[-1] == "backfilled" and bodies()[:5] == [f"m{i}" for i in range(5)]
        assert d.request("POST", f"/v1/rooms/{room_id}/messages", {"body": "reply to carol"},
                         token=bob["access_token"])[0] == 200
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        descriptor = json.dumps(d.get("/.well-known/scaiwave")).encode()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        tb.stop()
    result = json.loads(out)
    assert result["imported"] == []
    assert result["replies"] == ["reply to carol"]  # pushed to it by the daemon, linked to its chain
    events = [decode_event(b64d(e)) for e in result["envelopes"]]
    assert all(isinstance(e, Event) for e in events)
    # Verify again here, independently, under the key the daemon publishes.
    parsed = parse_descriptor(descriptor, d.server_name)
    assert isinstance(parsed, tuple), parsed
    # carol's join carries the asyncio host's proposal (its seed is fixed): check that too.
    ours = KeyRing().generate(bytes([9]) * 32, 0).public(name)
    checked = verify_events([e.envelope for e in events],
                            lambda s: parsed[0] if s == d.server_name else ours if s == name else None)
    assert all(isinstance(c, Event) for c in checked), checked
    chain = sorted(events, key=lambda e: e.depth)
    assert [e.depth for e in chain] == list(range(1, len(chain) + 1))
    assert chain[0].prev is None and chain[0].type == "m.create"
    for older, newer in zip(chain, chain[1:]):
        assert newer.prev == older.event_id
    bodies = [e.content.get("body") for e in chain if e.type == "m.message"]
    assert bodies == [f"m{i}" for i in range(5)]
    assert chain[-2].type == "m.member" and chain[-2].content == {"membership": "invite", "user": f"@carol:{name}"}
    assert chain[-1].type == "m.member" and chain[-1].content == {"membership": "join", "user": f"@carol:{name}"}
    assert chain[-1].source is not None and chain[-1].sender == f"@carol:{name}"
