"""The scaiwave command line: help at every level, and expected failures as one clear line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import trustme

from scaiwave_federation.shell.demo.testbed import free_port

COMMANDS = [
    [], ["serve"], ["demo"], ["replay"], ["admin"], ["admin", "tenant", "create"], ["admin", "user", "create"],
    ["admin", "federation"], ["admin", "federation", "key"], ["admin", "federation", "policy"],
    ["admin", "federation", "peers"], ["admin", "federation", "limits"], ["admin", "federation", "handshake"],
    ["admin", "federation", "retry"],
    ["admin", "federation", "descriptor"], ["admin", "federation", "refresh"], ["admin", "federation", "backfill"],
    ["admin", "db", "backup"], ["admin", "db", "migrate"],
]


def _run(args, env=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "scaiwave_federation.shell.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "scaiwave")
def test_every_level_has_help(args):
    proc = _run([*args, "--help"])
    assert proc.returncode == 0 and "usage: scaiwave" in proc.stdout


@pytest.fixture
def env(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("your-host.test")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    port = free_port()
    return {
        "SCAIWAVE_SERVER_NAME": f"your-host.test:{port}", "SCAIWAVE_LISTEN": f"127.0.0.1:{port}",
        "SCAIWAVE_TLS_CERT": str(tmp_path / "cert.pem"), "SCAIWAVE_TLS_KEY": str(tmp_path / "key.pem"),
        "SCAIWAVE_CA_BUNDLE": str(tmp_path / "ca.pem"), "SCAIWAVE_ADMIN_TOKEN": "admin-token-0123456789",
        "SCAIWAVE_DATA_DIR": str(tmp_path / "data"),
    }


def _one_line(proc, code: int, start: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(start), proc.stderr


def test_missing_setting_stops_serve_with_one_line(env):
    env = {**env, "SCAIWAVE_TLS_KEY": ""}
    _one_line(_run(["serve"], env), 2, "scaiwave: SCAIWAVE_TLS_KEY is not set")


def test_port_in_use_is_one_line(env):
    host, port = env["SCAIWAVE_LISTEN"].split(":")
    with socket.socket() as taken:
        taken.bind((host, int(port)))
        taken.listen()
        _one_line(_run(["serve"], env), 2, "scaiwave: SCAIWAVE_LISTEN: cannot listen on")


def test_unusable_database_is_one_line_and_left_alone(env, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "scaiwave.db").write_bytes(b"not a database at all" * 100)
    _one_line(_run(["serve"], env), 2, "scaiwave: SCAIWAVE_DATA_DIR: cannot open")
    assert (data / "scaiwave.db").read_bytes() == b"not a database at all" * 100


def test_unreachable_postgresql_is_one_line_without_the_password(env, pg):
    url = pg.url("no_such_database").replace("postgres:@", "postgres:s3cret@")
    proc = _run(["serve"], {**env, "SCAIWAVE_DATABASE_URL": url})
    _one_line(proc, 2, "scaiwave: SCAIWAVE_DATABASE_URL: cannot connect to postgresql://postgres:***@")
    assert "s3cret" not in proc.stderr


def test_db_migrate_refusals_are_one_line(env, pg):
    _one_line(_run(["admin", "db", "migrate", "--to", pg.fresh()], env), 1, "error: not_found: no SQLite database at")
    _one_line(_run(["admin", "db", "migrate", "--to", "sqlite:///x.db"], env), 1, "error: bad_request: --to takes")


def test_admin_command_without_daemon_is_one_line(env):
    _one_line(_run(["admin", "federation", "peers"], env), 1, "error: daemon_unreachable:")


def test_replay_of_a_file_that_is_no_recording_is_one_line(tmp_path):
    bogus = tmp_path / "x.cbor"
    bogus.write_bytes(b"\x00\x01garbage")
    proc = _run(["replay", str(bogus)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "not a scaiwave recording" in proc.stderr


def test_limits_text_names_who_is_limited():
    from scaiwave_federation.core.limits import Limits, OriginLimiter
    from scaiwave_federation.shell.cli import _limits_text

    limiter = OriginLimiter(Limits(rate=1, burst=1))
    assert _limits_text(limiter.view(0)).endswith("nobody is being limited")
    limiter.admit("bad.test", 1_764_000_000_000)
    limiter.admit("bad.test", 1_764_000_000_000)
    text = _limits_text(limiter.view(1_764_000_000_000))
    assert "rate=1" in text and "busy bad.test: 1 requests" in text
    assert "limited bad.test: 1 refused" in text and "more than 1 requests a second" in text
def test_cli_encodes_what_it_puts_in_a_path(tmp_path):
    """A value with "/", "?" or "#" stays one path segment: the daemon answers
    about that value (bad_request naming the field), not about another URL."""
    from scaiwave_federation.shell.demo.testbed import Testbed

    bed = Testbed(tmp_path)
    server = bed.add("your-host.test")
    server.start()
    try:
        for args, start in [
            (["handshake", "https://peer.test"], "error: bad_request: peer: not a server name"),
            (["retry", "peer.test/../../key/rotate"], "error: bad_request: peer: not a server name"),
            (["refresh", "bob?x=1"], "error: bad_request: participant_id:"),
            (["backfill", "!room:peer.test/backfill#"], "error: bad_request: room_id:"),
            (["descriptor", "--server", "peer.test&server=evil.test"], "error: bad_request: server: not a server name"),
        ]:
            _one_line(server.cli("admin", "federation", *args), 1, start)
        assert server.admin("GET", "/v1/admin/federation/key")[1]["key_id"] is None  # nothing rotated or made
    finally:
        bed.stop()


def test_demo_without_its_extra_names_the_extra(tmp_path):
    # trustme is the `demo` extra, not a server dependency: without it, one line.
    code = ("import sys; sys.modules['trustme'] = None\n"
            "from scaiwave_federation.shell.cli import main\n"
            f"sys.exit(main(['demo', '--dir', {str(tmp_path / 'run')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == ("error: missing_extra: scaiwave demo makes a throwaway CA with trustme: "
                                   "pip install 'scaiwave-federation[demo]'")
    assert not (tmp_path / "run").exists()
