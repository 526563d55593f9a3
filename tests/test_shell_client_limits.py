"""PeerClient against hostile TLS hosts: a host trickling its answer is cut
off at the request's total deadline (httpx's timeout is per read), and a host
holding every request it gets cannot take the connections another peer needs.
Real sockets, real TLS (trustme), a rogue h11 server in this process."""

from __future__ import annotations

import ssl
from functools import partial

import h11
import pytest
import trio
import trustme

from roguehost import read_request
from scaiwave_federation.shell.http.client import PeerClient, TransportError


class Rogue:
    """Answers every request with headers at once, then its body ``delay``
    seconds a byte (a trickle); counts the requests it holds."""

    def __init__(self, delay: float, body: bytes = b"x" * 200) -> None:
        self.delay, self.body = delay, body
        self.held = self.most = self.served = 0

    async def handle(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        self.held += 1
        self.most = max(self.most, self.held)
        try:
            if await read_request(conn, stream) is None:
                return
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                ("content-length", str(len(self.body))), ("connection", "close")])))
            for i in range(len(self.body)):
                await trio.sleep(self.delay)
                await stream.send_all(conn.send(h11.Data(data=self.body[i:i + 1])))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            self.served += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        finally:
            self.held -= 1
            with trio.move_on_after(0.5):
                await stream.aclose()


async def serve(nursery: trio.Nursery, ca: trustme.CA, rogue: Rogue, *names: str) -> int:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    listeners = await nursery.start(partial(trio.serve_ssl_over_tcp, rogue.handle, 0, ctx, host="127.0.0.1"))
    return listeners[0].transport_listener.socket.getsockname()[1]


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def client(ca: trustme.CA, resolve: dict, **kw) -> PeerClient:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return PeerClient(ssl_context=ctx, resolve=resolve, **kw)


async def test_a_trickling_host_is_cut_off_at_the_total_deadline(nursery, ca):
    """One byte every 0.1 s never trips the 5 s read timeout; the whole answer
    would take 20 s. The request ends at its 1 s deadline with a clear line."""
    port = await serve(nursery, ca, Rogue(0.1), "slow.test")
    async with client(ca, {("slow.test", port): "127.0.0.1"}, timeout=5, deadline=1.0) as c:
        start = trio.current_time()
        with pytest.raises(TransportError) as info:
            await c.get(f"slow.test:{port}", "/")
        took = trio.current_time() - start
    assert info.value.code == "peer_unreachable"
    assert info.value.message == f"slow.test:{port} (127.0.0.1): no complete answer within 1s"
    assert 0.9 < took < 3


async def test_one_peer_holding_requests_cannot_take_the_connections_of_another(nursery, ca):
    """A host that holds every request gets at most ``per_peer`` of ours at
    once; the rest wait (inside their deadline). A healthy peer is answered at
    once meanwhile, however many requests the slow one holds."""
    slow, fast = Rogue(0.08, b"x" * 10), Rogue(0, b"ok")
    slow_port = await serve(nursery, ca, slow, "slow.test")
    fast_port = await serve(nursery, ca, fast, "fast.test")
    resolve = {("slow.test", slow_port): "127.0.0.1", ("fast.test", fast_port): "127.0.0.1"}
    async with client(ca, resolve, per_peer=3, deadline=10) as c:
        results = []

        async def ask_slow():
            results.append((await c.get(f"slow.test:{slow_port}", "/")).body)

        async with trio.open_nursery() as inner:
            for _ in range(12):
                inner.start_soon(ask_slow)
            await trio.sleep(0.3)
            assert slow.held == 3  # the other nine wait for a slot
            start = trio.current_time()
            assert (await c.get(f"fast.test:{fast_port}", "/")).body == b"ok"
            assert trio.current_time() - start < 1
        assert slow.most == 3 and results == [b"x" * 10] * 12
        assert c._slots == {}  # nothing kept per name once its requests are done


async def test_a_trickled_descriptor_gets_its_own_shorter_deadline(nursery, ca, monkeypatch):
    from scaiwave_federation.shell.http import client as client_module

    monkeypatch.setattr(client_module, "DESCRIPTOR_DEADLINE_S", 0.5)
    port = await serve(nursery, ca, Rogue(0.1), "slow.test")
    async with client(ca, {("slow.test", port): "127.0.0.1"}, timeout=5, deadline=30) as c:
        start = trio.current_time()
        with pytest.raises(TransportError) as info:
            await c.fetch_descriptor(f"slow.test:{port}")
        assert trio.current_time() - start < 2
    assert info.value.message.endswith("no complete answer within 0.5s")
