"""A loopback testbed: real ``scaiwave serve`` processes with a throwaway CA.

Used by ``scaiwave demo`` and the end-to-end tests. Each server gets its own
data directory, a certificate from one trustme CA for its name, and
``SCAIWAVE_RESOLVE`` entries so names like ``peer.test`` reach 127.0.0.1
while TLS still checks the names.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

__all__ = ["Testbed", "Server", "PassThrough", "free_port", "wait_until", "peered_dm"]


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.1):
    """Poll ``predicate()`` until it returns something truthy; returns it.
    Raises AssertionError after ``timeout`` seconds (for tests and the demo)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """One daemon of the testbed."""

    name: str  # host part
    port: int
    root: Path
    ca_path: Path
    admin_token: str
    env: dict[str, str] = field(default_factory=dict)
    #: Interpreter options before ``-m ...cli serve`` (``["-m", "cProfile", "-o", FILE]`` to profile).
    python_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    _http: httpx.Client | None = None
    #: The port in the server's name, when it is not the one it listens on (a
    #: worker behind a pass-through: see Testbed.add_workers).
    public_port: int | None = None
    #: The front of several workers (``Testbed.workers``): spreads connections over them.
    passthrough: Any = None

    @property
    def server_name(self) -> str:
        return f"{self.name}:{self.public_port or self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def start(self, extra_env: dict[str, str] | None = None, wait: float = 20.0, *,
              module: str = "scaiwave_federation.shell.cli") -> None:
        """Start ``python -m MODULE serve`` (another ``module`` runs the daemon
        with something of its own around it: a test's fault, a profiler)."""
        env = {**os.environ, **self.env, **(extra_env or {})}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, *self.python_args, "-m", module, "serve"],
                                     env=env,
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.server_name} exited at start: {self.log_path.read_text()[-2000:]}")
            try:
                self.get("/.well-known/scaiwave")
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.server_name} did not start in {wait}s")

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _client(self) -> httpx.Client:
        # One keep-alive client per server: a test posting 1,200 messages
        # should not pay 1,200 TLS handshakes.
        if self._http is None:
            import ssl

            ctx = ssl.create_default_context(cafile=str(self.ca_path))
            self._http = httpx.Client(verify=ctx, trust_env=False, timeout=60.0)
        return self._http

    def request(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        """An HTTPS request to this server by name (resolved to loopback, name checked)."""
        headers = {"host": self.server_name}
        if token:
            headers["authorization"] = f"Bearer {token}"
        resp = self._client().request(method, f"https://127.0.0.1:{self.port}{path}", json=body, headers=headers,
                                      extensions={"sni_hostname": self.name})
        try:
            return resp.status_code, resp.json()
        except ValueError:
            return resp.status_code, resp.content

    def get(self, path: str, token: str | None = None) -> Any:
        status, data = self.request("GET", path, token=token)
        return data

    def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return self.request(method, path, body, token=self.admin_token)

    def refused_events(self, code: str) -> int:
        """Events this server refused with ``code`` in the transactions it
        received, read in the replies it stored (its SQLite file, read-only).
        ``chain_broken``: a sender sent a room's event ahead of an earlier one."""
        import sqlite3

        from scaiwave_federation.core import decode_txn_reply

        db = sqlite3.connect(f"file:{self.root / 'data' / 'scaiwave.db'}?mode=ro", uri=True, timeout=10)
        try:
            replies = [bytes(r[0]) for r in db.execute("SELECT response FROM txns")]
        finally:
            db.close()
        refused = 0
        for reply in replies:
            decoded = decode_txn_reply(reply)
            if isinstance(decoded, tuple):
                refused += sum(1 for r in decoded[0] if r is not None and r.code.value == code)
        return refused

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        """Run ``scaiwave ARGS`` with this server's configuration."""
        env = {**os.environ, **self.env}
        proc = subprocess.run([sys.executable, "-m", "scaiwave_federation.shell.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise RuntimeError(f"scaiwave {' '.join(args)} failed: {proc.stderr}")
        return proc

    def cli_json(self, *args: str) -> Any:
        proc = self.cli(*args, "--json", check=True)
        return json.loads(proc.stdout)


class Testbed:
    """Servers sharing one CA (and optionally a stranger with its own CA)."""

    __test__ = False  # not a pytest test class

    def __init__(self, root: Path) -> None:
        import trustme

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_path = self.root / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        self.servers: dict[str, Server] = {}

    def add(self, name: str, *, ca: Any = None, extra: dict[str, str] | None = None) -> Server:
        """Configure a server ``name`` (a host name) on a free loopback port."""
        port = free_port()
        root = self.root / name
        root.mkdir(parents=True, exist_ok=True)
        issuer = ca or self.ca
        cert = issuer.issue_cert(name)
        cert.private_key_pem.write_to_path(str(root / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
        for pem in cert.cert_chain_pems[1:]:
            pem.write_to_path(str(root / "cert.pem"), append=True)
        server = Server(name=name, port=port, root=root, ca_path=self.ca_path,
                        admin_token=f"admin-token-{name}-0123456789")
        self.servers[name] = server
        server.env = {
            "SCAIWAVE_SERVER_NAME": server.server_name,
            "SCAIWAVE_DATA_DIR": str(root / "data"),
            "SCAIWAVE_LISTEN": f"127.0.0.1:{port}",
            "SCAIWAVE_TLS_CERT": str(root / "cert.pem"),
            "SCAIWAVE_TLS_KEY": str(root / "key.pem"),
            "SCAIWAVE_CA_BUNDLE": str(self.ca_path),
            "SCAIWAVE_ADMIN_TOKEN": server.admin_token,
            "SCAIWAVE_KEY_REFETCH_INTERVAL": "1s",
            **(extra or {}),
        }
        if ca is not None:
            # A stranger trusts its own CA for its own listener check, and ours for peers.
            bundle = root / "bundle.pem"
            bundle.write_bytes(ca.cert_pem.bytes() + self.ca.cert_pem.bytes())
            server.env["SCAIWAVE_CA_BUNDLE"] = str(bundle)
            server.ca_path = bundle
        self._update_resolve()
        return server

    def add_workers(self, name: str, count: int, *, database: dict[str, str] | None = None,
                    extra: dict[str, str] | None = None) -> tuple[Server, list[Server]]:
        """``count`` workers serving one server ``name`` (one name, key and
        database) behind a :class:`PassThrough` that spreads connections over
        them, TLS end to end. ``database``: the settings that name the shared
        database (default: one shared SCAIWAVE_DATA_DIR, one SQLite file; pass
        ``{"SCAIWAVE_DATABASE_URL": ...}`` for another backend). Returns
        ``(the front: a Server whose port is the pass-through's, the workers)``;
        start the workers, then ``front.passthrough.start()``."""
        front = self.add(name, extra=extra)
        shared = database or {"SCAIWAVE_DATA_DIR": str(front.root / "data")}
        front.env.update(shared)
        workers = []
        for n in range(count):
            port = free_port()
            root = front.root / f"worker{n + 1}"
            root.mkdir(parents=True, exist_ok=True)
            worker = Server(name=name, port=port, root=root, ca_path=front.ca_path, admin_token=front.admin_token,
                            public_port=front.port)
            worker.env = {**front.env, "SCAIWAVE_LISTEN": f"127.0.0.1:{port}"}
            self.servers[f"{name}#{n + 1}"] = worker
            workers.append(worker)
        front.passthrough = PassThrough(front.port, [w.port for w in workers])
        self._update_resolve()
        return front, workers

    def _update_resolve(self) -> None:
        names = dict.fromkeys(s.server_name for s in self.servers.values())
        resolve = ",".join(f"{n}:127.0.0.1" for n in names)
        for s in self.servers.values():
            s.env["SCAIWAVE_RESOLVE"] = resolve

    def stop(self) -> None:
        for s in self.servers.values():
            s.stop()
            if s.passthrough is not None:
                s.passthrough.stop()


class PassThrough:
    """A TCP pass-through on 127.0.0.1:``port`` that hands each connection to
    the next of ``backends`` (round robin), skipping one that refuses: what a
    load balancer in TCP mode does in front of workers. TLS stays end to end."""

    def __init__(self, port: int, backends: list[int]) -> None:
        self.port = port
        self.backends = backends
        self._next = itertools.count()
        self._stopped = False
        # Bound at once, so no outgoing connection takes the port meanwhile;
        # connections wait in the backlog until start().
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        self._sock: socket.socket | None = sock

    def start(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self._stopped = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _accept(self) -> None:
        while not self._stopped and self._sock is not None:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        start = next(self._next)  # itertools.count: one number per connection, across threads
        for k in range(len(self.backends)):
            port = self.backends[(start + k) % len(self.backends)]
            try:
                backend = socket.create_connection(("127.0.0.1", port), timeout=5)
            except OSError:
                continue
            backend.settimeout(None)
            threading.Thread(target=_pump, args=(backend, client), daemon=True).start()
            _pump(client, backend)
            return
        client.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        src.close()


def peered_dm(a: Server, b: Server, tenant: str = "acme") -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Keys, policies allowing each other, a handshake, and a DM from alice (on
    ``a``) that bob (on ``b``) accepted: ``(room_id, alice, bob)``, each user
    as ``admin user create`` answered (``user_id``, ``access_token``)."""
    alice, [(dm, bob)] = peered_dms(a, [b], tenant)
    return dm, alice, bob


def peered_dms(a: Server, others: list[Server],
               tenant: str = "acme") -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """:func:`peered_dm` between ``a`` and each of ``others``: ``a`` allows
    them all, one alice on ``a`` opens a DM with a bob on each. Returns
    ``(alice, [(room_id, bob) per other server])``."""
    def setup(server: Server, allowed: list[Server]) -> None:
        for method, path, body in (
                ("POST", "/v1/admin/federation/key/generate", None),
                ("PUT", "/v1/admin/federation/policy",
                 {"default_mode": "invite_only", "allowed_peers": [o.server_name for o in allowed],
                  "blocked_peers": []}),
                ("POST", "/v1/admin/tenants", {"name": tenant})):
            status, answer = server.admin(method, path, body)
            if status != 200:
                raise RuntimeError(f"{server.server_name}: {method} {path}: {status} {answer}")

    setup(a, others)
    for b in others:
        setup(b, [a])
    alice = a.admin("POST", "/v1/admin/users", {"name": "alice", "tenant": tenant})[1]
    out = []
    for b in others:
        status, answer = a.admin("POST", f"/v1/admin/federation/peers/{b.server_name}/handshake")
        if status != 200:
            raise RuntimeError(f"handshake: {status} {answer}")
        bob = b.admin("POST", "/v1/admin/users", {"name": "bob", "tenant": tenant})[1]
        status, dm = a.request("POST", "/v1/dms", {"to": bob["user_id"]}, token=alice["access_token"])
        if status != 200:
            raise RuntimeError(f"dm: {status} {dm}")
        status, answer = b.request("POST", f"/v1/invites/{dm['room_id']}/accept", token=bob["access_token"])
        if status != 200:
            raise RuntimeError(f"accept: {status} {answer}")
        out.append((dm["room_id"], bob))
    return alice, out
