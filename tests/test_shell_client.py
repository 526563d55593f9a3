"""PeerClient over real sockets and real TLS (trustme CAs), against a tiny
in-process h11 server on 127.0.0.1 whose certificate names ``peer.test``."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field
from functools import partial

import h11
import pytest
import trio
import trustme

from roguehost import read_request
from scaiwave_federation.shell.http.client import (
    PeerClient,
    PeerResponse,
    TransportError,
    backoff_ms,
    split_server_name,
)

DESCRIPTOR = b'{"server_name": "peer.test", "protocol_versions": ["1"]}'


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    chunked: bool = False


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class TinyServer:
    """HTTPS/1.1 responder: one request per connection, canned routes."""

    port: int = 0
    routes: dict[str, Route] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)

    async def handle(self, stream: trio.abc.Stream) -> None:
        try:
            await self._serve_one(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass  # the client gave up (bad cert, too large): not a server bug
        finally:
            with trio.move_on_after(1):
                try:
                    await stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    async def _serve_one(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        read = await read_request(conn, stream)
        if read is None:
            return
        request, body = read
        target = request.target.decode()
        self.seen.append(
            Seen(
                request.method.decode(),
                target,
                {k.decode(): v.decode() for k, v in request.headers},
                body,
            )
        )
        if request.method == b"POST":
            route = Route(201, b"echo:" + body)
        else:
            route = self.routes.get(target, Route(404, b'{"error": "not found"}'))
        headers = [("connection", "close"), ("content-type", "application/json")]
        if route.chunked:
            headers.append(("transfer-encoding", "chunked"))
        else:
            headers.append(("content-length", str(len(route.body))))
        out = conn.send(h11.Response(status_code=route.status, headers=headers))
        await stream.send_all(out)
        for i in range(0, len(route.body), 4096):
            await stream.send_all(conn.send(h11.Data(data=route.body[i : i + 4096])))
        await stream.send_all(conn.send(h11.EndOfMessage()))


async def start_server(nursery: trio.Nursery, ca: trustme.CA, name: str) -> TinyServer:
    server = TinyServer()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(ctx)
    ctx.sni_callback = lambda _obj, sni, _ctx: server.sni.append(sni)  # type: ignore[assignment]
    listeners = await nursery.start(
        partial(trio.serve_ssl_over_tcp, server.handle, 0, ctx, host="127.0.0.1")
    )
    server.port = listeners[0].transport_listener.socket.getsockname()[1]
    return server


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
async def server(nursery: trio.Nursery, ca: trustme.CA) -> TinyServer:
    srv = await start_server(nursery, ca, "peer.test")
    srv.routes["/.well-known/scaiwave"] = Route(200, DESCRIPTOR)
    return srv


def peer_client(ctx: ssl.SSLContext, port: int, **kw: object) -> PeerClient:
    resolve = {("peer.test", port): "127.0.0.1"}
    return PeerClient(ssl_context=ctx, resolve=resolve, **kw)  # type: ignore[arg-type]


async def test_fetch_descriptor_via_resolve_checks_real_name(server, client_ctx):
    async with peer_client(client_ctx, server.port) as c:
        assert await c.fetch_descriptor(f"peer.test:{server.port}") == DESCRIPTOR
    assert server.sni == ["peer.test"]  # SNI is the name, not the address
    assert server.seen[0].headers["host"] == f"peer.test:{server.port}"
    assert server.seen[0].headers["connection"] == "keep-alive"
    # Bodies come back exactly as sent: no compression (and no zip bombs).
    assert server.seen[0].headers["accept-encoding"] == "identity"


async def test_untrusted_ca_is_tls_failure_with_reason(nursery, server, ca):
    other_ctx = ssl.create_default_context()
    trustme.CA().configure_trust(other_ctx)  # trusts a different CA only
    async with peer_client(other_ctx, server.port) as c:
        with pytest.raises(TransportError) as info:
            await c.fetch_descriptor(f"peer.test:{server.port}")
    assert info.value.code == "tls_failure"
    assert "certificate verify failed" in info.value.message
    assert "unable to get local issuer certificate" in info.value.message
    assert f"peer.test:{server.port} (127.0.0.1)" in info.value.message
    assert "\n" not in info.value.message


async def test_wrong_name_certificate_is_tls_failure(nursery, ca, client_ctx):
    # Same trusted CA, but the certificate names other.test: only the host
    # name check can refuse it, so this proves resolve keeps that check.
    other = await start_server(nursery, ca, "other.test")
    async with peer_client(client_ctx, other.port) as c:
        with pytest.raises(TransportError) as info:
            await c.fetch_descriptor(f"peer.test:{other.port}")
    assert info.value.code == "tls_failure"
    assert "Hostname mismatch" in info.value.message
    assert "peer.test" in info.value.message
    assert other.seen == []


async def test_nothing_listening_is_peer_unreachable(client_ctx):
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with peer_client(client_ctx, port) as c:
        with pytest.raises(TransportError) as info:
            await c.get(f"peer.test:{port}", "/")
    assert info.value.code == "peer_unreachable"
    assert info.value.message == f"connection refused by peer.test:{port} (127.0.0.1)"


async def test_silent_peer_times_out(nursery, client_ctx):
    # Accepts TCP but never answers the TLS handshake.
    silent = partial(trio.serve_tcp, lambda s: trio.sleep_forever(), 0, host="127.0.0.1")
    listeners = await nursery.start(silent)
    port = listeners[0].socket.getsockname()[1]
    async with peer_client(client_ctx, port, timeout=0.3) as c:
        with pytest.raises(TransportError) as info:
            await c.get(f"peer.test:{port}", "/")
    assert info.value.code == "peer_unreachable"
    assert "timed out after 0.3s" in info.value.message


async def test_unknown_host_is_peer_unreachable(client_ctx):
    async with PeerClient(ssl_context=client_ctx, timeout=5) as c:
        with pytest.raises(TransportError) as info:
            await c.get("no-such-host.invalid", "/")
    assert info.value.code == "peer_unreachable"
    assert "no-such-host.invalid" in info.value.message


async def test_missing_descriptor(server, client_ctx):
    del server.routes["/.well-known/scaiwave"]
    name = f"peer.test:{server.port}"
    async with peer_client(client_ctx, server.port) as c:
        with pytest.raises(TransportError) as info:
            await c.fetch_descriptor(name)
        assert info.value.code == "no_descriptor"
        assert info.value.message == f"{name} publishes no /.well-known/scaiwave (HTTP 404)"
        server.routes["/.well-known/scaiwave"] = Route(500, b"oops")
        with pytest.raises(TransportError) as info:
            await c.fetch_descriptor(name)
        assert info.value.code == "no_descriptor"
        assert "HTTP 500" in info.value.message


async def test_error_status_is_returned_not_raised(server, client_ctx):
    server.routes["/refuse"] = Route(403, b'{"error": {"code": "peer_blocked"}}')
    async with peer_client(client_ctx, server.port) as c:
        resp = await c.get(f"peer.test:{server.port}", "/refuse")
    assert resp == PeerResponse(
        403,
        {"connection": "close", "content-type": "application/json", "content-length": "35"},
        b'{"error": {"code": "peer_blocked"}}',
    )


@pytest.mark.parametrize("chunked", [False, True])
async def test_too_large(server, client_ctx, chunked):
    server.routes["/big"] = Route(200, b"x" * 100_000, chunked=chunked)
    server.routes["/fits"] = Route(200, b"y" * 10_000, chunked=chunked)
    async with peer_client(client_ctx, server.port, max_response_bytes=10_000) as c:
        with pytest.raises(TransportError) as info:
            await c.get(f"peer.test:{server.port}", "/big")
        assert info.value.code == "too_large"
        assert "10000 bytes" in info.value.message
        # The client stays usable after abandoning a response.
        assert (await c.get(f"peer.test:{server.port}", "/fits")).body == b"y" * 10_000


async def test_post_round_trip_and_verbatim_target(server, client_ctx):
    target = "/_scaiwave/federation/v1/rooms/!r:peer.test/backfill?before=a%2Fb&limit=3"
    async with peer_client(client_ctx, server.port) as c:
        resp = await c.request(
            f"peer.test:{server.port}",
            "POST",
            target,
            headers={"Content-Type": "application/cbor", "Authorization": "X-Sig abc"},
            body=b"\xa1\x61a\x01",
        )
    assert resp.status == 201
    assert resp.body == b"echo:\xa1\x61a\x01"
    seen = server.seen[0]
    assert (seen.method, seen.target, seen.body) == ("POST", target, b"\xa1\x61a\x01")
    assert seen.headers["host"] == f"peer.test:{server.port}"
    assert seen.headers["authorization"] == "X-Sig abc"
    assert seen.headers["content-type"] == "application/cbor"


async def test_environment_proxies_are_ignored(server, client_ctx, monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # would refuse if used
    async with peer_client(client_ctx, server.port) as c:
        assert await c.fetch_descriptor(f"peer.test:{server.port}") == DESCRIPTOR


@dataclass
class KeepAliveServer:
    """HTTPS/1.1 that keeps connections open: each request is answered with
    the number of its connection and its Host."""

    port: int = 0
    connections: list[list[str]] = field(default_factory=list)  # the Hosts each connection carried
    sni: list[str | None] = field(default_factory=list)

    async def handle(self, stream: trio.SSLStream) -> None:
        number = len(self.connections)
        self.connections.append([])
        conn = h11.Connection(h11.SERVER)
        try:
            while (read := await read_request(conn, stream)) is not None:
                host = dict(read[0].headers)[b"host"].decode()
                self.connections[number].append(host)
                body = f"{number} {host}".encode()
                await stream.send_all(conn.send(h11.Response(status_code=200, headers=[("content-length", str(len(body)))]))
                                      + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def keep_alive_server(nursery: trio.Nursery, ca: trustme.CA, *names: str) -> KeepAliveServer:
    server = KeepAliveServer()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    ctx.sni_callback = lambda _obj, sni, _ctx: server.sni.append(sni)  # type: ignore[assignment]
    listeners = await nursery.start(partial(trio.serve_ssl_over_tcp, server.handle, 0, ctx, host="127.0.0.1"))
    server.port = listeners[0].transport_listener.socket.getsockname()[1]
    return server


async def test_a_connection_is_kept_and_reused_for_its_name_only(nursery, ca, client_ctx):
    """Requests to one peer go one after another on one connection. Two names
    pinned to one address:port each get a connection of their own, verified
    (SNI) for that name, and neither carries the other's requests."""
    server = await keep_alive_server(nursery, ca, "peer.test", "alias.test")
    port = server.port
    resolve = {("peer.test", port): "127.0.0.1", ("alias.test", port): "127.0.0.1"}
    async with PeerClient(ssl_context=client_ctx, resolve=resolve) as c:
        answers = [(await c.get(name, "/")).body.decode()
                   for name in [f"peer.test:{port}", f"alias.test:{port}"] * 3]
    assert answers == [f"0 peer.test:{port}", f"1 alias.test:{port}"] * 3
    assert server.sni == ["peer.test", "alias.test"]
    assert server.connections == [[f"peer.test:{port}"] * 3, [f"alias.test:{port}"] * 3]


async def test_a_connection_the_peer_closed_while_idle_is_not_used(nursery, ca, client_ctx):
    """The peer dropped the kept connection (a restart, an idle timeout): the
    next request goes on a new one instead of failing on the dead one."""
    server = await keep_alive_server(nursery, ca, "peer.test")
    resolve = {("peer.test", server.port): "127.0.0.1"}
    async with PeerClient(ssl_context=client_ctx, resolve=resolve) as c:
        assert (await c.get(f"peer.test:{server.port}", "/")).body == f"0 peer.test:{server.port}".encode()
        [[kept]] = c._idle.values()
        await trio.sleep(0)
        kept.socket.shutdown(socket.SHUT_RD)  # what a close by the peer looks like here: readable EOF
        assert (await c.get(f"peer.test:{server.port}", "/")).body == f"1 peer.test:{server.port}".encode()


async def test_bytes_sent_after_an_answer_are_never_read_as_the_next_answer(nursery, ca, client_ctx):
    """A peer that answers one request twice: the connection is dropped, and
    the next request gets its own answer on a new one."""
    async def twice(stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        if await read_request(conn, stream) is None:
            return
        answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst"
        await stream.send_all(answer + answer.replace(b"first", b"extra"))
        await trio.sleep(1)

    hold = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("peer.test").configure_cert(hold)
    listeners = await nursery.start(partial(trio.serve_ssl_over_tcp, twice, 0, hold, host="127.0.0.1"))
    port = listeners[0].transport_listener.socket.getsockname()[1]
    async with PeerClient(ssl_context=client_ctx, resolve={("peer.test", port): "127.0.0.1"}) as c:
        assert (await c.get(f"peer.test:{port}", "/")).body == b"first"
        assert c._idle == {}
        assert (await c.get(f"peer.test:{port}", "/")).body == b"first"


async def test_a_request_cut_off_by_its_deadline_leaves_no_connection_behind(nursery, ca, client_ctx):
    """A connection whose exchange did not complete (here: the deadline struck
    while the answer was awaited) is closed, never pooled half-read."""
    async def hang(stream: trio.abc.Stream) -> None:
        await trio.sleep_forever()

    hold = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("peer.test").configure_cert(hold)
    listeners = await nursery.start(partial(trio.serve_ssl_over_tcp, hang, 0, hold, host="127.0.0.1"))
    port = listeners[0].transport_listener.socket.getsockname()[1]
    async with PeerClient(ssl_context=client_ctx, resolve={("peer.test", port): "127.0.0.1"}, deadline=0.3) as c:
        with pytest.raises(TransportError) as info:
            await c.get(f"peer.test:{port}", "/")
        assert info.value.message.endswith("no complete answer within 0.3s")
        assert c._idle == {}


async def test_invalid_server_name_and_target(client_ctx):
    async with PeerClient(ssl_context=client_ctx) as c:
        with pytest.raises(TransportError) as info:
            await c.get("peer.test:notaport", "/")
        assert info.value.code == "peer_unreachable"
        with pytest.raises(ValueError):
            await c.get("peer.test", "no-slash")
        with pytest.raises(ValueError):
            await c.get("peer.test", "/a b")
        with pytest.raises(ValueError):
            await c.get("peer.test", "/caf\u00e9")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("peer.test", ("peer.test", 443)),
        ("peer.test:8449", ("peer.test", 8449)),
    ],
)
def test_split_server_name(name, expected):
    assert split_server_name(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "", ":443", "peer.test:", "peer.test:0", "peer.test:65536", "peer.test:x",
        "::1", "[::1", "[::1]x", "[peer.test]", "peer test", "a/b:8449", "u@peer.test",
        # One canonical spelling; no IP literals (core.names).
        "[::1]", "[::1]:8449", "127.0.0.1:9", "Peer.Test", "peer.test:443",
    ],
)
def test_split_server_name_rejects(name):
    with pytest.raises(ValueError):
        split_server_name(name)


def test_backoff_ms():
    assert [backoff_ms(n) for n in range(0, 6)] == [0, 1000, 2000, 4000, 8000, 16000]
    assert backoff_ms(9) == 256_000
    assert backoff_ms(10) == 300_000  # capped
    assert backoff_ms(10_000) == 300_000  # no giant integers
    assert backoff_ms(3, base_ms=500, cap_ms=1500) == 1500
    assert backoff_ms(3, jitter=0.25) == 3000
    assert backoff_ms(3, jitter=1.0) == 0
    assert backoff_ms(4) == backoff_ms(4)  # deterministic
    for bad in ({"failures": -1}, {"failures": 1, "jitter": 1.5}):
        with pytest.raises(ValueError):
            backoff_ms(**bad)  # type: ignore[arg-type]
