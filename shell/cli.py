"""The ``scaiwave`` command line.

``scaiwave serve`` runs the daemon. Every ``scaiwave admin ...`` command is a
thin client of the running daemon's admin API (``/v1/admin/*``) over HTTPS,
with the same configuration as the daemon (environment or ``SCAIWAVE_CONFIG``):
it connects to ``SCAIWAVE_LISTEN`` and checks the daemon's certificate for
``SCAIWAVE_SERVER_NAME`` like a peer would. One code path (the API) owns every
change, so the daemon's in-memory core never disagrees with its database.
``scaiwave replay`` and ``scaiwave demo`` need no daemon.

Refusals print ``error: <code>: <message>`` and exit 1; configuration errors
exit 2; Ctrl-C exits 130 and a closed stdout 141, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from . import cli_admin
from .config import Config, ConfigError, client_ssl_context, load_config
from .observe.logs import parse_format, parse_level, setup_logging
from .observe.selfcheck import check_report

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
            tls = _tls_cause(exc)
            if tls is not None:
                cause = tls
            if isinstance(cause, ssl.SSLCertVerificationError):
                # The daemon answered; its certificate is not for our name (or CA).
                raise CliError("tls_failure", f"the daemon at {self.base} answered, but its certificate did not "
                                              f"verify for {self.sni} (SCAIWAVE_SERVER_NAME): "
                                              f"{cause.verify_message or cause}") from exc
            if isinstance(cause, ssl.SSLError):
                raise CliError("tls_failure", f"TLS with the daemon at {self.base} failed: {cause}") from exc
            raise CliError("daemon_unreachable", f"cannot reach the daemon at {self.base} ({cause or exc})") from exc
        try:
            data = resp.json()
        except ValueError:
            raise CliError("internal_error", f"HTTP {resp.status_code} without a JSON body") from None
        if resp.status_code != 200:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            raise CliError(err.get("code", "error"), err.get("message", f"HTTP {resp.status_code}"))
        return data


def _tls_cause(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error under an httpx error (httpx wraps httpcore, which wraps ssl), if any."""
    seen = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


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
        state = p["state"] + (", paused" if p.get("paused") else "")
        error = f"{err['code']} at {_fmt_time(err['at'])}: {err['message']}" if err else "-"
        rows.append((p["server_name"], state, p["protocol_version"] or "-", p["key_id"] or "-",
                     _fmt_time(p["last_seen"]), error))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r[:5])) + "  " + r[5] for r in rows)


def _limits_text(data: dict) -> str:
    lines = [", ".join(f"{k}={v}" for k, v in data["settings"].items())]
    lines += [f"busy {b['origin']}: {b['in_flight']} requests, {b['descriptor_fetches']} descriptor fetches in flight"
              for b in data["busy"]]
    lines += [f"limited {r['origin']}: {r['refused']} refused, last at {_fmt_time(r['last_at'])}: {r['reason']}"
              for r in data["limited"]]
    return "\n".join(lines if len(lines) > 1 else lines + ["nobody is being limited"])


def _move(args: argparse.Namespace, config: Config) -> None:
    """``admin db migrate --to URL`` (shell/store/move.py)."""
    from .store.dialect import redact_url
    from .store.move import MoveError, move_to_postgres

    try:
        data = move_to_postgres(config.data_dir, args.to)
    except MoveError as exc:
        raise CliError(exc.code, str(exc)) from None
    rows = "\n".join(f"  {table}: {count} rows" for table, count in data["tables"].items())
    _print(args, data, f"moved {data['from']} to {data['to']} (schema version {data['schema_version']}), "
                       f"every count checked:\n{rows}\nnow set SCAIWAVE_DATABASE_URL={redact_url(args.to)} "
                       "and start the daemon; keep the SQLite file until it serves as before")


def _admin(args: argparse.Namespace, config: Config) -> None:
    c = AdminClient(config)
    cmd = args.cmd if args.area in ("federation", "db") else args.area
    if args.area == "tenant":
        cmd = "tenant"
    if cmd == "key":
        path = {"show": ("GET", "/v1/admin/federation/key"), "generate": ("POST", "/v1/admin/federation/key/generate"),
                "rotate": ("POST", "/v1/admin/federation/key/rotate")}[args.action]
        data = c.call(*path)
        _print(args, data, f"key_id: {data['key_id'] or '(none: run key generate)'}\npublic_key: {data['public_key']}"
               + "".join(f"\nold: {o['key_id']} rotated out {_fmt_time(o['expired_at'])}, accepted for live traffic until "
                         f"{_fmt_time(o['expired_at'] + 30 * 86_400_000)}, for its history forever"
                         for o in data["old_keys"]))
    elif cmd == "policy":
        cli_admin.policy_command(args, c, _print)
    elif cmd == "peers":
        cli_admin.peers_command(args, c, _print, _peers_table, CliError)
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
        target = "/v1/admin/federation/descriptor" + (f"?server={_seg(args.server)}" if args.server else "")
        _print(args, c.call("GET", target))
    elif cmd == "refresh":
        data = c.call("POST", f"/v1/admin/federation/foreign/{_seg(args.participant_id)}/refresh")
        _print(args, data, f"{data['server_name']}: key {data['key_id']} (old: {', '.join(data['old_keys']) or '-'})")
    elif cmd == "backfill":
        cli_admin.backfill_command(args, c, _print, CliError)
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
        cli_admin.users_command(args, c, _print, config.server_name)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scaiwave-federation")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


class _Help(argparse.HelpFormatter):
    """Help that states each option's default (when it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" not in text and action.default not in (None, False, argparse.SUPPRESS) \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _commands(parser: argparse.ArgumentParser, dest: str, what: str = "COMMAND") -> argparse._SubParsersAction:
    """Sub-commands named ``COMMAND`` in usage and errors (not the internal ``dest``)."""
    return parser.add_subparsers(dest=dest, required=True, metavar=what, title="commands")


def build_parser() -> argparse.ArgumentParser:
    from scaiwave_federation.core import MAX_PULL

    p = argparse.ArgumentParser(prog="scaiwave", description="ScaiWave Federation daemon and admin tool.",
                                formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"scaiwave {_version()}")
    p.add_argument("--config", type=Path, help="TOML configuration file (else SCAIWAVE_CONFIG / environment)")
    sub = _commands(p, "top")
    add = lambda group, name, help: group.add_parser(name, help=help, description=help, formatter_class=_Help)  # noqa: E731
    add(sub, "serve", "run the federation daemon")
    demo = add(sub, "demo", "two servers on loopback with real TLS, walking the admin guide")
    demo.add_argument("--dir", type=Path, default=Path("demo-run"), help="where logs and data directories go")
    rp = sub.add_parser("replay", help="drive a fresh core with a recording and print its decisions",
                        usage="scaiwave replay RECORDING [options] | scaiwave replay diff LEFT [RIGHT] [options]")
    from .research.command import add_replay_options

    add_replay_options(rp)
    comp = add(sub, "completion", "print a shell completion script (bash or zsh)")
    comp.add_argument("shell", choices=["bash", "zsh"], help="the shell: bash (source it) or zsh")
    admin = _commands(add(sub, "admin", "administer the running daemon"), "area")
    admin_tenant = _commands(add(admin, "tenant", "tenants"), "cmd")
    t = add(admin_tenant, "create", "create a tenant")
    t.add_argument("name")
    t.add_argument("--federation", choices=["enabled", "disabled"], default="enabled",
                   help="whether the tenant's rooms may federate")
    admin_user = _commands(add(admin, "user", "local users"), "action")
    u = add(admin_user, "create", "create a user; prints its access token (shown once)")
    u.add_argument("name", help="the local part: 1 to 64 of a-z 0-9 . _ = / -")
    u.add_argument("--tenant", required=True, help="the user's tenant")
    ul = add(admin_user, "list", "every local user and whether it is active")
    ud = add(admin_user, "deactivate", "deactivate a user: its token stops working at once; memberships stay")
    ud.add_argument("user", metavar="USER", help="@name:server, or a local name")
    ut = add(admin_user, "token", "give a user a new access token (the old one stops working)")
    ut.add_argument("user", metavar="USER", help="@name:server, or a local name")
    fed = _commands(add(admin, "federation", "federation"), "cmd")
    key = add(fed, "key", "this server's federation key")
    key.add_argument("action", choices=["generate", "rotate", "show"])
    pol = _commands(add(fed, "policy", "federation policy: show it, replace it, or change one entry"), "action",
                    "ACTION")
    ps = add(pol, "show", "the policy")
    pset = add(pol, "set", "replace the mode and/or whole lists; repeated --allow/--block accumulate")
    pset.add_argument("--mode", choices=["open", "invite_only", "closed"], help="default_mode (default: unchanged)")
    pset.add_argument("--allow", nargs="*", action="extend", metavar="HOST",
                      help="allowed_peers, replacing the list (--allow a --allow b: both; --allow alone: none)")
    pset.add_argument("--block", nargs="*", action="extend", metavar="HOST",
                      help="blocked_peers, replacing the list (repeatable, like --allow)")
    edits = [pset]
    for verb, text in (("allow", "add servers to allowed_peers"), ("disallow", "remove servers from allowed_peers"),
                       ("block", "add servers to blocked_peers"), ("unblock", "remove servers from blocked_peers")):
        edit = add(pol, verb, text + "; prints what changed and warns whom it cuts off")
        edit.add_argument("hosts", nargs="+", metavar="HOST")
        edits.append(edit)
    for edit in edits:
        edit.add_argument("--dry-run", action="store_true",
                          help="only show what would change and which active peers it would cut off")
    peers = add(fed, "peers", "peers with last_seen and last_error; forget, pause or resume one")
    peers.add_argument("action", nargs="?", choices=["list", "forget", "pause", "resume"], default="list",
                       help="what to do")
    peers.add_argument("name", nargs="?", metavar="NAME", help="the peer's server name (forget, pause, resume)")
    peers.add_argument("--force", action="store_true",
                       help="forget even with transactions queued for it (they are dropped)")
    lim = add(fed, "limits", "who is being rate limited, and the limits in effect")
    hs = add(fed, "handshake", "peer with a server now")
    hs.add_argument("peer")
    rt = add(fed, "retry", "retry queued transactions to a peer now")
    rt.add_argument("peer")
    ds = add(fed, "descriptor", "show our descriptor, or check a peer's (--server)")
    ds.add_argument("--server", help="a peer's server name")
    rf = add(fed, "refresh", "re-fetch a foreign participant's server keys")
    rf.add_argument("participant_id")
    bf = add(fed, "backfill", "pull a room's history from a peer (shows progress)")
    bf.add_argument("room_id")
    bf.add_argument("--from", dest="peer", help="the peer (default: the room's host)")
    bf.add_argument("--limit", type=int, default=MAX_PULL, help=f"most events to pull, 1 to {MAX_PULL}")
    bf.add_argument("--quiet", action="store_true", help="no progress lines")
    ck = add(fed, "check", "test this server the way a peer would (name, TLS, descriptor; "
                           "clock and handshake against PEER)")
    ck.add_argument("peer", nargs="?", help="a peer to compare clocks and handshake with")
    admin_db = _commands(add(admin, "db", "the daemon's database"), "cmd")
    bk = add(admin_db, "backup", "an online backup (SQLite backup API) while the daemon runs")
    bk.add_argument("name", nargs="?", help="the new file's name in DATA_DIR/backups/ (default: scaiwave-TIME.db)")
    mv = add(admin_db, "migrate", "copy a STOPPED server's SQLite data (DATA_DIR/scaiwave.db) into an empty "
                                  "PostgreSQL database, every table, counts checked")
    mv.add_argument("--to", dest="to", required=True, metavar="postgresql://…",
                    help="the empty target database (then set SCAIWAVE_DATABASE_URL to it)")
    for parser in (t, u, ul, ud, ut, key, ps, *edits, peers, lim, hs, rt, ds, rf, bf, ck, bk, mv):
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
    from .store.schema import StorageError

    for leaf in _leaves(exc):
        if isinstance(leaf, StorageError):
            return f"{'SCAIWAVE_DATABASE_URL' if config.database_url else 'SCAIWAVE_DATA_DIR'}: {leaf}"
        if isinstance(leaf, ConfigError):
            return str(leaf)
        if isinstance(leaf, OSError) and leaf.errno is not None:
            return (f"SCAIWAVE_LISTEN: cannot listen on {config.listen_host}:{config.listen_port}: "
                    f"{leaf.strerror}")
    return None


#: Exit statuses: 0 done, 1 refused (``error: CODE: message``), 2 usage or
#: configuration, 130 interrupted (Ctrl-C: 128 + SIGINT), 141 stdout closed
#: early (``| head``: 128 + SIGPIPE, what a shell reports for tools killed by
#: SIGPIPE, so ``set -o pipefail`` scripts see the usual status).
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> int:
    """Run one command; Ctrl-C and a closed stdout end quietly (see the exit statuses above)."""
    try:
        status = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in Python's exit flush
        return status
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Nothing more can be written; keep Python's exit flush from complaining too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top == "completion":
        from .completion import script

        print(script(parser, args.shell), end="")
        return 0
    try:
        level = parse_level(os.environ.get("SCAIWAVE_LOG_LEVEL"))
        setup_logging(level, parse_format(os.environ.get("SCAIWAVE_LOG_FORMAT") or "text"))
        if args.top == "demo":
            try:
                import trustme  # noqa: F401  (the demo's throwaway CA)
            except ImportError:
                raise CliError("missing_extra", "scaiwave demo makes a throwaway CA with trustme: "
                                                "pip install 'scaiwave-federation[demo]'") from None
            from .demo.guide import run_demo

            return run_demo(args.dir)
        if args.top == "replay":
            from .research.command import run as replay_command

            return replay_command(args)
        config = load_config(os.environ, args.config)
        setup_logging(config.log_level, config.log_format)  # the TOML file may set both
        if args.top == "serve":
            import trio

            from .runtime.daemon import serve

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
        if args.top == "admin" and args.area == "db" and args.cmd == "migrate":
            _move(args, config)  # offline: the daemon must be stopped, so no admin API
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
