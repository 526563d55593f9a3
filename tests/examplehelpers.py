"""What the embedding examples' tests share: a daemon (peer.test) that allows
the example's server and has a group room, and the example's certificate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scaiwave_federation.shell.demo.testbed import Testbed, free_port


def example_bed(tmp_path: Path, host: str) -> tuple[Testbed, Any, str, int]:
    """A testbed whose peer.test daemon resolves ``host`` (with a fresh port) to
    loopback; the example's cert.pem and key.pem are written to ``tmp_path``.
    Returns ``(testbed, daemon, the example's server name, its port)``; the
    daemon is not started yet."""
    tb = Testbed(tmp_path / "tb")
    port = free_port()
    cert = tb.ca.issue_cert(host)
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    d = tb.add("peer.test")
    d.env["SCAIWAVE_RESOLVE"] += f",{host}:{port}:127.0.0.1"
    return tb, d, f"{host}:{port}", port


def host_a_room(d: Any, allowed: str) -> tuple[str, str]:
    """Key, a policy allowing ``allowed``, tenant acme, user bob and a group
    room of his: ``(bob's token, room id)``."""
    d.cli("admin", "federation", "key", "generate", check=True)
    d.cli("admin", "federation", "policy", "set", "--mode", "invite_only", "--allow", allowed, check=True)
    d.cli("admin", "tenant", "create", "acme", check=True)
    bob = d.cli_json("admin", "user", "create", "bob", "--tenant", "acme")["access_token"]
    status, room = d.request("POST", "/v1/rooms", {"room_type": "group"}, token=bob)
    assert status == 200, room
    return bob, room["room_id"]
