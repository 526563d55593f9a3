"""Logs of real ``scaiwave serve`` processes: JSON lines, one access line per
request with the route template, an audit line per admin change, and never a
token or a key seed."""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
from pathlib import Path

import pytest

from scaiwave_federation.shell.config import ConfigError, load_config
from scaiwave_federation.shell.observe.logs import JsonFormatter, parse_level
from scaiwave_federation.shell.demo.testbed import Testbed


def _lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        out.append(json.loads(line))  # every line is one JSON object
    return out


def _secrets_spellings(secret: bytes) -> list[str]:
    return [secret.hex(), base64.b64encode(secret).decode(), base64.urlsafe_b64encode(secret).decode().rstrip("=")]


def test_json_logs_access_and_audit_without_secrets(tmp_path: Path) -> None:
    bed = Testbed(tmp_path)
    a = bed.add("your-host.test", extra={"SCAIWAVE_LOG_FORMAT": "JSON", "SCAIWAVE_LOG_LEVEL": "info"})
    b = bed.add("peer.test")
    try:
        a.start()
        b.start()
        a.cli("admin", "federation", "key", "generate", check=True)
        b.cli("admin", "federation", "key", "generate", check=True)
        a.cli("admin", "federation", "policy", "set", "--allow", b.server_name, "evil.test", check=True)
        a.cli("admin", "federation", "policy", "set", "--allow", b.server_name, check=True)
        b.cli("admin", "federation", "policy", "set", "--allow", a.server_name, check=True)
        a.cli("admin", "federation", "handshake", b.server_name, check=True)
        a.cli("admin", "federation", "retry", b.server_name, check=True)
        a.cli("admin", "federation", "refresh", f"@bob:{b.server_name}", check=True)
        a.cli("admin", "tenant", "create", "acme", check=True)
        assert a.admin("PUT", "/v1/admin/tenants/acme", {"federation": False})[0] == 200
        alice = a.cli_json("admin", "user", "create", "alice", "--tenant", "acme")
        a.cli("admin", "federation", "key", "rotate", check=True)
        room = a.request("POST", "/v1/rooms", {"room_type": "group"}, token=alice["access_token"])[1]["room_id"]
        assert a.request("GET", f"/v1/rooms/{room}/messages", token=alice["access_token"])[0] == 200
        assert a.request("GET", "/v1/rooms", token="swu_wrong-token-000")[0] == 401
    finally:
        bed.stop()
    lines = _lines(a.log_path)
    text = a.log_path.read_text()
    # Never a token or a seed, in any spelling.
    with sqlite3.connect(a.root / "data" / "scaiwave.db") as db:
        seeds = [row[0] for row in db.execute("SELECT seed FROM keys WHERE seed IS NOT NULL")]
    assert seeds
    for secret in [a.admin_token, alice["access_token"], "swu_wrong-token-000"]:
        assert secret not in text
    for seed in seeds:
        for spelling in _secrets_spellings(seed):
            assert spelling not in text
    # Access lines: route templates, never raw ids.
    access = [line for line in lines if line.get("event") == "access"]
    assert {"ts", "level", "logger", "msg", "method", "route", "status", "code", "peer", "remote",
            "duration_ms"} <= set(access[0])
    routes = {(x["method"], x["route"], x["status"], x["code"]) for x in access}
    assert ("GET", "/v1/rooms/{room_id}/messages", 200, "ok") in routes
    assert ("GET", "/v1/rooms", 401, "unauthorized") in routes
    assert ("POST", "/v1/admin/federation/peers/{peer}/handshake", 200, "ok") in routes
    assert not any(room in x["msg"] or room in x["route"] for x in access)
    # Audit lines: one per change, with what changed.
    audit = {x["action"]: x for x in lines if x.get("event") == "audit" and x["outcome"] == "ok"}
    policies = [x for x in lines if x.get("event") == "audit" and x["action"] == "federation/policy"]
    assert [p["changes"] for p in policies] == [
        {"allowed_peers": {"added": sorted([b.server_name, "evil.test"]), "removed": []}},
        {"allowed_peers": {"added": [], "removed": ["evil.test"]}},
    ]
    generated, rotated = audit["federation/key/generate"], audit["federation/key/rotate"]
    assert generated["key_before"]["current"] is None and generated["key_after"]["current"]
    assert rotated["key_after"]["old"] == [generated["key_after"]["current"]]
    assert audit["federation/peers/{peer}/handshake"]["peer"] == b.server_name
    assert audit["federation/peers/{peer}/retry"]["peer"] == b.server_name
    assert audit["federation/foreign/{participant_id}/refresh"]["participant_id"].endswith(b.server_name)
    assert audit["tenants"]["name"] == "acme"
    assert audit["tenants/{name}"]["name"] == "acme" and audit["tenants/{name}"]["federation"] is False
    assert audit["users"]["name"] == "alice" and audit["users"]["tenant"] == "acme"
    # The peer's side: its access lines name the origin its requests claimed.
    served = [x for x in _lines_text(b.log_path) if "POST /_scaiwave/federation/v1/handshake 200 ok" in x]
    assert served and f"peer={a.server_name}" in served[0]


def _lines_text(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_log_level_and_format_settings(tmp_path: Path) -> None:
    assert parse_level("debug") == parse_level("DEBUG") == logging.DEBUG
    assert parse_level("Warning") == parse_level("warn") == logging.WARNING
    assert parse_level(None) == parse_level("") == logging.INFO
    with pytest.raises(ConfigError, match=r"^SCAIWAVE_LOG_LEVEL: expected one of debug, info, warning, error, "
                                          r"critical, got 'loud'$"):
        parse_level("loud")
    base = {"SCAIWAVE_SERVER_NAME": "x.test", "SCAIWAVE_TLS_CERT": __file__, "SCAIWAVE_TLS_KEY": __file__,
            "SCAIWAVE_ADMIN_TOKEN": "t" * 20}
    assert load_config(base).log_format == "text"
    assert load_config({**base, "SCAIWAVE_LOG_FORMAT": "Json"}).log_format == "json"
    toml = tmp_path / "scaiwave.toml"
    toml.write_text('log_format = "json"\n')
    assert load_config(base, toml).log_format == "json"
    toml.write_text('log_format = "yaml"\n')
    with pytest.raises(ConfigError, match="^SCAIWAVE_LOG_FORMAT: expected text or json, got 'yaml' \\(from"):
        load_config(base, toml)


def test_json_formatter_keeps_a_traceback_and_hostile_text_on_one_line() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        import sys

        record = logging.LogRecord("scaiwave.x", logging.ERROR, __file__, 1, "peer said %s", ("a\nb",), sys.exc_info())
    record.fields = {"route": "/x", "msg": "not overwritten"}
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["msg"] == "peer said a\nb" and data["route"] == "/x" and "ValueError: bad" in data["exc"]


def test_log_format_from_the_toml_file(tmp_path: Path) -> None:
    bed = Testbed(tmp_path)
    server = bed.add("your-host.test")
    toml = tmp_path / "scaiwave.toml"
    toml.write_text('log_format = "json"\n')
    server.env["SCAIWAVE_CONFIG"] = str(toml)
    server.env["SCAIWAVE_LOG_LEVEL"] = "Debug"
    try:
        server.start()
        assert server.request("GET", "/healthz") == (200, {"alive": True})
    finally:
        bed.stop()
    lines = _lines(server.log_path)  # every line JSON; "Debug" was accepted as a level
    assert any(x.get("event") == "access" and x["route"] == "/healthz" for x in lines)


def test_text_lines_read_as_the_standard_formatter_writes_them() -> None:
    # The time's text is made once a second: every line still reads as logging's own.
    from scaiwave_federation.shell.observe.logs import TEXT_FORMAT, _TextFormatter

    ours, standard = _TextFormatter(TEXT_FORMAT), logging.Formatter(TEXT_FORMAT)
    for created in (1_700_000_000.001, 1_700_000_000.999, 1_700_000_001.5, 1_700_000_000.25):
        record = logging.LogRecord("scaiwave.access", logging.INFO, "", 0, "GET %s", ("/x",), None)
        record.created, record.msecs = created, int((created % 1) * 1000)
        assert ours.format(record) == standard.format(record)


def test_access_lines_written_directly_read_as_logging_writes_them() -> None:
    """An access line goes straight to setup_logging's handler when nothing else
    would see it, and reads exactly as logging's own dispatch writes it; any
    other arrangement (a second handler, a filter) takes logging's path."""
    import io

    from scaiwave_federation.shell.observe.logs import TEXT_FORMAT, LineHandler, _TextFormatter
    from scaiwave_federation.shell.observe.requests import _AccessRecord, access_log, emit_access

    saved = logging.root.handlers[:], logging.root.level
    values = ("GET", "/v1/rooms", 401, "unauthorized", None, "10.0.0.1:5", 1.25)
    try:
        logging.root.setLevel(logging.INFO)
        # Times across a second's turn and a millisecond's edges: the text
        # formatter's line (no record) must read as the record's.
        for now in (1_700_000_000.0, 1_700_000_000.9995, 1_700_000_001.001, 1_700_000_001.5):
            for formatter in (_TextFormatter(TEXT_FORMAT), JsonFormatter()):
                direct, through = io.StringIO(), io.StringIO()
                handler = LineHandler(direct)
                handler.setFormatter(formatter)
                logging.root.handlers = [handler]
                emit_access(*values, now=now)
                handler.setStream(through)
                access_log.handle(_AccessRecord(*values, now))
                assert direct.getvalue() == through.getvalue() and direct.getvalue().count("\n") == 1
                assert "GET /v1/rooms 401 unauthorized peer=- remote=10.0.0.1:5 1.2 ms" in direct.getvalue()
        # A second handler: both get the line. A filter on the way: it decides.
        mine, theirs = io.StringIO(), io.StringIO()
        handler.setStream(mine)
        logging.root.handlers = [handler, logging.StreamHandler(theirs)]
        emit_access(*values)
        assert mine.getvalue() and theirs.getvalue()
        logging.root.handlers = [handler]
        handler.addFilter(lambda r: False)
        emit_access(*values)
        assert mine.getvalue().count("\n") == 1
    finally:
        logging.root.handlers = saved[0]
        logging.root.setLevel(saved[1])


def test_access_log_flush_setting(tmp_path: Path) -> None:
    base = {"SCAIWAVE_SERVER_NAME": "x.test", "SCAIWAVE_TLS_CERT": __file__, "SCAIWAVE_TLS_KEY": __file__,
            "SCAIWAVE_ADMIN_TOKEN": "t" * 20}
    assert load_config(base).access_log_flush_ms == 100
    assert load_config({**base, "SCAIWAVE_ACCESS_LOG_FLUSH": "0"}).access_log_flush_ms == 0
    assert load_config({**base, "SCAIWAVE_ACCESS_LOG_FLUSH": "2s"}).access_log_flush_ms == 2000
    toml = tmp_path / "scaiwave.toml"
    toml.write_text("access_log_flush = 250\n")
    assert load_config(base, toml).access_log_flush_ms == 250
    for bad, why in (("11s", "must be at most 10s"), ("-5", "must not be negative"), ("soon", "expected a duration")):
        with pytest.raises(ConfigError, match=f"^SCAIWAVE_ACCESS_LOG_FLUSH: {why}"):
            load_config({**base, "SCAIWAVE_ACCESS_LOG_FLUSH": bad})


def test_held_access_lines_keep_their_order_and_a_bound() -> None:
    """While held, access lines wait for write_held (or a cap, or any other
    record, which comes after them), then go out in one write, in order."""
    import io

    from scaiwave_federation.shell.observe.logs import HELD_LINES_MAX, TEXT_FORMAT, LineHandler, _TextFormatter
    from scaiwave_federation.shell.observe.requests import emit_access

    class Writes(io.StringIO):
        count = 0

        def write(self, text: str) -> int:
            self.count += 1
            return super().write(text)

    saved = logging.root.handlers[:], logging.root.level
    stream = Writes()
    handler = LineHandler(stream)
    handler.setFormatter(_TextFormatter(TEXT_FORMAT))
    try:
        logging.root.handlers = [handler]
        logging.root.setLevel(logging.INFO)
        handler.hold(True)
        for n in range(3):
            emit_access("GET", f"/r{n}", 200, "ok", None, "-", 1.0)
        assert stream.getvalue() == ""
        logging.getLogger("scaiwave.service").warning("after the three")
        lines = stream.getvalue().splitlines()
        assert [line.split(": ", 1)[1].split()[1] for line in lines[:3]] == ["/r0", "/r1", "/r2"]
        assert lines[3].endswith("scaiwave.service: after the three") and len(lines) == 4
        emit_access("GET", "/r3", 200, "ok", None, "-", 1.0)
        handler.write_held()
        assert stream.getvalue().splitlines()[-1].split()[5] == "/r3"
        # Never more than HELD_LINES_MAX wait: the last one writes them all, in one write.
        before, writes = len(stream.getvalue().splitlines()), stream.count
        for _ in range(HELD_LINES_MAX - 1):
            emit_access("GET", "/cap", 200, "ok", None, "-", 1.0)
        assert len(stream.getvalue().splitlines()) == before
        emit_access("GET", "/cap", 200, "ok", None, "-", 1.0)
        assert len(stream.getvalue().splitlines()) == before + HELD_LINES_MAX and stream.count == writes + 1
        # flush() (logging's exit hook calls it) and hold(False) write what waits;
        # not holding, a line goes at once.
        emit_access("GET", "/flushed", 200, "ok", None, "-", 1.0)
        handler.flush()
        assert "/flushed" in stream.getvalue().splitlines()[-1]
        handler.hold(True)
        emit_access("GET", "/unheld", 200, "ok", None, "-", 1.0)
        handler.hold(False)
        assert "/unheld" in stream.getvalue().splitlines()[-1]
        emit_access("GET", "/at-once", 200, "ok", None, "-", 1.0)
        assert "/at-once" in stream.getvalue().splitlines()[-1]
    finally:
        handler.hold(False)
        logging.root.handlers = saved[0]
        logging.root.setLevel(saved[1])


@pytest.mark.parametrize("flush", ["10s", "0"])
def test_a_daemon_holds_access_lines_and_writes_them_when_it_stops(tmp_path: Path, flush: str) -> None:
    """A real daemon: with ACCESS_LOG_FLUSH=10s a request's access line is not
    in the log at once, and is there after a clean stop (SIGTERM); with 0 it
    is written before the answer is sent."""
    bed = Testbed(tmp_path)
    server = bed.add("your-host.test")
    server.env["SCAIWAVE_ACCESS_LOG_FLUSH"] = flush
    try:
        server.start()
        for _ in range(3):
            assert server.request("GET", "/healthz") == (200, {"alive": True})
        logged = [x for x in _lines_text(server.log_path) if "GET /healthz 200 ok" in x]
        # start() polls /healthz until the daemon answers: at least our three.
        assert (len(logged) >= 3) if flush == "0" else not logged
    finally:
        bed.stop()
    assert len([x for x in _lines_text(server.log_path) if "GET /healthz 200 ok" in x]) >= 3


def test_a_log_stream_that_fails_never_fails_a_request_or_the_daemon(capsys: pytest.CaptureFixture) -> None:
    """A log on a closed pipe (EPIPE) or a full disk: writing an access line,
    held or not, and writing the held ones (the daemon's task) report the
    failure as logging does (``handleError``) and raise nothing: the request
    is answered and the daemon goes on. Closing the handler (a second
    ``setup_logging``) writes what it holds first."""
    import io

    from scaiwave_federation.shell.observe.logs import TEXT_FORMAT, LineHandler, _TextFormatter
    from scaiwave_federation.shell.observe.requests import emit_access

    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    saved = logging.root.handlers[:], logging.root.level
    handler = LineHandler(Broken())
    handler.setFormatter(_TextFormatter(TEXT_FORMAT))
    try:
        logging.root.handlers = [handler]
        logging.root.setLevel(logging.INFO)
        emit_access("GET", "/a", 200, "ok", None, "-", 1.0)  # not held: written at once
        handler.hold(True)
        emit_access("GET", "/b", 200, "ok", None, "-", 1.0)
        handler.write_held()
        handler.hold(False)
        assert "Broken pipe" in capsys.readouterr().err  # reported, as logging reports it
        # A handler closed while it holds lines writes them first.
        good = io.StringIO()
        handler.setStream(good)
        handler.hold(True)
        emit_access("GET", "/held", 200, "ok", None, "-", 1.0)
        handler.close()
        assert "/held" in good.getvalue()
    finally:
        handler.holding = False
        logging.root.handlers = saved[0]
        logging.root.setLevel(saved[1])
