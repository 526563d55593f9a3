"""``scaiwave admin federation check``: real daemons checking themselves the way
a peer would, and the exact reason and advice when a step fails."""

from __future__ import annotations

import email.utils
import json
import ssl
from pathlib import Path

import httpx
import trio
import trustme

from shellhelpers import Remote, make_env, trusting, write_cert
from scaiwave_federation.core import Code
from scaiwave_federation.shell.config import load_config
from scaiwave_federation.shell.runtime.daemon import serve
from scaiwave_federation.shell.observe.selfcheck import clock_step, fix_for
from scaiwave_federation.shell.store.schema import SCHEMA_VERSION
from scaiwave_federation.shell.demo.testbed import Testbed, free_port

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def test_clock_step_reads_the_date_header() -> None:
    date = email.utils.formatdate(T0 / 1000, usegmt=True)
    ok = clock_step("peer.test", date, T0 - 40, T0 + 40)
    assert ok.ok is True and ok.detail == "peer.test is 0 s behind us (requests are accepted within ±120 s)"
    ahead = clock_step("peer.test", date, T0 - 119_000, T0 - 119_000)
    assert ahead.ok is True and "119 s ahead of us" in ahead.detail
    # The Date header's one-second resolution is taken off the window.
    edge = clock_step("peer.test", date, T0 - 119_500, T0 - 119_500)
    assert edge.ok is False and edge.code == "clock_skew"
    far = clock_step("peer.test", date, T0 + 600_000, T0 + 600_000)
    assert far.ok is False and far.code == "clock_skew"
    assert far.detail == "peer.test's clock is 600 s behind ours; signed requests are refused beyond ±120 s"
    assert far.fix == "synchronise both servers' clocks (NTP)"
    assert clock_step("peer.test", None, T0, T0).ok is None
    garbage = clock_step("peer.test", "yesterday-ish\r\nx", T0, T0)
    assert garbage.ok is None and garbage.detail == "peer.test sent a Date header that is not an HTTP date"


def test_advice_names_the_side_that_must_act() -> None:
    theirs = fix_for(Code.PEER_NOT_ALLOWED, "peer refused: ...", us="a.test", peer="b.test")
    ours = fix_for(Code.PEER_NOT_ALLOWED, "b.test is not in allowed_peers", us="a.test", peer="b.test")
    assert theirs == "ask the admin of b.test to run `scaiwave admin federation policy allow a.test`"
    assert ours == "allow it here: `scaiwave admin federation policy allow b.test`"
    for code in Code:  # every code has some advice
        assert fix_for(code, "", us="a.test", peer="b.test")


def _steps(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines()]


def test_cli_check_against_real_daemons(tmp_path: Path) -> None:
    bed = Testbed(tmp_path)
    a, b = bed.add("your-host.test"), bed.add("peer.test")
    A, B = a.server_name, b.server_name
    try:
        a.start()
        b.start(extra_env={"SCAIWAVE_CLOCK_OFFSET": "10m"})
        # No key yet: the descriptor step says so, and what to do.
        proc = a.cli("admin", "federation", "check")
        assert proc.returncode == 1
        lines = _steps(proc.stdout)
        assert lines[0] == f"federation check of {A}"
        database = Path(a.env['SCAIWAVE_DATA_DIR']) / 'scaiwave.db'
        assert lines[1] == (f"storage     ok    sqlite at {database}, schema version "
                            f"{SCHEMA_VERSION}, a write commits")
        assert lines[2] == f"resolve     ok    {A} -> 127.0.0.1 (SCAIWAVE_RESOLVE, not DNS)"
        assert lines[3].startswith(f"tls         ok    chain and name verified for your-host.test at 127.0.0.1:{a.port}")
        assert lines[4:7] == [
            "descriptor  FAIL  own_key_missing: /.well-known/scaiwave has no key: peers cannot verify anything we sign",
            "what to do: run `scaiwave admin federation key generate`",
            "clock       skip  name a PEER to compare clocks with",
        ]
        assert lines[-1] == "1 of 6 steps failed"
        assert proc.stderr == "error: own_key_missing: the descriptor step failed (see above)\n"
        for server in (a, b):
            server.cli("admin", "federation", "key", "generate", check=True)
        a.cli("admin", "federation", "policy", "set", "--allow", B, check=True)
        # The peer runs 10 minutes ahead and has not allowed us.
        data = a.cli("admin", "federation", "check", B, "--json")
        assert data.returncode == 1
        steps = {s["step"]: s for s in json.loads(data.stdout)["steps"]}
        assert steps["descriptor"]["ok"] is True
        assert steps["clock"]["ok"] is False and steps["clock"]["code"] == "clock_skew"
        assert steps["clock"]["detail"] in (
            f"{B}'s clock is {s} s ahead of ours; signed requests are refused beyond ±120 s" for s in (599, 600, 601))
        # The peer admits the claimed origin by policy before it looks at the clock.
        assert steps["handshake"]["code"] == "peer_not_allowed"
        # Clocks agree now; the peer still has to allow us.
        b.stop()
        b.start()
        proc = a.cli("admin", "federation", "check", B)
        lines = _steps(proc.stdout)
        assert proc.returncode == 1
        assert any(line.startswith("clock       ok    ") for line in lines)
        assert f"what to do: ask the admin of {B} to run `scaiwave admin federation policy allow {A}`" in lines
        b.cli("admin", "federation", "policy", "set", "--allow", A, check=True)
        proc = a.cli("admin", "federation", "check", B)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = _steps(proc.stdout)
        assert lines[-1] == "all checks passed"
        assert any(line.startswith(f"handshake   ok    peered with {B} (scaiwave-fed/1") for line in lines)
    finally:
        bed.stop()


async def _stray_tls(ca: trustme.CA, cert_name: str, host: str, port: int, tmp: Path, *, task_status) -> None:
    """A TLS server at host:port presenting a certificate for ``cert_name``."""
    cert, key = write_cert(ca, tmp, cert_name)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))

    async def answer(stream: trio.abc.Stream) -> None:
        try:
            await trio.SSLStream(stream, ctx, server_side=True).do_handshake()
        except trio.BrokenResourceError:
            pass

    await trio.serve_tcp(answer, port, host=host, handler_nursery=None, task_status=task_status)


async def _check_with_name_at_stray(tmp_path: Path, ca: tuple[trustme.CA, Path], stray_ca: trustme.CA,
                                    stray_name: str) -> dict:
    """Our name resolves (SCAIWAVE_RESOLVE) to 127.0.0.2, where another TLS server answers."""
    authority, ca_path = ca
    port = free_port()
    env = make_env(tmp_path / "a", ca_path, authority, "your-host.test", port,
                   resolve=f"your-host.test:{port}:127.0.0.2")
    config = load_config(env)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, httpx.AsyncClient(verify=trusting(authority), trust_env=False,
                                                                     timeout=30) as http:
            await nursery.start(_stray_tls, stray_ca, stray_name, "127.0.0.2", port, tmp_path / "stray")
            await nursery.start(serve, config)
            a = Remote(http, "your-host.test", port)
            status, body = await a.admin("POST", "/v1/admin/federation/check", {})
            nursery.cancel_scope.cancel()
    assert status == 200
    return body


async def test_check_names_a_certificate_for_another_name(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    body = await _check_with_name_at_stray(tmp_path, ca, ca[0], "old-host.test")
    port = body["server_name"].rsplit(":", 1)[1]
    assert body["ok"] is False
    tls = body["steps"][2]
    assert tls == {
        "step": "tls", "ok": False, "code": "tls_failure",
        "detail": f"TLS with your-host.test at 127.0.0.2:{port}: certificate verify failed: Hostname mismatch, "
                  f"certificate is not valid for 'your-host.test'.",
        "fix": f"the certificate served at 127.0.0.2:{port} does not cover your-host.test: serve one that does "
               f"(SCAIWAVE_TLS_CERT), or point your-host.test at this server",
    }
    assert body["steps"][3] == {"step": "descriptor", "ok": None, "detail": "not run: the TLS step failed",
                                "code": None, "fix": None}


async def test_check_names_an_untrusted_chain(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    body = await _check_with_name_at_stray(tmp_path, ca, trustme.CA(), "your-host.test")
    tls = body["steps"][2]
    assert tls["ok"] is False and tls["code"] == "tls_failure"
    assert tls["detail"].endswith("certificate verify failed: unable to get local issuer certificate")
    assert tls["fix"].startswith("serve the whole chain (leaf first, then intermediates) from a CA peers trust")


async def _forward(listen_port: int, target_port: int, *, task_status) -> None:
    """A TCP pass-through proxy: bytes both ways, TLS untouched."""

    async def pipe(src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(dst)

    async def relay(client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", target_port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipe, client, upstream)
            nursery.start_soon(pipe, upstream, client)

    await trio.serve_tcp(relay, listen_port, host="127.0.0.1", task_status=task_status)


class _Behind(Remote):
    """A daemon reached directly on its listener, known to peers by another port."""

    def __init__(self, client: httpx.AsyncClient, host: str, port: int, name: str) -> None:
        super().__init__(client, host, port)
        self.name = name

    @property
    def server_name(self) -> str:
        return self.name


async def test_behind_a_tls_pass_through_proxy(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    """Peers reach your-host.test:PROXY, which forwards TCP to SCAIWAVE_LISTEN: federation and the
    check work through it; with the proxy down, the check says where the connection failed."""
    authority, ca_path = ca
    proxy_port, listen_port, port_b = free_port(), free_port(), free_port()
    name_a, name_b = f"your-host.test:{proxy_port}", f"peer.test:{port_b}"
    resolve = f"your-host.test:{proxy_port}:127.0.0.1,peer.test:{port_b}:127.0.0.1"
    env_a = make_env(tmp_path / "a", ca_path, authority, "your-host.test", proxy_port, resolve)
    env_a["SCAIWAVE_LISTEN"] = f"127.0.0.1:{listen_port}"
    config_a = load_config(env_a)
    config_b = load_config(make_env(tmp_path / "b", ca_path, authority, "peer.test", port_b, resolve))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, httpx.AsyncClient(verify=trusting(authority), trust_env=False,
                                                                     timeout=30) as http:
            proxy = trio.CancelScope()

            async def run_proxy(task_status) -> None:
                with proxy:
                    await _forward(proxy_port, listen_port, task_status=task_status)
            await nursery.start(run_proxy)
            await nursery.start(serve, config_a)
            await nursery.start(serve, config_b)
            a, b = _Behind(http, "your-host.test", listen_port, name_a), Remote(http, "peer.test", port_b)
            for server, other in ((a, name_b), (b, name_a)):
                assert (await server.admin("POST", "/v1/admin/federation/key/generate"))[0] == 200
                policy = {"default_mode": "invite_only", "allowed_peers": [other], "blocked_peers": []}
                assert (await server.admin("PUT", "/v1/admin/federation/policy", policy))[0] == 200
            # B peers with A through the proxy (it fetches A's descriptor there).
            status, body = await b.admin("POST", f"/v1/admin/federation/peers/{name_a}/handshake")
            assert status == 200, body
            status, body = await a.admin("POST", "/v1/admin/federation/check", {"peer": name_b})
            assert status == 200 and body["ok"] is True, body
            assert body["steps"][2]["detail"].startswith(f"chain and name verified for your-host.test at "
                                                        f"127.0.0.1:{proxy_port}")
            proxy.cancel()
            status, body = await a.admin("POST", "/v1/admin/federation/check", {})
            tls = body["steps"][2]
            assert tls["ok"] is False and tls["code"] == "peer_unreachable"
            assert tls["detail"] == f"cannot connect to 127.0.0.1:{proxy_port}: Connection refused"
            assert tls["fix"] == (f"check that the daemon listens there (SCAIWAVE_LISTEN is 127.0.0.1:{listen_port}), "
                                  f"or that the port forward or proxy in front of it works")
            nursery.cancel_scope.cancel()
