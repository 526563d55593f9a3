"""The admin verbs of day two: policy edits, peers, users, and backfill progress.

Each is a thin client of one admin endpoint (``cli.AdminClient``); what a
policy change does and whom it cuts off is decided by the core
(``core.policy.policy_change``) inside the daemon, and only printed here.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO
from urllib.parse import quote

__all__ = ["policy_command", "peers_command", "users_command", "backfill_command", "Progress"]

FED = "/v1/admin/federation"


def _seg(value: object) -> str:
    """``value`` percent-encoded as one path segment (``/`` included)."""
    return quote(str(value), safe="")


def _policy_text(policy: dict[str, Any]) -> str:
    return (f"default_mode: {policy['default_mode']}\nallowed_peers: {', '.join(policy['allowed_peers']) or '-'}"
            f"\nblocked_peers: {', '.join(policy['blocked_peers']) or '-'}")


def policy_command(args: argparse.Namespace, client: Any, show) -> None:
    """``policy show | set | allow | disallow | block | unblock``."""
    if args.action == "show":
        data = client.call("GET", f"{FED}/policy")
        show(args, data, _policy_text(data))
        return
    if args.action == "set":
        current = client.call("GET", f"{FED}/policy")
        body = {"default_mode": args.mode or current["default_mode"],
                "allowed_peers": args.allow if args.allow is not None else current["allowed_peers"],
                "blocked_peers": args.block if args.block is not None else current["blocked_peers"]}
        change = {**client.call("POST", f"{FED}/policy/preview", body), "dry_run": args.dry_run}
        if change["changed"] and not args.dry_run:
            client.call("PUT", f"{FED}/policy", body)
    else:
        change = client.call("POST", f"{FED}/policy/{args.action}", {"peers": args.hosts, "dry_run": args.dry_run})
    show(args, change, change_text(change))
    if not args.json:
        for peer in change["cut_off"]:
            verb = "would cut off" if change["dry_run"] else "cut off"
            print(f"warning: this {verb} the active peer {peer['server_name']} ({peer['code']}: {peer['message']})",
                  file=sys.stderr)


def change_text(change: dict[str, Any]) -> str:
    """What a policy change did (or would do, dry run), then the policy."""
    head = "dry run, nothing changed:" if change["dry_run"] and change["changed"] else \
        "changed:" if change["changed"] else "unchanged:"
    lines = [head, *("  " + line for line in change["changes"] if line != "no change"), _policy_text(change["policy"])]
    return "\n".join(lines)


def peers_command(args: argparse.Namespace, client: Any, show, table, error) -> None:
    """``peers [list] | forget NAME [--force] | pause NAME | resume NAME``."""
    if args.action == "list":
        data = client.call("GET", f"{FED}/peers")
        show(args, data, table(data["peers"]))
        return
    if args.name is None:
        raise error("bad_request", f"peers {args.action} needs a server NAME (see `peers`)")
    name = _seg(args.name)
    if args.action == "forget":
        data = client.call("DELETE", f"{FED}/peers/{name}" + ("?force=true" if args.force else ""))
        dropped = f", {data['dropped']} queued transactions dropped" if data["dropped"] else ""
        show(args, data, f"forgot {data['server_name']} (its row and cached keys{dropped})")
        return
    data = client.call("POST", f"{FED}/peers/{name}/{args.action}")
    state = "paused: its queue is kept" if data["paused"] else "delivering"
    show(args, data, f"{data['server_name']}: {state} ({data['pending']} transactions queued)")


def users_command(args: argparse.Namespace, client: Any, show, server_name: str) -> None:
    """``user create | list | deactivate | token``."""
    if args.action == "create":
        data = client.call("POST", "/v1/admin/users", {"name": args.name, "tenant": args.tenant})
        show(args, data, f"{data['user_id']}\naccess_token: {data['access_token']}")
        return
    if args.action == "list":
        data = client.call("GET", "/v1/admin/users")
        rows = [("USER", "TENANT", "STATE")] + [
            (u["user_id"], u["tenant"], "deactivated" if u["deactivated_at"] else "active") for u in data["users"]]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        text = "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows)
        show(args, data, text if data["users"] else "no users yet")
        return
    # A bare name is a local user: `user token alice` is @alice:<this server>.
    user = args.user if args.user.startswith("@") else f"@{args.user}:{server_name}"
    if args.action == "deactivate":
        data = client.call("POST", f"/v1/admin/users/{_seg(user)}/deactivate")
        show(args, data, f"{data['user_id']} deactivated: its token no longer works; its memberships stay")
    else:
        data = client.call("POST", f"/v1/admin/users/{_seg(user)}/token")
        show(args, data, f"{data['user_id']}\naccess_token: {data['access_token']}\n(the old token no longer works)")


class Progress:
    """A backfill's progress: a bar with counts, rate and ETA on a terminal
    (redrawn in place), at most a line every ``quiet_s`` seconds otherwise,
    nothing with ``--quiet``."""

    def __init__(self, out: TextIO, *, tty: bool, quiet: bool, clock=time.monotonic, every_s: float = 30.0) -> None:
        self.out, self.tty, self.quiet, self.clock, self.every_s = out, tty, quiet, clock, every_s
        self.started = clock()
        self.last_line = self.started
        self.drawn = False

    def update(self, job: dict[str, Any], *, final: bool = False) -> None:
        """Show ``job``; a terminal also gets the ``final`` state drawn (the
        result line follows on stdout either way)."""
        if self.quiet or (final and not self.tty):
            return
        now = self.clock()
        if self.tty:
            print("\r" + self.line(job, now), end="", file=self.out, flush=True)
            self.drawn = True
        elif now - self.last_line >= self.every_s:
            print(self.line(job, now), file=self.out, flush=True)
            self.last_line = now

    def line(self, job: dict[str, Any], now: float) -> str:
        done, total = job["stored"], job.get("expected")
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        if total is not None:
            bar = "#" * int(30 * min(done, total) / max(total, 1)) if total else "#" * 30
            eta = f", ETA {_duration((total - done) / rate)}" if rate > 0 and total > done else ""
            return f"backfill {job['room_id']} from {job['peer']}: [{bar:<30}] {done}/{total} events, {rate:.0f}/s{eta}"
        return f"backfill {job['room_id']} from {job['peer']}: {done} events, {rate:.0f}/s (total not known yet)"

    def finish(self) -> None:
        if self.drawn:
            print(file=self.out, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def backfill_command(args: argparse.Namespace, client: Any, show, error) -> None:
    """Start a backfill, follow it with :class:`Progress`, print the outcome."""
    body = {"limit": args.limit} if args.peer is None else {"peer": args.peer, "limit": args.limit}
    job = client.call("POST", f"{FED}/rooms/{_seg(args.room_id)}/backfill", body)
    progress = Progress(sys.stderr, tty=sys.stderr.isatty(), quiet=args.quiet or args.json)
    while job["state"] == "running":
        progress.update(job)
        time.sleep(0.2)
        job = client.call("GET", f"{FED}/backfills/{_seg(job['id'])}")
    progress.update(job, final=True)
    progress.finish()
    human = f"backfill {job['state']}: {job['stored']} verified events stored from {job['peer']}"
    if job["refused"]:
        human += "\n" + "\n".join(f"  refused: {r['code']}: {r['message']}" for r in job["refused"])
    show(args, job, human)
    if job["error"]:
        raise error(job["error"]["code"], job["error"]["message"])
