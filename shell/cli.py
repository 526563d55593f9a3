"""The ``scaiwave`` command line.

``scaiwave serve`` runs the daemon. Every ``scaiwave admin ...`` command is a
thin client of the running daemon's admin API (``/v1/admin/*``) over HTTPS,
with the same configuration as the daemon (environment or ``SCAIWAVE_CONFIG``):
it connects to ``SCAIWAVE_LISTEN`` and checks the daemon's certificate for
``SCAIWAVE_SERVER_NAME`` like a peer would. One code path (the API) owns every
change, so the daemon's in-memory core never disagrees with its database.
``scaiwave replay`` and ``scaiwave demo`` need no daemon.

Refusals print ``error: <code>: <message>`` and exit 1; configuration errors
exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from .config import Config, ConfigError, client_ssl_context, load_config
from .logs import parse_format, parse_level, setup_logging
from .selfcheck import check_report

__all__ = ["main", "AdminClient"]


class CliError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class AdminClient:
    """Talks to the daemon's HTTP API as this configuration's admin."""

    def __init__(self, config: Config, *, token: str | None = None, timeout: float = 120.0) -> None:
        host = config.listen_host if config.listen_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        self.sni = config.server_host
        self.base = f"https://{host if ':' not in host else '[' + host + ']'}:{config.listen_port}"
        self.host_header = config.server_name
        self.token = token or config.admin_token
        self.http = httpx.Client(verify=client_ssl_context(config), trust_env=False, timeout=timeout)

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        headers = {"authorization": f"Bearer {self.token}", "host": self.host_header}
        try:
            resp = self.http.request(method, self.base + path, json=body, headers=headers,
                                     extensions={"sni_hostname": self.sni})
        except httpx.HTTPError as exc:
            cause = exc.__cause__ or exc.__context__ or exc
            raise CliError("daemon_unreachable", f"cannot reach the daemon at {self.base} ({cause or exc})") from exc
        try:
            data = resp.json()
        except ValueError:
            raise CliError("internal_error", f"HTTP {resp.status_code} without a JSON body")
        if resp.status_code != 200:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            raise CliError(err.get("code", "error"), err.get("message", f"HTTP {resp.status_code}"))
        return data


def _seg(value: object) -> str:
    """``value`` percent-encoded as one path segment or query value: every
    reserved character, ``/`` included, so a name can never change the path
    (``https://peer.test`` stays one segment and the daemon answers about it)."""
    return quote(str(value), safe="")


def _fmt_time(ms: Any) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _print(args: argparse.Namespace, data: Any, human: str | None = None) -> None:
    if args.json or human is None:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(human)


def _peers_table(peers: list[dict]) -> str:
    if not peers:
        return "no peers yet"
    rows = [("SERVER", "STATE", "VERSION", "KEY", "LAST_SEEN", "LAST_ERROR")]
    for p in peers:
        err = p["last_error"]
        rows.append((p["server_name"], p["state"], p["protocol_version"] or "-", p["key_id"] or "-",
                     _fmt_time(p["last_seen"]), f"{err['code']} at {_fmt_time(err['at'])}: {err['message']}" if err else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r[:5])) + "  " + r[5] for r in rows)


def _limits_text(data: dict) -> str:
    lines = [", ".join(f"{k}={v}" for k, v in data["settings"].items())]
    lines += [f"busy {b['origin']}: {b['in_flight']} requests, {b['descriptor_fetches']} descriptor fetches in flight"
              for b in data["busy"]]
    lines += [f"limited {r['origin']}: {r['refused']} refused, last at {_fmt_time(r['last_at'])}: {r['reason']}"
              for r in data["limited"]]
    return "\n".join(lines if len(lines) > 1 else lines + ["nobody is being limited"])


def _backfill(args: argparse.Namespace, client: AdminClient) -> None:
    body = {"limit": args.limit} if args.peer is None else {"peer": args.peer, "limit": args.limit}
    job = client.call("POST", f"/v1/admin/federation/rooms/{_seg(args.room_id)}/backfill", body)
    show = sys.stderr.isatty() and not args.json
    while job["state"] == "running":
        if show:
            done = job["stored"]
            bar = "#" * int(30 * done / max(1, args.limit))
            print(f"\rbackfill {args.room_id} from {job['peer']}: [{bar:<30}] {done}/{args.limit}", end="", file=sys.stderr)
        elif not args.json:
            print(f"backfill: {job['stored']}/{args.limit} events stored", file=sys.stderr)
        time.sleep(0.2)
        job = client.call("GET", f"/v1/admin/federation/backfills/{_seg(job['id'])}")
    if show:
        print(file=sys.stderr)
    human = f"backfill {job['state']}: {job['stored']} verified events stored from {job['peer']}"
    if job["refused"]:
        human += "\n" + "\n".join(f"  refused: {r['code']}: {r['message']}" for r in job["refused"])
    _print(args, job, human)
    if job["error"]:
        raise CliError(job["error"]["code"], job["error"]["message"])


def _admin(args: argparse.Namespace, config: Config) -> None:
    c = AdminClient(config)
    cmd = args.cmd if args.area in ("federation", "db") else args.area
    if cmd == "key":
        path = {"show": ("GET", "/v1/admin/federation/key"), "generate": ("POST", "/v1/admin/federation/key/generate"),
                "rotate": ("POST", "/v1/admin/federation/key/rotate")}[args.action]
        data = c.call(*path)
        _print(args, data, f"key_id: {data['key_id'] or '(none: run key generate)'}\npublic_key: {data['public_key']}"
               + "".join(f"\nold: {o['key_id']} rotated out {_fmt_time(o['expired_at'])}, accepted for live traffic until "
                         f"{_fmt_time(o['expired_at'] + 30 * 86_400_000)}, for its history forever"
                         for o in data["old_keys"]))
    elif cmd == "policy":
        if args.action == "show":
            data = c.call("GET", "/v1/admin/federation/policy")
        else:
            current = c.call("GET", "/v1/admin/federation/policy")
            body = {"default_mode": args.mode or current["default_mode"],
                    "allowed_peers": args.allow if args.allow is not None else current["allowed_peers"],
                    "blocked_peers": args.block if args.block is not None else current["blocked_peers"]}
            data = c.call("PUT", "/v1/admin/federation/policy", body)
        _print(args, data, f"default_mode: {data['default_mode']}\nallowed_peers: {', '.join(data['allowed_peers']) or '-'}"
               f"\nblocked_peers: {', '.join(data['blocked_peers']) or '-'}")
    elif cmd == "peers":
        data = c.call("GET", "/v1/admin/federation/peers")
        _print(args, data, _peers_table(data["peers"]))
    elif cmd == "limits":
        data = c.call("GET", "/v1/admin/federation/limits")
        _print(args, data, _limits_text(data))
    elif cmd == "handshake":
        data = c.call("POST", f"/v1/admin/federation/peers/{_seg(args.peer)}/handshake")
        _print(args, data, f"peered with {data['server_name']} ({data['protocol_version']}, key {data['key_id']})")
    elif cmd == "retry":
        data = c.call("POST", f"/v1/admin/federation/peers/{_seg(args.peer)}/retry")
        _print(args, data, f"{data['requeued']} queued transactions to {data['server_name']} due now")
    elif cmd == "descriptor":
        path = "/v1/admin/federation/descriptor" + (f"?server={_seg(args.server)}" if args.server else "")
        _print(args, c.call("GET", path))
    elif cmd == "refresh":
        data = c.call("POST", f"/v1/admin/federation/foreign/{_seg(args.participant_id)}/refresh")
        _print(args, data, f"{data['server_name']}: key {data['key_id']} (old: {', '.join(data['old_keys']) or '-'})")
    elif cmd == "backfill":
        _backfill(args, c)
    elif cmd == "backup":
        data = c.call("POST", "/v1/admin/db/backup", {"name": args.name} if args.name else {})
        _print(args, data, f"backup written: {data['path']} ({data['bytes']} bytes, schema version "
                           f"{data['schema_version']}, integrity {data['integrity']})")
    elif cmd == "check":
        data = c.call("POST", "/v1/admin/federation/check", {"peer": args.peer} if args.peer else {})
        _print(args, data, check_report(data))
        if not data["ok"]:
            failed = next(s for s in data["steps"] if s["ok"] is False)
            raise CliError(failed["code"], f"the {failed['step']} step failed (see above)")
    elif cmd == "tenant":
        data = c.call("POST", "/v1/admin/tenants", {"name": args.name, "federation": args.federation != "disabled"})
        _print(args, data, f"tenant {data['name']} (federation {'enabled' if data['federation_enabled'] else 'disabled'})")
    elif cmd == "user":
        data = c.call("POST", "/v1/admin/users", {"name": args.name, "tenant": args.tenant})
        _print(args, data, f"{data['user_id']}\naccess_token: {data['access_token']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaiwave", description="ScaiWave Federation daemon and admin tool.")
    p.add_argument("--config", type=Path, help="TOML configuration file (else SCAIWAVE_CONFIG / environment)")
    sub = p.add_subparsers(dest="top", required=True)
    sub.add_parser("serve", help="run the federation daemon")
    demo = sub.add_parser("demo", help="two servers on loopback with real TLS, walking the admin guide")
    demo.add_argument("--dir", type=Path, default=Path("demo-run"), help="where logs and data directories go")
    rp = sub.add_parser("replay", help="drive a fresh core with a recording and print its decisions",
                        usage="scaiwave replay RECORDING [options] | scaiwave replay diff LEFT [RIGHT] [options]")
    from .research.command import add_replay_options

    add_replay_options(rp)
    admin = sub.add_parser("admin", help="administer the running daemon").add_subparsers(dest="area", required=True)
    admin_tenant = admin.add_parser("tenant", help="tenants").add_subparsers(dest="cmd", required=True)
    t = admin_tenant.add_parser("create", help="create a tenant")
    t.add_argument("name")
    t.add_argument("--federation", choices=["enabled", "disabled"], default="enabled")
    admin_user = admin.add_parser("user", help="users").add_subparsers(dest="cmd", required=True)
    u = admin_user.add_parser("create", help="create a user; prints its access token")
    u.add_argument("name")
    u.add_argument("--tenant", required=True)
    fed = admin.add_parser("federation", help="federation").add_subparsers(dest="cmd", required=True)
    key = fed.add_parser("key", help="this server's federation key")
    key.add_argument("action", choices=["generate", "rotate", "show"])
    pol = fed.add_parser("policy", help="federation policy")
    pol.add_argument("action", choices=["show", "set"])
    pol.add_argument("--mode", choices=["open", "invite_only", "closed"])
    pol.add_argument("--allow", nargs="*", metavar="HOST", help="allowed_peers (replaces the list)")
    pol.add_argument("--block", nargs="*", metavar="HOST", help="blocked_peers (replaces the list)")
    peers = fed.add_parser("peers", help="peers with last_seen and last_error")
    lim = fed.add_parser("limits", help="who is being rate limited, and the limits in effect")
    hs = fed.add_parser("handshake", help="peer with a server now")
    hs.add_argument("peer")
    rt = fed.add_parser("retry", help="retry queued transactions to a peer now")
    rt.add_argument("peer")
    ds = fed.add_parser("descriptor", help="show our descriptor, or check a peer's (--server)")
    ds.add_argument("--server")
    rf = fed.add_parser("refresh", help="re-fetch a foreign participant's server keys")
    rf.add_argument("participant_id")
    bf = fed.add_parser("backfill", help="pull a room's history from a peer (shows progress)")
    bf.add_argument("room_id")
    bf.add_argument("--from", dest="peer", help="the peer (default: the room's host)")
    bf.add_argument("--limit", type=int, default=1000)
    ck = fed.add_parser("check", help="test this server the way a peer would (name, TLS, descriptor; "
                        "clock and handshake against PEER)")
    ck.add_argument("peer", nargs="?", help="a peer to compare clocks and handshake with")
    admin_db = admin.add_parser("db", help="the daemon's database").add_subparsers(dest="cmd", required=True)
    bk = admin_db.add_parser("backup", help="an online backup (SQLite backup API) while the daemon runs")
    bk.add_argument("name", nargs="?", help="the new file's name in DATA_DIR/backups/ (default: scaiwave-TIME.db)")
    for parser in (t, u, key, pol, peers, lim, hs, rt, ds, rf, bf, ck, bk):
        parser.add_argument("--json", action="store_true", help="print JSON")
    return p


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _start_failure(exc: BaseException, config: Config) -> str | None:
    """One line for a failure an admin can fix (port taken, unusable database), else None."""
    from .schema import StorageError

    for leaf in _leaves(exc):
        if isinstance(leaf, StorageError):
            return f"SCAIWAVE_DATA_DIR: {leaf}"
        if isinstance(leaf, ConfigError):
            return str(leaf)
        if isinstance(leaf, OSError) and leaf.errno is not None:
            return (f"SCAIWAVE_LISTEN: cannot listen on {config.listen_host}:{config.listen_port}: "
                    f"{leaf.strerror}")
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        level = parse_level(os.environ.get("SCAIWAVE_LOG_LEVEL"))
        setup_logging(level, parse_format(os.environ.get("SCAIWAVE_LOG_FORMAT") or "text"))
        if args.top == "demo":
            from .demo import run_demo

            return run_demo(args.dir)
        if args.top == "replay":
            from .research.command import run as replay_command

            return replay_command(args)
        config = load_config(os.environ, args.config)
        setup_logging(level, config.log_format)  # the TOML file may set log_format
        if args.top == "serve":
            import trio

            from .daemon import serve

            try:
                trio.run(serve, config)
            except KeyboardInterrupt:
                pass
            except BaseException as exc:  # expected start failures get one line, the rest a traceback
                line = _start_failure(exc, config)
                if line is None:
                    raise
                print(f"scaiwave: {line}", file=sys.stderr)
                return 2
            return 0
        _admin(args, config)
        return 0
    except ConfigError as exc:
        print(f"scaiwave: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
