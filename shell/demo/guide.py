"""``scaiwave demo``: the admin guide, end to end, on two real daemons.

Starts ``your-host.test`` and ``peer.test`` with :class:`~.testbed.Testbed`
(real ``scaiwave serve`` processes on loopback, certificates from a throwaway
trustme CA, names resolved with ``SCAIWAVE_RESOLVE`` so TLS still checks them)
and walks every step of the federation guide as an admin would: the exact
``scaiwave`` command or HTTP call, what came back, and each server's peers
table where it matters. Every step's result is checked against what the guide
says; a mismatch stops the demo with a :class:`DemoError` (exit 1), so
``make demo`` fails loudly when something regresses. Both daemons are stopped
however the demo ends.

The directory (default ``demo-run/``) is wiped at the start, but only if it is
empty or holds an earlier demo run, and keeps each server's ``server.log``,
``data/`` (SQLite), ``recording.cbor`` (its federation traffic, for
``scaiwave replay``), certificate and key afterwards.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from .testbed import Server, Testbed

__all__ = ["run_demo", "DemoError"]

MARKER = ".scaiwave-demo"
BACKFILL_ROOM_MESSAGES = 150
WIDTH = 100
RECORDING = "recording.cbor"


class DemoError(Exception):
    """A step did not give the result the guide promises."""


# -- printing ------------------------------------------------------------------


def _say(text: str = "") -> None:
    print(text, flush=True)


def _header(title: str) -> None:
    _say()
    _say("=" * WIDTH)
    _say(title)
    _say("=" * WIDTH)


def _note(text: str) -> None:
    for line in textwrap.wrap(" ".join(text.split()), WIDTH - 2):
        _say(f"  {line}")


def _out(text: str, prefix: str = "    ") -> None:
    for line in text.rstrip("\n").splitlines():
        _say(f"{prefix}{line}")


def _short(data: Any, limit: int = 160) -> str:
    text = json.dumps(data, separators=(", ", ": ")) if not isinstance(data, (bytes, str)) else repr(data)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise DemoError(message)


# -- the demo ------------------------------------------------------------------


class _Demo:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.bed = Testbed(directory)
        # Each daemon records its federation traffic (SCAIWAVE_RECORD) for `scaiwave replay`.
        self.you = self.bed.add("your-host.test", extra={"SCAIWAVE_RECORD": str(directory / "your-host.test" / RECORDING)})
        self.peer = self.bed.add("peer.test", extra={"SCAIWAVE_RECORD": str(directory / "peer.test" / RECORDING)})
        self.tokens: dict[str, str] = {}  # user id -> access token

    # Commands and calls, printed as an admin or a user would type them.

    def cli(self, server: Server, *args: str, fail: bool = False) -> str:
        """Run ``scaiwave ARGS`` as ``server``'s admin; print it and its output.

        With ``fail=True`` the command must fail; returns the error code."""
        typed = shlex.join(["scaiwave", *args])  # as typed in a shell: room ids start with "!"
        _say(f"  [{server.name} admin]$ {typed}")
        proc = server.cli(*args)
        _out(proc.stdout)
        stderr = [line for line in proc.stderr.splitlines()
                  if line.strip() and not line.startswith("backfill:") and " INFO " not in line]
        _out("\n".join(stderr))
        if fail:
            _check(proc.returncode != 0, f"`{typed}` on {server.name} should have failed")
            lines = [line for line in stderr if line.startswith("error: ")]
            _check(bool(lines), f"`{typed}` printed no error line: {proc.stderr[-500:]}")
            return lines[-1].split(":")[1].strip()
        _check(proc.returncode == 0,
               f"`{typed}` on {server.name} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
        return proc.stdout

    def call(self, server: Server, method: str, path: str, body: Any = None, *, user: str | None = None,
             show: Callable[[Any], str] | None = None, expect: int | None = 200) -> tuple[int, Any]:
        """One HTTPS request to ``server`` by name; prints the call and a short answer."""
        who = f"{user.split(':')[0].lstrip('@')}@{server.name}" if user else server.name
        line = f"  [{who}] {method} https://{server.server_name}{path}"
        if body is not None:
            line += f"  {json.dumps(body)}"
        _say(line)
        status, data = server.request(method, path, body, token=self.tokens[user] if user else None)
        text = show(data) if show and status == 200 else _short(data)
        if "\n" in text:
            _say(f"    <- {status}")
            _out(text, prefix="      ")
        else:
            _say(f"    <- {status} {text}")
        if expect is not None:
            _check(status == expect,
                   f"{method} {path} on {server.name}: expected HTTP {expect}, got {status}: {_short(data, 400)}")
        return status, data

    def admin_get(self, server: Server, path: str) -> Any:
        """A silent admin API read, for checking what the printed command showed."""
        status, data = server.admin("GET", path)
        _check(status == 200, f"GET {path} on {server.name}: HTTP {status}: {_short(data)}")
        return data

    def peer_row(self, server: Server, other: Server) -> dict[str, Any]:
        rows = [p for p in self.admin_get(server, "/v1/admin/federation/peers")["peers"]
                if p["server_name"] == other.server_name]
        _check(bool(rows), f"{server.name} has no peers row for {other.server_name}")
        return rows[0]

    def wait(self, what: str, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.1)

    def history(self, server: Server, user: str, room_id: str) -> list[tuple[str, str, str]]:
        status, data = server.request("GET", f"/v1/rooms/{room_id}/messages", token=self.tokens[user])
        _check(status == 200, f"GET messages of {room_id} as {user}: HTTP {status}: {_short(data)}")
        return [(m["event_id"], m["sender"], m["body"]) for m in data["messages"]]

    def create_user(self, server: Server, name: str, tenant: str) -> str:
        out = self.cli(server, "admin", "user", "create", name, "--tenant", tenant)
        lines = out.splitlines()
        _check(len(lines) == 2 and lines[1].startswith("access_token: "), f"user create printed {out!r}")
        user_id, token = lines[0].strip(), lines[1].split(": ", 1)[1].strip()
        self.tokens[user_id] = token
        return user_id

    # The steps.

    def run(self) -> None:
        you, peer = self.you, self.peer
        _header("Setup: two servers on loopback, real TLS")
        _note(f"A throwaway CA ({self.bed.ca_path}) issued a certificate for each name; SCAIWAVE_RESOLVE sends the "
              "names to 127.0.0.1, so every connection still checks the certificate against the name. "
              "your-host.test is configured with:")
        for key, value in sorted(you.env.items()):
            _say(f"    {key}={value}")
        _note("peer.test likewise, with its own port, data directory, certificate and admin token. "
              "The `scaiwave admin ...` commands below read the same settings and talk to the daemon over HTTPS.")
        you.start()
        peer.start()
        _say(f"  started your-host.test on port {you.port} and peer.test on port {peer.port}")

        self.step1()
        self.step2()
        self.step3()
        self.step4()
        dm = self.step5()
        self.step6()
        self.step7(dm)
        self.step8(dm)
        self.cannot_federate()

    def step1(self) -> None:
        you = self.you
        _header("1. Verify your /.well-known")
        _note("Hit your own descriptor first. A new server has no federation key yet: public_key is empty.")
        _, desc = self.call(you, "GET", "/.well-known/scaiwave", show=lambda d: json.dumps(d, indent=2))
        _check(desc["server_name"] == you.server_name, f"descriptor names {desc['server_name']}")
        _check(desc["public_key"] == "", "a new server's descriptor should have an empty public_key")
        _note("public_key is empty, so: run `scaiwave admin federation key generate`.")
        self.cli(you, "admin", "federation", "key", "generate")
        _, desc = self.call(you, "GET", "/.well-known/scaiwave", show=lambda d: json.dumps(d, indent=2))
        _check(bool(desc["public_key"]) and bool(desc["signature"]), "the descriptor has no key after key generate")
        _check(desc["key_id"] == self.admin_get(you, "/v1/admin/federation/key")["key_id"], "descriptor key_id differs")

    def step2(self) -> None:
        you, peer = self.you, self.peer
        _header("2. Check the peer's descriptor")
        _note("Your daemon fetches the peer's descriptor over verified TLS and checks its name and signature. "
              "peer.test's admin has not provisioned a key yet:")
        code = self.cli(you, "admin", "federation", "descriptor", "--server", peer.server_name, fail=True)
        _check(code == "invalid_descriptor", f"a keyless peer descriptor gave {code}, expected invalid_descriptor")
        _note("If the peer doesn't publish a usable descriptor, federation isn't possible. "
              "peer.test's admin does step 1 on their side:")
        self.cli(peer, "admin", "federation", "key", "generate")
        out = self.cli(you, "admin", "federation", "descriptor", "--server", peer.server_name)
        desc = json.loads(out)
        _check(desc["server_name"] == peer.server_name and desc["public_key"], f"peer descriptor: {_short(desc)}")

    def step3(self) -> None:
        you, peer = self.you, self.peer
        _header("3. Update your federation policy")
        _note("invite_only: only accept peers in allowed_peers (open: anyone not blocked; closed: no one).")
        self.cli(you, "admin", "federation", "policy", "set", "--mode", "invite_only", "--allow", peer.server_name)
        policy = self.admin_get(you, "/v1/admin/federation/policy")
        _check(policy == {"default_mode": "invite_only", "allowed_peers": [peer.server_name], "blocked_peers": []},
               f"policy after set: {policy}")

    def step4(self) -> None:
        you, peer = self.you, self.peer
        _header("4. Have the peer reciprocate")
        _note("Both must agree. Before peer.test lists you in its allowed_peers, a handshake is refused "
              "by peer.test's policy:")
        code = self.cli(you, "admin", "federation", "handshake", peer.server_name, fail=True)
        _check(code == "peer_not_allowed", f"handshake before reciprocation gave {code}, expected peer_not_allowed")
        _note("peer.test's admin runs the same setup pointed at your server:")
        self.cli(peer, "admin", "federation", "descriptor", "--server", you.server_name)
        self.cli(peer, "admin", "federation", "policy", "set", "--mode", "invite_only", "--allow", you.server_name)
        _note("Now the handshake: protocol version negotiation, each side proves it holds its key, "
              "each side's policy applied.")
        self.cli(you, "admin", "federation", "handshake", peer.server_name)
        self.cli(you, "admin", "federation", "peers")
        self.cli(peer, "admin", "federation", "peers")
        _check(self.peer_row(you, peer)["state"] == "active", "your-host does not list peer.test as active")
        _check(self.peer_row(peer, you)["state"] == "active", "peer.test does not list your-host as active")

    def step5(self) -> str:
        you, peer = self.you, self.peer
        _header("5. Test with a federated DM")
        _note("Each admin creates a tenant and a user (the command prints the user's access token):")
        self.cli(you, "admin", "tenant", "create", "acme")
        alice = self.create_user(you, "alice", "acme")
        self.cli(peer, "admin", "tenant", "create", "globex")
        bob = self.create_user(peer, "bob", "globex")
        self.alice, self.bob = alice, bob
        _note("alice opens a DM with bob; your-host hosts the room and sends bob's server a signed invite:")
        _, dm = self.call(you, "POST", "/v1/dms", {"to": bob}, user=alice)
        room = dm["room_id"]
        _note("bob gets the invite in his notification panel:")
        _, notes = self.call(peer, "GET", "/v1/notifications", user=bob, show=_notifications)
        _check(any(n["room_id"] == room and n["inviter"] == alice for n in notes["notifications"]),
               f"bob's notifications lack the invite to {room}: {_short(notes)}")
        _note("He accepts; the DM is operational. Messages both ways:")
        self.call(peer, "POST", f"/v1/invites/{room}/accept", user=bob)
        self.call(you, "POST", f"/v1/rooms/{room}/messages", {"body": "hi bob, federation works"}, user=alice)
        self.call(peer, "POST", f"/v1/rooms/{room}/messages", {"body": "hi alice, it does"}, user=bob)
        self.wait("alice's message to reach peer.test",
                  lambda: len(self.history(peer, bob, room)) == len(self.history(you, alice, room)))
        def show(d: dict) -> str:
            return "\n".join(f"  depth {m['depth']:>3}  {m['sender']}: {m['body']}" for m in d["messages"])

        _note("Both servers now hold the same history:")
        self.call(you, "GET", f"/v1/rooms/{room}/messages", user=alice, show=show)
        self.call(peer, "GET", f"/v1/rooms/{room}/messages", user=bob, show=show)
        mine, theirs = self.history(you, alice, room), self.history(peer, bob, room)
        _check(len(mine) == 2 and mine == theirs, f"histories differ: {mine} vs {theirs}")
        return room

    def step6(self) -> None:
        you, peer, alice, bob = self.you, self.peer, self.alice, self.bob
        _header("6. Backfill")
        _note(f"bob creates a group room on peer.test and posts {BACKFILL_ROOM_MESSAGES} messages before alice joins:")
        _, created = self.call(peer, "POST", "/v1/rooms", {"room_type": "group"}, user=bob)
        room = created["room_id"]
        _say(f"  [bob@{peer.name}] POST https://{peer.server_name}/v1/rooms/{room}/messages  "
             f"{{\"body\": \"message N\"}}   x {BACKFILL_ROOM_MESSAGES}")
        _post_many(peer, self.tokens[bob], room, [f"message {i}" for i in range(1, BACKFILL_ROOM_MESSAGES + 1)])
        _say(f"    <- 200 x {BACKFILL_ROOM_MESSAGES}")
        self.call(peer, "POST", f"/v1/rooms/{room}/invite", {"user": alice}, user=bob)
        _, notes = self.call(you, "GET", "/v1/notifications", user=alice, show=_notifications)
        _check(any(n["room_id"] == room for n in notes["notifications"]), f"alice has no invite to {room}")
        self.call(you, "POST", f"/v1/invites/{room}/accept", user=alice)
        _, before = self.call(you, "GET", f"/v1/rooms/{room}/messages", user=alice,
                              show=lambda d: f"{len(d['messages'])} messages, {d['events']} events stored on your-host")
        _note("alice joined an already-existing room: your-host has only her join. Pull history from the peer "
              "(every event's hash, signature and chain link is checked before it is stored):")
        out = self.cli(you, "admin", "federation", "backfill", room, "--from", peer.server_name, "--limit", "100")
        _check("backfill done: 100 verified events stored" in out, f"backfill --limit 100 printed {out!r}")
        _, after = self.call(you, "GET", f"/v1/rooms/{room}/messages", user=alice,
                             show=lambda d: f"{len(d['messages'])} messages, {d['events']} events stored on your-host")
        _check(after["events"] == before["events"] + 100, f"stored events went {before['events']} -> {after['events']}")
        _note("Run again without --limit (default and cap: 1000): it continues below what is stored, "
              "back to the room's first event, storing nothing twice:")
        out = self.cli(you, "admin", "federation", "backfill", room, "--from", peer.server_name)
        _, full = self.call(you, "GET", f"/v1/rooms/{room}/messages", user=alice,
                            show=lambda d: f"{len(d['messages'])} messages, {d['events']} events stored on your-host")
        _check(len(full["messages"]) == BACKFILL_ROOM_MESSAGES, f"after the full backfill: {len(full['messages'])} messages")
        theirs = self.history(peer, bob, room)
        _check(self.history(you, alice, room) == theirs, "backfilled history differs from the host's")
        _note(f"All {BACKFILL_ROOM_MESSAGES} messages, identical to peer.test's copy.")

    def step7(self, dm: str) -> None:
        you, peer, alice, bob = self.you, self.peer, self.alice, self.bob
        _header("7. Monitor")
        _note("GET /v1/admin/federation/peers (`scaiwave admin federation peers`) lists each peer with last_seen "
              "and last_error:")
        self.cli(you, "admin", "federation", "peers")
        _check(self.peer_row(you, peer)["last_error"] is None, "last_error is set before anything failed")
        _note("Now peer.test goes down, and alice writes in the DM: your-host queues the event and fails to "
              "deliver it.")
        peer.stop()
        _say("  (stopped peer.test)")
        self.call(you, "POST", f"/v1/rooms/{dm}/messages", {"body": "are you there?"}, user=alice)
        self.wait("your-host to record the failure", lambda: self.peer_row(you, peer)["last_error"] is not None)
        self.cli(you, "admin", "federation", "peers")
        error = self.peer_row(you, peer)["last_error"]
        _check(error["code"] == "peer_unreachable", f"last_error is {error}, expected peer_unreachable")
        _note("Their server is down: wait. Once it is back, retry the queued traffic now instead of at the "
              "next backoff:")
        peer.start()
        _say("  (started peer.test again)")
        self.cli(you, "admin", "federation", "retry", peer.server_name)
        self.wait("the queued message to reach peer.test", lambda: self.peer_row(you, peer)["last_error"] is None
                  and self.peer_row(you, peer)["pending"] == 0)
        self.cli(you, "admin", "federation", "peers")
        self.wait("bob to see alice's message", lambda: bool(self.history(peer, bob, dm)[-1:]) and
                  self.history(peer, bob, dm)[-1][2] == "are you there?")
        _note("If their /.well-known returns another key than the one cached, refresh the participant's server "
              "keys (POST /v1/admin/federation/foreign/{participant_id}/refresh):")
        out = self.cli(you, "admin", "federation", "refresh", bob)
        _check(out.startswith(peer.server_name), f"refresh printed {out!r}")

    def step8(self, dm: str) -> None:
        you, peer, alice, bob = self.you, self.peer, self.alice, self.bob
        _header("8. Rotate your federation key")
        _note("peer.test's admin rotates its key: a new keypair is published on /.well-known, the old one stays "
              "in old_keys (accepted for 30 days).")
        old_key = self.peer_row(you, peer)["key_id"]
        self.cli(peer, "admin", "federation", "key", "rotate")
        new_key = self.admin_get(peer, "/v1/admin/federation/key")["key_id"]
        _check(new_key != old_key, "key rotate did not change the key id")
        _, desc = self.call(peer, "GET", "/.well-known/scaiwave", show=lambda d: f"key_id {d['key_id']}, old_keys "
                            + ", ".join(f"{o['key_id']} (expired_at {o['expired_at']})" for o in d["old_keys"]))
        _check(desc["key_id"] == new_key and [o["key_id"] for o in desc["old_keys"]] == [old_key],
               f"peer.test's descriptor after rotation: {_short(desc)}")
        _note("bob writes in the DM hosted on your-host. The request is signed with a key id your-host has never "
              "seen, so your-host re-fetches peer.test's descriptor by itself, then accepts it. (A server re-fetches "
              "a descriptor at most once a second, and step 7 fetched this one moments ago: if the first try comes "
              "within that second, your-host refuses it for the moment with unknown_key and peer.test tries once "
              "more a little later.)")
        self.call(peer, "POST", f"/v1/rooms/{dm}/messages", {"body": "signed with my new key"}, user=bob)
        self.call(you, "GET", f"/v1/rooms/{dm}/messages", user=alice,
                  show=lambda d: "\n".join(f"  {m['sender']}: {m['body']}" for m in d["messages"][-2:]))
        _check(self.history(you, alice, dm)[-1][1:] == (bob, "signed with my new key"),
               "your-host did not accept bob's message after the rotation")
        self.cli(you, "admin", "federation", "peers")
        _check(self.peer_row(you, peer)["key_id"] == new_key, f"your-host still caches {self.peer_row(you, peer)['key_id']}")

    def cannot_federate(self) -> None:
        you, peer, alice, bob = self.you, self.peer, self.alice, self.bob
        _header("What can't be federated")
        _note("alice creates an incognito, a bridge and a sidekick room and tries to invite bob into each:")
        rooms = {}
        for room_type, code in (("incognito", "room_incognito"), ("bridge", "room_bridge"),
                                ("sidekick", "room_sidekick")):
            _, created = self.call(you, "POST", "/v1/rooms", {"room_type": room_type}, user=alice)
            rooms[room_type] = created["room_id"]
            _, err = self.call(you, "POST", f"/v1/rooms/{created['room_id']}/invite", {"user": bob}, user=alice,
                               expect=403)
            _check(err["error"]["code"] == code, f"inviting bob into a {room_type} room gave {err}, expected {code}")
        _note("A tenant with federation disabled tenant-wide:")
        self.cli(you, "admin", "tenant", "create", "internal", "--federation", "disabled")
        carol = self.create_user(you, "carol", "internal")
        _, created = self.call(you, "POST", "/v1/rooms", {"room_type": "group"}, user=carol)
        _, err = self.call(you, "POST", f"/v1/rooms/{created['room_id']}/invite", {"user": bob}, user=carol,
                           expect=403)
        _check(err["error"]["code"] == "tenant_federation_disabled", f"got {err}")
        _note("The federation endpoint refuses them too: peer.test asking your-host for the incognito room's history")
        code = self.cli(peer, "admin", "federation", "backfill", rooms["incognito"], "--from", you.server_name,
                        fail=True)
        _check(code == "room_incognito", f"backfill of an incognito room gave {code}, expected room_incognito")


def _notifications(data: dict[str, Any]) -> str:
    return "; ".join(f"{n['type']} to {n['room_type']} {n['room_id']} from {n['inviter']}"
                     for n in data["notifications"]) or "no notifications"


def _post_many(server: Server, token: str, room_id: str, bodies: list[str]) -> None:
    """Post messages quietly (the testbed's client keeps its HTTPS connection alive)."""
    for body in bodies:
        status, data = server.request("POST", f"/v1/rooms/{room_id}/messages", {"body": body}, token=token)
        _check(status == 200, f"posting {body!r}: HTTP {status}: {_short(data, 300)}")


def _prepare(directory: Path) -> None:
    """Remove an earlier demo run, refusing to touch a directory that is not one."""
    if directory.exists():
        if not directory.is_dir():
            raise DemoError(f"{directory} exists and is not a directory")
        if any(directory.iterdir()) and not (directory / MARKER).exists():
            raise DemoError(f"{directory} is not empty and is not an earlier demo run: "
                            "choose another --dir (the demo wipes its directory)")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / MARKER).write_text("made by `scaiwave demo`; the next run deletes this directory\n")


def run_demo(directory: Path) -> int:
    """Run the demo in ``directory``; returns 0 when every step matched the guide, else 1."""
    directory = Path(directory).absolute()
    started = time.monotonic()
    demo = None
    try:
        _prepare(directory)
        demo = _Demo(directory)
        demo.run()
    except DemoError as exc:
        _say()
        print(f"DEMO FAILED: {exc}", file=sys.stderr, flush=True)
        if demo is not None:
            print(f"see the server logs: {demo.you.log_path} and {demo.peer.log_path}", file=sys.stderr, flush=True)
        return 1
    except (RuntimeError, OSError, httpx.HTTPError, subprocess.SubprocessError) as exc:
        _say()
        print(f"DEMO FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if demo is not None:
            print(f"see the server logs: {demo.you.log_path} and {demo.peer.log_path}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted", file=sys.stderr, flush=True)
        return 1
    finally:
        if demo is not None:
            demo.bed.stop()
    _header("Done: every step behaved as the guide says")
    _say(f"  wall time: {time.monotonic() - started:.1f} s; both servers are stopped. Left behind in {directory}:")
    _say(f"    {demo.bed.ca_path}    the throwaway CA both servers trust")
    for server in (demo.you, demo.peer):
        _say(f"    {server.log_path}    {server.name}'s log")
        _say(f"    {server.root / 'data'}    {server.name}'s SQLite data directory")
        _say(f"    {server.root / RECORDING}    its federation traffic (scaiwave replay {server.root / RECORDING})")
        _say(f"    {server.root / 'cert.pem'}, key.pem    its certificate and key")
    return 0
