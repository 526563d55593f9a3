"""The HTTP/1.1 server: in-memory connections for the protocol, real sockets and TLS for serving."""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
from typing import Any

import h11
import httpx
import pytest
import trio
import trio.testing
import trustme

from scaiwave_federation.shell.http.server import Limits, Request, Response, handle_connection, serve_http

# -- helpers -----------------------------------------------------------------------


async def echo(request: Request) -> Response:
    if request.path == "/boom":
        raise RuntimeError("secret database password in this message")
    if request.path == "/slow":
        await trio.sleep(1000)
    return Response.json(
        200,
        {
            "method": request.method,
            "target": request.target,
            "path": request.path,
            "query": request.query,
            "length": len(request.body),
            "sha256": hashlib.sha256(request.body).hexdigest(),
            "content_type": request.header("Content-Type"),
            "peer": request.peer,
        },
    )


class Client:
    """An h11 client on one end of a memory stream pair."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(self, *events: Any) -> None:
        await self.stream.send_all(b"".join(self.conn.send(event) or b"" for event in events))

    async def request(
        self, method: str, target: str, body: bytes | None = None, headers: list | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        headers = [("host", "your-host.test"), *(headers or [])]
        if body is not None and not any(name == "transfer-encoding" for name, _ in headers):
            headers.append(("content-length", str(len(body))))
        events = [h11.Request(method=method, target=target, headers=headers)]
        events += [h11.Data(data=body)] if body else []
        await self.send(*events, h11.EndOfMessage())
        return await self.response()

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(65536))

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        head = await self.next_event()
        while isinstance(head, h11.InformationalResponse):
            head = await self.next_event()
        assert isinstance(head, h11.Response), head
        body = b""
        while not isinstance(event := await self.next_event(), h11.EndOfMessage):
            body += event.data
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        headers = {name.decode(): value.decode() for name, value in head.headers}
        return head.status_code, headers, body


async def read_to_eof(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


def parse_raw(data: bytes) -> tuple[int, dict[str, str], Any]:
    """Parse one response from raw bytes (the request was not sent through h11)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    head = conn.next_event()
    body = b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        body += event.data
    return head.status_code, {k.decode(): v.decode() for k, v in head.headers}, json.loads(body)


_DEFAULT_LIMITS = Limits()


async def raw_exchange(raw: bytes, limits: Limits = _DEFAULT_LIMITS) -> bytes:
    """Send raw bytes, return everything the server wrote until it closed."""
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: handle_connection(server, echo, limits=limits))
        await client.send_all(raw)
        data = await read_to_eof(client)
        await client.aclose()
    return data


# -- one connection in memory -----------------------------------------------------


async def test_simple_get() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: handle_connection(server_stream, echo, peer="10.0.0.9:5555"))
        client = Client(client_stream)
        status, headers, body = await client.request("GET", "/x/y?a=1&b=two&a=3&empty=")
        await client_stream.aclose()
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "method": "GET",
        "target": "/x/y?a=1&b=two&a=3&empty=",
        "path": "/x/y",
        "query": {"a": "3", "b": "two", "empty": ""},  # last wins
        "length": 0,
        "sha256": hashlib.sha256(b"").hexdigest(),
        "content_type": None,
        "peer": "10.0.0.9:5555",
    }
    assert b" " not in body  # compact JSON


async def test_keep_alive_two_requests_one_connection() -> None:
    calls = []

    async def handler(request: Request) -> Response:
        calls.append(request.path)
        return Response.cbor(201, b"\xa0", headers=(("x-n", str(len(calls))),))

    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: handle_connection(server_stream, handler))
        client = Client(client_stream)
        first = await client.request("GET", "/one")
        second = await client.request("GET", "/two")
        await client_stream.aclose()  # the server's loop ends when the client leaves
    assert calls == ["/one", "/two"]
    assert first == (201, {"content-type": "application/cbor", "content-length": "1", "x-n": "1"}, b"\xa0")
    assert second[2] == b"\xa0" and second[1]["x-n"] == "2"


async def test_pipelined_requests() -> None:
    one = b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n"
    data = await raw_exchange(one + one.replace(b"/a", b"/b").replace(b"x\r\n", b"x\r\nconnection: close\r\n"))
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert b'"path":"/a"' in data and b'"path":"/b"' in data


@pytest.mark.parametrize("chunked", [False, True])
async def test_post_body_delivered_intact(chunked: bool) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, every byte value
    headers = [("content-type", "application/cbor")]
    if chunked:
        headers.append(("transfer-encoding", "chunked"))
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: handle_connection(server_stream, echo))
        status, _, reply = await Client(client_stream).request("POST", "/upload", body, headers)
        await client_stream.aclose()
    assert status == 200
    answer = json.loads(reply)
    assert answer["length"] == len(body) and answer["sha256"] == hashlib.sha256(body).hexdigest()
    assert answer["content_type"] == "application/cbor"


async def test_expect_100_continue() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: handle_connection(server_stream, echo))
        client = Client(client_stream)
        headers = [("host", "x"), ("content-length", "5"), ("expect", "100-continue")]
        await client.send(h11.Request(method="PUT", target="/t", headers=headers))
        informational = await client.next_event()
        assert isinstance(informational, h11.InformationalResponse) and informational.status_code == 100
        await client.send(h11.Data(data=b"hello"), h11.EndOfMessage())
        status, _, reply = await client.response()
        await client_stream.aclose()
    assert status == 200 and json.loads(reply)["length"] == 5


async def test_head_has_no_body() -> None:
    data = await raw_exchange(b"HEAD /h HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: " in head and rest == b""


async def test_body_over_limit_declared() -> None:
    limits = Limits(max_body_bytes=1000)
    data = await raw_exchange(b"POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: 1001\r\n\r\n" + b"x" * 1001, limits)
    status, headers, body = parse_raw(data)
    assert status == 413 and headers["connection"] == "close"
    assert body["error"]["code"] == "too_large"


async def test_a_federation_body_over_limit_is_refused_in_cbor() -> None:
    import cbor2

    limits = Limits(max_body_bytes=1000)
    raw = b"PUT /_scaiwave/federation/v1/send/t HTTP/1.1\r\nhost: x\r\ncontent-length: 1001\r\n\r\n" + b"x" * 1001
    data = await raw_exchange(raw, limits)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and b"content-type: application/cbor" in head
    assert cbor2.loads(body)["error"]["code"] == "too_large"


async def test_body_over_limit_chunked() -> None:
    limits = Limits(max_body_bytes=1000)
    chunk = b"258\r\n" + b"x" * 600 + b"\r\n"  # 0x258 = 600 bytes
    data = await raw_exchange(
        b"POST /p HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n" + chunk + chunk + b"0\r\n\r\n", limits
    )
    status, _, body = parse_raw(data)
    assert status == 413 and body["error"]["code"] == "too_large"


async def test_header_over_limit() -> None:
    big = b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 2000 + b"\r\n\r\n"
    data = await raw_exchange(big, Limits(max_header_bytes=1000))
    status, _, body = parse_raw(data)
    assert status == 431 and body["error"]["code"] == "too_large"


@pytest.mark.parametrize(
    "garbage",
    [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n",
     b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"],
)
async def test_garbage_is_400_malformed(garbage: bytes) -> None:
    status, headers, body = parse_raw(await raw_exchange(garbage))
    assert status == 400 and headers["connection"] == "close"
    assert body["error"]["code"] == "malformed"


async def test_handler_exception_is_500_without_details(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="scaiwave.http"):
        data = await raw_exchange(b"GET /boom HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    status, _, body = parse_raw(data)
    assert status == 500
    assert body == {"error": {"code": "internal_error", "message": "internal error"}}
    assert b"Traceback" not in data and b"secret" not in data and b"RuntimeError" not in data
    # The operator's log has it all.
    assert "secret database password" in caplog.text and "Traceback" in caplog.text


async def test_connection_survives_a_failing_handler() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: handle_connection(server_stream, echo))
        client = Client(client_stream)
        assert (await client.request("GET", "/boom"))[0] == 500
        assert (await client.request("GET", "/fine"))[0] == 200
        await client_stream.aclose()


async def test_idle_timeout_closes(autojump_clock: trio.testing.MockClock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: handle_connection(server_stream, echo, limits=Limits(idle_timeout=60)))
        client = Client(client_stream)
        assert (await client.request("GET", "/a"))[0] == 200
        start = trio.current_time()
        assert await read_to_eof(client_stream) == b""  # closed without a word
        assert trio.current_time() - start == pytest.approx(60)


async def test_read_timeout_is_408(autojump_clock: trio.testing.MockClock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: handle_connection(server_stream, echo, limits=Limits(read_timeout=30)))
        start = trio.current_time()
        await client_stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n")  # never finished
        data = await read_to_eof(client_stream)
        # EOF comes right after the reply: the server ends its side, then lingers.
        assert trio.current_time() - start == pytest.approx(30)
    status, _, body = parse_raw(data)
    assert status == 408 and body["error"]["code"] == "timeout"


async def test_handler_timeout_is_503(autojump_clock: trio.testing.MockClock) -> None:
    data = await raw_exchange(
        b"GET /slow HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", Limits(handler_timeout=5)
    )
    status, _, body = parse_raw(data)
    assert status == 503 and body["error"]["code"] == "timeout"


def test_response_constructors() -> None:
    assert Response.json(200, {"é": [1, 2]}).body == '{"é":[1,2]}'.encode()
    assert Response.cbor(200, b"\x01").content_type == "application/cbor"
    error = json.loads(Response.error(403, "peer_blocked", "no").body)
    assert error == {"error": {"code": "peer_blocked", "message": "no"}}
    with pytest.raises(ValueError):
        Response(100)
    request = Request("GET", "/p?x=1", (("a", "1"), ("a", "2")), b"")
    assert request.header("A") == "2" and request.header("b") is None


@pytest.mark.parametrize("response", [
    Response.json(200, {"a": 1}),
    Response.cbor(404, b"\xa0", headers=(("X-Retry", "3"), ("date", "Mon, 30 Nov 2026 13:47:19 GMT"))),
    Response(299, b"unnamed status", "text/plain"),
    Response(200, b"", "application/json", (("cache-control", "no-store"),)),
])
def test_wire_head_is_what_h11_writes(response: Response) -> None:
    """The head written without h11 (see _Connection._answer) is h11's bytes."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    conn.next_event(), conn.next_event()
    headers = [("content-type", response.content_type), ("content-length", str(len(response.body))),
               *response.headers]
    reason = {200: b"OK", 404: b"Not Found"}.get(response.status, b"")
    written = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    written += (conn.send(h11.Data(data=response.body)) if response.body else b"") + conn.send(h11.EndOfMessage())
    assert response.wire_head is not None and response.wire_head + response.body == written
    assert Response(200, b"x", headers=(("bad header", "v"),)).wire_head is None


async def test_answers_h11_must_write_still_close() -> None:
    """HTTP/1.0, a Connection: close among other tokens and an Upgrade are
    answered through h11, which closes (or would switch protocols) after them."""
    for raw in (b"GET /a HTTP/1.0\r\n\r\n", b"GET /a HTTP/1.1\r\nhost: x\r\nconnection: keep-alive, Close\r\n\r\n"):
        data = await raw_exchange(raw)
        assert data.count(b"HTTP/1.1 200 OK") == 1 and b"connection: close" in data.lower()
    data = await raw_exchange(b"GET /a HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n"
                              b"GET /b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert b'"path":"/a"' in data and b'"path":"/b"' in data


async def test_pipelined_requests_in_one_packet_with_eof() -> None:
    """Three requests and the client's end in one go: each answered in order,
    the bytes after each request carried to the next (h11 connection per answer)."""
    client, server = trio.testing.memory_stream_pair()
    one = b"POST /%d HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: handle_connection(server, echo))
        await client.send_all(b"".join(one % n for n in range(3)))
        await client.send_eof() if isinstance(client, trio.abc.HalfCloseableStream) else None
        data = await read_to_eof(client)
        await client.aclose()
    assert [json.loads(part.rsplit(b"\r\n\r\n", 1)[-1] or b"{}").get("path") for part in
            data.split(b"HTTP/1.1 ")[1:]] == ["/0", "/1", "/2"]


# -- real sockets, real TLS ---------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("your-host.test", "127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def trusting_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def test_real_tls(
    nursery: trio.Nursery, server_context: ssl.SSLContext, trusting_context: ssl.SSLContext
) -> None:
    port = await nursery.start(
        lambda task_status: serve_http(
            echo, host="127.0.0.1", port=0, ssl_context=server_context, task_status=task_status
        )
    )
    assert port > 0
    async with httpx.AsyncClient(verify=trusting_context) as client:
        reply = await client.post(f"https://127.0.0.1:{port}/x?y=1", content=b"abc")
        again = await client.get(f"https://127.0.0.1:{port}/again")  # same pooled connection
    assert reply.status_code == 200 and again.status_code == 200
    answer = reply.json()
    assert answer["path"] == "/x" and answer["query"] == {"y": "1"} and answer["length"] == 3
    assert answer["peer"].startswith("127.0.0.1:")

    # The real server name, checked by TLS, over a loopback connection.
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, trusting_context, server_hostname="your-host.test", https_compatible=True)
    status, _, body = await Client(tls).request("GET", "/named")
    assert status == 200 and json.loads(body)["path"] == "/named"
    await tls.aclose()

    # A client that does not trust the CA refuses; the server carries on.
    async with httpx.AsyncClient(verify=ssl.create_default_context()) as distrustful:
        with pytest.raises(httpx.ConnectError):
            await distrustful.get(f"https://127.0.0.1:{port}/x")
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    wrong_name = trio.SSLStream(tcp, trusting_context, server_hostname="other.test")
    with pytest.raises(trio.BrokenResourceError):
        await wrong_name.do_handshake()
    await trio.aclose_forcefully(wrong_name)
    async with httpx.AsyncClient(verify=trusting_context) as client:
        assert (await client.get(f"https://127.0.0.1:{port}/still-up")).status_code == 200


async def test_plain_tcp_and_graceful_shutdown() -> None:
    started = trio.Event()

    async def handler(request: Request) -> Response:
        if request.path == "/in-flight":
            started.set()
            await trio.sleep(0.3)
        return Response.json(200, {"path": request.path})

    results: dict[str, Any] = {}
    server_scope = trio.CancelScope()

    async def run_server(task_status: trio.TaskStatus[int]) -> None:
        with server_scope:
            await serve_http(handler, host="127.0.0.1", port=0, ssl_context=None, grace=5.0, task_status=task_status)

    async def in_flight(port: int) -> None:
        async with httpx.AsyncClient() as client:
            results["reply"] = await client.get(f"http://127.0.0.1:{port}/in-flight")

    async with trio.open_nursery() as nursery:
        port = await nursery.start(run_server)
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        idle_client = Client(idle)
        assert (await idle_client.request("GET", "/warm-up"))[0] == 200  # now an idle keep-alive connection
        nursery.start_soon(in_flight, port)
        await started.wait()
        server_scope.cancel()
        with trio.fail_after(0.2):  # idle connections close at once, not after the grace
            assert await read_to_eof(idle) == b""
        await idle.aclose()
    reply = results["reply"]
    assert reply.status_code == 200 and reply.json() == {"path": "/in-flight"}
    assert reply.headers["connection"] == "close"
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)  # the listener is gone


async def test_grace_runs_out() -> None:
    # A handler that outlives the grace is cancelled; serve_http then returns.
    started = trio.Event()

    async def stuck(request: Request) -> Response:
        started.set()
        await trio.sleep_forever()
        raise AssertionError

    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        with scope:
            await serve_http(stuck, host="127.0.0.1", port=0, ssl_context=None, grace=0.3, task_status=task_status)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(run)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /stuck HTTP/1.1\r\nhost: x\r\n\r\n")
        await started.wait()
        start = trio.current_time()
        scope.cancel()
    assert 0.25 < trio.current_time() - start < 2.0
    assert await read_to_eof(stream) == b""  # cut off: no reply
    await stream.aclose()


async def test_bad_handler_headers_and_bodiless_statuses(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(request: Request) -> Response:
        if request.path == "/bad-header":
            return Response(200, b"x", headers=(("bad header", "v"),))
        return Response(204, b"ignored")

    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: handle_connection(server_stream, handler))
        client = Client(client_stream)
        assert await client.request("GET", "/empty") == (204, {}, b"")
        status, headers, body = await client.request("GET", "/bad-header")
        assert (status, body, headers["connection"]) == (500, b"", "close")
        assert await read_to_eof(client_stream) == b""
    assert "invalid response headers" in caplog.text


class _CountingStream(trio.abc.Stream):
    """A memory stream that counts the writes the server makes (one TLS record each over TLS)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner, self.writes = inner, 0

    async def send_all(self, data: bytes) -> None:
        self.writes += 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_response_is_one_write() -> None:
    """Head, body and end of a response leave in one send (over TLS: one
    record, not two), on every request of a keep-alive connection."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    counting = _CountingStream(server_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_connection, counting, echo)
        client = Client(client_stream)
        for n in range(1, 4):
            status, _headers, body = await client.request("POST", f"/x{n}", b"payload")
            assert status == 200 and json.loads(body)["length"] == 7
            assert counting.writes == n
        status, headers, body = await client.request("HEAD", "/y")
        assert status == 200 and body == b"" and counting.writes == 4
        await client_stream.aclose()
