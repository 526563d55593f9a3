"""The command line follows the conventions (issue 11 item 5): --version, help
naming COMMAND with defaults and caps, completion scripts that bash runs, a
quiet Ctrl-C (130) and closed pipe (141), one code per cause for the daemon
connection, log_level in TOML, and progress that shows real counts."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scaiwave_federation.shell.cli import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED
from scaiwave_federation.shell.cli_admin import Progress
from scaiwave_federation.shell.demo.testbed import Testbed

CLI = [sys.executable, "-m", "scaiwave_federation.shell.cli"]


def _run(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL, **kw)


def test_version() -> None:
    proc = _run("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("scaiwave 0.")


def test_usage_errors_name_the_command_not_the_internal_dest() -> None:
    for args in ([], ["admin"], ["admin", "federation"], ["admin", "federation", "policy"]):
        proc = _run(*args)
        assert proc.returncode == 2
        assert "required: COMMAND" in proc.stderr or "required: ACTION" in proc.stderr, proc.stderr
        assert "top" not in proc.stderr and "area" not in proc.stderr and "cmd" not in proc.stderr


def test_help_states_defaults_and_caps() -> None:
    text = _run("admin", "federation", "backfill", "--help").stdout
    assert "1 to 1000 (default: 1000)" in " ".join(text.split())
    assert "(default: enabled)" in " ".join(_run("admin", "tenant", "create", "--help").stdout.split())


def _completions(script: str, *words: str) -> list[str]:
    line = " ".join(f'"{w}"' for w in words)
    program = f'{script}\nCOMP_WORDS=(scaiwave {line}); COMP_CWORD={len(words)}; _scaiwave; ' \
              'printf "%s\\n" "${COMPREPLY[@]}"'
    proc = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_bash_completion_is_valid_and_completes_from_the_command_tree(tmp_path: Path) -> None:
    script = _run("completion", "bash").stdout
    path = tmp_path / "scaiwave.bash"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    assert "admin" in _completions(script, "") and "completion" in _completions(script, "")
    assert _completions(script, "admin", "fed") == ["federation"]
    assert _completions(script, "admin", "federation", "policy", "") == [
        "--help", "allow", "block", "disallow", "set", "show", "unblock"]
    assert _completions(script, "admin", "federation", "peers", "p") == ["pause"]
    assert "--dry-run" in _completions(script, "admin", "federation", "policy", "block", "x.test", "--")
    assert _completions(script, "completion", "") == ["--help", "bash", "zsh"]


def test_zsh_completion_loads_the_same_functions(tmp_path: Path) -> None:
    script = _run("completion", "zsh").stdout
    assert script.startswith("autoload -U +X bashcompinit && bashcompinit\n")
    assert "complete -F _scaiwave scaiwave" in script
    if shutil.which("zsh"):
        path = tmp_path / "scaiwave.zsh"
        path.write_text(script)
        assert subprocess.run(["zsh", "-n", str(path)], capture_output=True).returncode == 0
    # Without zsh the body (everything after the bashcompinit line) is checked by bash.
    assert subprocess.run(["bash", "-n"], input=script.split("\n", 1)[1], text=True).returncode == 0


def _env_for(port: int, tmp_path: Path) -> dict[str, str]:
    bed = Testbed(tmp_path / "certs")
    server = bed.add("your-host.test")
    return {**server.env, "SCAIWAVE_LISTEN": f"127.0.0.1:{port}", "SCAIWAVE_SERVER_NAME": f"your-host.test:{port}"}


def test_ctrl_c_ends_quietly_with_130(tmp_path: Path) -> None:
    # A "daemon" that accepts and never answers: the CLI waits until interrupted.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        env = _env_for(listener.getsockname()[1], tmp_path)
        proc = subprocess.Popen([*CLI, "admin", "federation", "peers"], env={**os.environ, **env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        conn, _ = listener.accept()
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        conn.close()
    assert proc.returncode == EXIT_INTERRUPTED == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_a_closed_pipe_ends_quietly_with_141() -> None:
    read, write = os.pipe()
    os.close(read)  # `| head` that has already gone away
    proc = subprocess.run([*CLI, "completion", "bash"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write)
    assert proc.returncode == EXIT_BROKEN_PIPE == 141
    assert proc.stderr == ""


def test_a_certificate_for_another_name_is_tls_failure_not_unreachable(tmp_path: Path) -> None:
    bed = Testbed(tmp_path)
    server = bed.add("your-host.test")
    server.start()
    try:
        wrong = {**server.env, "SCAIWAVE_SERVER_NAME": f"other-host.test:{server.port}"}
        proc = _run("admin", "federation", "peers", env=wrong)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.startswith("error: tls_failure: the daemon at https://127.0.0.1:"), proc.stderr
        assert "other-host.test" in proc.stderr
        server.stop()
        gone = _run("admin", "federation", "peers", env=server.env)
        assert gone.stderr.startswith("error: daemon_unreachable:"), gone.stderr
    finally:
        bed.stop()


@pytest.mark.parametrize("value, ok", [("Debug", True), ("WARNING", True), ("loud", False), ("10", False)])
def test_log_level_in_the_toml_file_any_case(tmp_path: Path, value: str, ok: bool) -> None:
    bed = Testbed(tmp_path)
    server = bed.add("your-host.test")
    config = tmp_path / "scaiwave.toml"
    config.write_text(f'log_level = "{value}"\n')
    env = {k: v for k, v in server.env.items()}
    env["SCAIWAVE_CONFIG"] = str(config)
    proc = _run("admin", "federation", "peers", env=env)  # no daemon: the config is read first
    assert "Traceback" not in proc.stderr
    if ok:  # the level took effect: debug lines from the HTTP client, or none at WARNING
        assert proc.stderr.splitlines()[-1].startswith("error: daemon_unreachable:"), proc.stderr
        assert (" DEBUG " in proc.stderr) == (value == "Debug")
    else:
        assert proc.returncode == 2 and proc.stderr.startswith("scaiwave: SCAIWAVE_LOG_LEVEL: expected one of"), \
            proc.stderr
        assert "(from 'log_level' in" in proc.stderr


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _job(stored: int, expected: int | None) -> dict:
    return {"room_id": "!r:peer.test", "peer": "peer.test", "stored": stored, "expected": expected}


def test_progress_on_a_terminal_shows_counts_rate_and_eta() -> None:
    out, clock = io.StringIO(), _Clock()
    progress = Progress(out, tty=True, quiet=False, clock=clock)
    progress.update(_job(0, None))
    clock.now += 5
    progress.update(_job(250, 1000))
    progress.finish()
    text = out.getvalue()
    assert "0 events, 0/s (total not known yet)" in text
    assert "\rbackfill !r:peer.test from peer.test: [#######                       ] 250/1000 events, 50/s, ETA 15s" \
        in text and text.endswith("\n")


def test_progress_without_a_terminal_is_a_few_lines_and_quiet_is_none() -> None:
    out, clock = io.StringIO(), _Clock()
    progress = Progress(out, tty=False, quiet=False, clock=clock)
    for i in range(600):  # two minutes of polls, every 0.2 s
        clock.now += 0.2
        progress.update(_job(i, 1000))
    progress.update(_job(600, 600), final=True)
    progress.finish()
    assert 1 <= len(out.getvalue().splitlines()) <= 4
    quiet = io.StringIO()
    Progress(quiet, tty=True, quiet=True, clock=clock).update(_job(1, 2))
    assert quiet.getvalue() == ""
