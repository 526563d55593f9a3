"""deploy/scaiwave.service: the hardened systemd unit.

Always: the unit is parsed and its hardening and its settings are checked
against the code (a setting it names must exist). Where ``systemd-analyze``
is installed (it is on Debian with systemd): ``systemd-analyze verify`` must
accept the unit without a single warning, and the offline security review
must rate its exposure 2.0 or lower ("OK").
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from scaiwave_federation.shell.config import _SETTINGS, PREFIX

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "scaiwave.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax: sections, ``Key=value`` lines, keys that repeat, comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"not a unit line: {raw!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_is_hardened_and_names_real_settings(tmp_path: Path) -> None:
    unit = parse_unit(UNIT.read_text())
    service = unit["Service"]

    def one(key: str) -> str:
        assert len(service.get(key, [])) == 1, key
        return service[key][0]

    assert one("DynamicUser") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("StateDirectory") == "scaiwave" and one("StateDirectoryMode") == "0700"
    for key in ("ProtectHome", "PrivateTmp", "PrivateDevices", "NoNewPrivileges", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectControlGroups", "RestrictNamespaces", "RestrictSUIDSGID",
                "LockPersonality", "MemoryDenyWriteExecute"):
        assert one(key) == "yes", key
    assert one("UMask") == "0077"
    assert one("CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "@system-service" in service["SystemCallFilter"]
    assert one("ExecStart").split()[-1] == "serve"
    assert one("KillSignal") == "SIGTERM" and int(one("TimeoutStopSec").rstrip("s")) > 5  # the 5 s grace fits
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    # Every setting it passes exists, and the data lives in the state directory.
    env = dict(line.split("=", 1) for line in service["Environment"])
    known = {PREFIX + key.upper() for key in _SETTINGS} | {"SCAIWAVE_LOG_LEVEL", "SCAIWAVE_CONFIG"}
    assert set(env) <= known, set(env) - known
    assert env["SCAIWAVE_DATA_DIR"] == "/var/lib/" + one("StateDirectory")
    assert env["SCAIWAVE_TLS_KEY"] == "%d/tls-key" and one("LoadCredential").startswith("tls-key:")

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # the parsed checks above are all this machine can do
    # verify insists that ExecStart exists: point it at this checkout's scaiwave.
    local = tmp_path / "scaiwave.service"
    scaiwave = Path(sys.executable).parent / "scaiwave"
    local.write_text(UNIT.read_text().replace("/usr/local/bin/scaiwave", str(scaiwave)))
    verify = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stderr == "" and verify.stdout == "", verify.stderr
    review = subprocess.run([analyze, "security", "--offline=yes", "--threshold=20", str(local)],
                            capture_output=True, text=True, timeout=60)
    assert review.returncode == 0, review.stdout[-3000:]
    assert "Overall exposure level for scaiwave.service: 1." in review.stdout


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt value is reported on stderr."""
    analyze = shutil.which("systemd-analyze")
    bad = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystem=strictt")
    unit = parse_unit(bad)
    assert unit["Service"]["ProtectSystem"] == ["strictt"]  # what the parsed check would refuse
    if analyze is None:
        return
    local = tmp_path / "scaiwave.service"
    local.write_text(bad.replace("/usr/local/bin/scaiwave", str(Path(sys.executable).parent / "scaiwave")))
    verify = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert "Failed to parse protect system value" in verify.stderr
