"""A small HTTP/1.1 server: h11 for the protocol, Trio for the I/O.

:func:`handle_connection` runs one connection (keep-alive, size limits,
timeouts, error replies); :func:`serve_http` accepts connections, optionally
wraps them in TLS, and runs each in its own task of one connection nursery.
Handlers are ``async def handler(request: Request) -> Response``; they never see
h11, and an exception in a handler becomes a 500 whose details go to the log
only. h11 reads every request; the common answer (HTTP/1.1, keep-alive, with
a body) is written as h11 would write it, from a head h11 checked once per
:class:`Response` object (see ``_Connection._answer``), so an answer given
again and again (the descriptor) is not checked and written again each time.

Error replies are JSON ``{"error": {"code": ..., "message": ...}}``:
``malformed`` (400), ``too_large`` (413, or 431 for headers), ``timeout`` (408
when a request is not read in time, 503 when the handler is too slow),
``internal_error`` (500).
"""

from __future__ import annotations

import errno
import functools
import http
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

import h11
import trio

__all__ = ["Request", "Response", "Handler", "Limits", "handle_connection", "serve_http"]

log = logging.getLogger("scaiwave.http")

RECEIVE_SIZE = 65536
_REASONS = {status.value: status.phrase.encode("ascii") for status in http.HTTPStatus}
#: How long the final close (TLS close_notify) may take.
CLOSE_TIMEOUT = 2.0
#: After an error reply, how much unread input we drain before closing (see _linger).
LINGER_MAX_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Request:
    """One HTTP request, fully read. Header names are lower-case; values are latin-1 text."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    peer: str = ""

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found

    @functools.cached_property
    def path(self) -> str:
        """The target without its query string (still percent-encoded); split once
        (the handler, the route table, the access line and the metrics all ask)."""
        target = self.target
        if target[:1] == "/" and target[1:2] != "/" and "?" not in target and "#" not in target:
            return target  # what urlsplit answers for an origin-form target, without its cost
        return urlsplit(target).path

    @property
    def query(self) -> dict[str, str]:
        """The query string's parameters, decoded; the last of repeated keys wins."""
        return dict(parse_qsl(urlsplit(self.target).query, keep_blank_values=True))


@dataclass(frozen=True)
class Response:
    """What a handler returns. ``headers`` must not repeat content-type/-length."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # 1xx replies are the server's business (100-continue), not a handler's.
        if not 200 <= self.status <= 599:
            raise ValueError(f"status must be 200..599, got {self.status}")

    @functools.cached_property
    def wire_head(self) -> bytes | None:
        """The status line and headers (content type and length first) exactly as
        h11 writes them for an HTTP/1.1 client, checked by h11 once per Response
        (a Response answered many times, like the descriptor, is checked and
        written once); None when h11 refuses the headers (a handler's bug)."""
        try:
            event = h11.Response(status_code=self.status, reason=_REASONS.get(self.status, b""),
                                 headers=[("content-type", self.content_type),
                                          ("content-length", str(len(self.body))), *self.headers])
        except (h11.LocalProtocolError, UnicodeError):
            return None
        # h11's writer: the status line, host first (never in a response, but alike), the rest in order.
        items = event.headers.raw_items()
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.status, bytes(event.reason))]
        lines += [b"%s: %s\r\n" % item for item in items if item[0].lower() == b"host"]
        lines += [b"%s: %s\r\n" % item for item in items if item[0].lower() != b"host"]
        lines.append(b"\r\n")
        return b"".join(lines)

    @classmethod
    def json(cls, status: int, obj: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        """A compact UTF-8 JSON reply; raises TypeError for objects json can't encode."""
        body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return cls(status, body, "application/json", headers)

    @classmethod
    def cbor(cls, status: int, payload: bytes, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        """A reply whose body is already-encoded CBOR."""
        return cls(status, payload, "application/cbor", headers)

    @classmethod
    def error(cls, status: int, code: str, message: str, *, path: str = "") -> Response:
        """The contract's error shape ``{"error": {"code", "message"}}``: JSON,
        or CBOR when ``path`` is a federation path (peers read CBOR only, so a
        500 there must be CBOR too or the peer sees an unreadable answer)."""
        if path.startswith(FEDERATION_PREFIX):
            from scaiwave_federation.core import encode

            return cls.cbor(status, encode({"error": {"code": code, "message": message}}))
        return cls.json(status, {"error": {"code": code, "message": message}})


Handler = Callable[[Request], Awaitable[Response]]

#: Paths whose answers, errors included, are CBOR (server-to-server).
FEDERATION_PREFIX = "/_scaiwave/federation/"


@dataclass(frozen=True)
class Limits:
    """Size limits (bytes) and timeouts (seconds) for one connection."""

    max_header_bytes: int = 16384
    max_body_bytes: int = 4 * 1024 * 1024
    read_timeout: float = 30.0  # to finish reading a request once its first byte came
    idle_timeout: float = 60.0  # for the first byte of the next request (keep-alive)
    handler_timeout: float = 120.0  # to answer: the handler, then sending its response
    linger_timeout: float = 1.0  # draining input after an error reply, see _linger


class _Reply(Exception):
    """Answer with this error and close the connection."""

    def __init__(self, status: int, code: str, message: str, path: str = "") -> None:
        super().__init__(message)
        self.response = Response.error(status, code, message, path=path)


class _Quit(Exception):
    """Close the connection without a reply (idle timeout, peer gone, server draining)."""


@dataclass
class _Drain:
    """Shared by a server's connections, so that shutdown can wind them down."""

    draining: bool = False
    grace: float = 0.0
    connections: set[_Connection] = field(default_factory=set)
    shields: set[trio.CancelScope] = field(default_factory=set)

    def start(self, grace: float) -> None:
        self.draining, self.grace = True, grace
        for conn in self.connections:
            if conn.idle and conn.scope is not None:
                conn.drained = True
                conn.scope.cancel()  # nothing in flight there: close now
        for scope in self.shields:
            scope.deadline = trio.current_time() + grace


# What a connection is doing, for its one cancel scope's deadline: waiting for a
# request (idle_timeout), reading one (read_timeout), or answering it (handler_timeout).
_IDLE, _READING, _ANSWERING = 0, 1, 2


class _Connection:
    """One connection's state: the h11 machine, the stream, and one cancel scope
    whose deadline follows what the connection is doing (set twice a request:
    a scope per read and per handler call cost more than the rest of the layer)."""

    def __init__(
        self, stream: trio.abc.Stream, handler: Handler, limits: Limits, peer: str, drain: _Drain | None
    ) -> None:
        self.stream, self.handler, self.limits, self.peer = stream, handler, limits, peer
        self.drain = drain or _Drain()
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.idle = True  # waiting for the first byte of a request
        self.phase = _IDLE
        self.scope: trio.CancelScope | None = None
        self.drained = False  # the scope was cancelled by shutdown, not by a deadline
        self.reading_timed = False  # the deadline is the current request's read_timeout
        # The request being answered is HTTP/1.1, keep-alive, no upgrade: its
        # answer may be written without h11 (see _answer).
        self.plain = False

    async def run(self) -> None:
        self.drain.connections.add(self)
        try:
            while await self._serve_requests():
                pass
        except _Reply as reply:
            await self._reply_and_linger(reply.response)
        except _Quit:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
            # Peer vanished, reset, or failed the TLS handshake (SSLStream wraps
            # ssl errors in BrokenResourceError): nothing to answer, nobody to tell.
            log.debug("connection from %s ended: %r", self.peer, exc)
        finally:
            self.drain.connections.discard(self)
            await self._close()

    async def _serve_requests(self) -> bool:
        """Serve requests under one cancel scope until the connection ends
        (False) or a handler runs out of time (True: answered 503, go on)."""
        request: Request | None = None
        with trio.CancelScope() as self.scope:
            while True:
                request = None
                # Bytes already buffered (pipelining) mean the next request has begun.
                self.idle = not self.h11.trailing_data[0]
                self.phase = _IDLE if self.idle else _READING
                if self.idle and self.drain.draining:
                    raise _Quit
                self.reading_timed = not self.idle
                timeout = self.limits.idle_timeout if self.idle else self.limits.read_timeout
                self.scope.deadline = trio.current_time() + timeout
                request = await self._read_request()
                # The answer (handler and sending) must be done within handler_timeout.
                self.phase = _ANSWERING
                self.scope.deadline = trio.current_time() + self.limits.handler_timeout
                # The handler, under the connection's scope with handler_timeout
                # as its deadline (a timeout is answered 503 below).
                try:
                    response = await self.handler(request)
                    if not isinstance(response, Response):
                        raise TypeError(f"handler returned {type(response).__name__}, not Response")
                except Exception:
                    response = self._failed(request)
                if not await self._answer(response, head=request.method == "HEAD"):
                    return False
        # Only a cancellation gets here (our deadline, or shutdown while idle).
        if self.phase == _IDLE or self.drained:
            raise _Quit  # keep-alive idle timeout or shutdown: close silently
        if self.phase == _READING or request is None:
            raise _Reply(408, "timeout", f"request not received within {self.limits.read_timeout:g} s")
        if self.h11.our_state is not h11.SEND_RESPONSE:
            raise _Quit  # the answer was being sent: all we can do is close
        log.warning("%s %s from %s: handler took over %g s", request.method, request.path, self.peer,
                    self.limits.handler_timeout)
        response = Response.error(503, "timeout", "the server took too long to answer", path=request.path)
        return await self._answer(response, head=request.method == "HEAD")

    # -- reading ---------------------------------------------------------------

    async def _receive(self) -> bytes:
        if self.phase == _READING and not self.reading_timed:
            # A request that began needs more bytes: from its first byte on (just
            # received), it must arrive within read_timeout. Most requests come
            # in one piece and never move the deadline from idle_timeout.
            self.scope.deadline = trio.current_time() + self.limits.read_timeout  # type: ignore[union-attr]
            self.reading_timed = True
        data = await self.stream.receive_some(RECEIVE_SIZE)
        if self.idle and data:
            self.idle, self.phase = False, _READING
        return cast(bytes, data)  # a bytearray from the TLS stream: h11 takes it as is (no copy)

    def _poll_event(self) -> Any:
        """h11's next event from what is buffered, or NEED_DATA."""
        try:
            return self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                raise _Reply(431, "too_large", f"request head over {self.limits.max_header_bytes} bytes") from None
            raise _Reply(400, "malformed", f"malformed HTTP request: {exc}") from None

    async def _next_event(self) -> Any:
        while (event := self._poll_event()) is h11.NEED_DATA:
            self.h11.receive_data(await self._receive())
        return event

    async def _read_request(self) -> Request:
        event = await self._next_event()
        if isinstance(event, h11.ConnectionClosed):
            raise _Quit
        assert isinstance(event, h11.Request), event
        # h11 bounds only a head that arrives in pieces; one that came whole is measured here.
        head_size = len(event.target)
        headers = []
        length = None
        # What h11 would make of the connection after this request (its
        # _keep_alive and switch proposals), conservatively: any "close" in a
        # Connection header, an Upgrade or a CONNECT leaves the answer to h11.
        plain = event.http_version == b"1.1" and event.method != b"CONNECT"
        expect = False
        # raw_items() is one list; iterating the Headers sequence itself costs a
        # Python-level __getitem__ per header. h11's lower-case name is raw.lower().
        for raw, value in event.headers.raw_items():
            name = raw.lower()
            head_size += len(name) + len(value) + 4
            if name == b"content-length":
                length = value
            elif name == b"connection":
                plain = plain and b"close" not in value.lower()
            elif name == b"upgrade":
                plain = False
            elif name == b"expect":
                expect = True
            headers.append((name.decode("ascii"), value.decode("latin-1")))
        self.plain = plain
        if head_size > self.limits.max_header_bytes:
            # Once the head is read, refusals on a federation path are CBOR (Response.error).
            raise _Reply(431, "too_large", f"request head over {self.limits.max_header_bytes} bytes",
                         event.target.decode("ascii", "replace"))
        limit = self.limits.max_body_bytes
        if length is not None and int(length) > limit:  # h11 validated it as digits
            raise _Reply(413, "too_large", f"body over {limit} bytes", event.target.decode("ascii", "replace"))
        if expect and self.h11.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        parts, size = [], 0
        while True:
            part = self._poll_event()  # a request without a body has its end buffered already
            if part is h11.NEED_DATA:
                part = await self._next_event()
            if type(part) is h11.EndOfMessage:
                break
            if isinstance(part, h11.ConnectionClosed):  # h11 raises for a truncated body; be safe
                raise _Quit
            parts.append(part.data)
            size += len(part.data)
            if size > limit:  # chunked bodies have no length up front
                raise _Reply(413, "too_large", f"body over {limit} bytes", event.target.decode("ascii", "replace"))
        method, target = event.method.decode("ascii"), event.target.decode("ascii")  # h11 checked: ASCII
        body = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
        return Request(method, target, tuple(headers), body, self.peer)

    # -- answering -------------------------------------------------------------

    def _failed(self, request: Request) -> Response:
        """The answer to a handler that raised (called in its ``except``)."""
        # The traceback is for the operator's log only; it may hold secrets.
        log.exception("%s %s from %s: handler failed", request.method, request.path, self.peer)
        return Response.error(500, "internal_error", "internal error", path=request.path)

    async def _answer(self, response: Response, *, head: bool) -> bool:
        """Send ``response`` to the request just read; True when the connection
        goes on to the next request.

        The common answer (HTTP/1.1 keep-alive, a body, not HEAD, not closing)
        is written without h11: its head as h11 would write it
        (:attr:`Response.wire_head`, checked by h11 once per Response) and its
        body in one write, and the next request is read by a new h11
        connection that starts with the bytes the client already sent
        (pipelining). h11's send path re-validated and re-wrote the same
        headers on every answer: about a fifth of the cost of a small GET.
        Everything else (HEAD, 204/304, closing, HTTP/1.0, a ``Connection:
        close``, headers h11 refuses) goes through h11 as before."""
        close = self.drain.draining
        conn = self.h11
        if (self.plain and not close and not head and response.status not in (204, 304)
                and conn.our_state is h11.SEND_RESPONSE and conn.their_state is h11.DONE):
            wire = response.wire_head
            if wire is not None:
                # Replaced before the write: if the write is cancelled midway,
                # our_state is no longer SEND_RESPONSE, so no 503 follows a
                # partial answer (see _serve_requests).
                data, closed = conn.trailing_data
                self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
                if data:
                    self.h11.receive_data(data)
                if closed:
                    self.h11.receive_data(b"")
                await self.stream.send_all(wire + response.body if response.body else wire)
                return True
        await self._send_response(response, head=head, close=close)
        if close or self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
            return False
        self.h11.start_next_cycle()
        return True

    async def _send(self, *events: Any) -> None:
        # The connection's one task is the only sender (requests are served
        # one after another), so no lock: one send_all per call, and a whole
        # response is one call, so one TLS record for a small reply.
        data = b"".join(self.h11.send(event) or b"" for event in events)
        if data:
            await self.stream.send_all(data)

    async def _send_response(self, response: Response, *, head: bool = False, close: bool = False) -> None:
        # 204 and 304 carry no body, and so no content headers (RFC 9110).
        bodiless = response.status in (204, 304)
        headers: list[Any]  # (name, value) pairs, str or bytes: h11 takes either
        if bodiless:
            headers = [*response.headers]
        else:
            headers = [(b"content-type", response.content_type.encode("latin-1")),
                       (b"content-length", b"%d" % len(response.body)), *response.headers]
        if close:
            headers.append((b"connection", b"close"))
        try:
            # An unregistered status is allowed, just unnamed.
            event = h11.Response(status_code=response.status, headers=headers,
                                 reason=_REASONS.get(response.status, b""))
        except h11.LocalProtocolError:
            # A handler put an invalid header in its Response: its bug, answered as one.
            log.exception("invalid response headers for %s: %r", self.peer, response.headers)
            event = h11.Response(status_code=500, headers=[("content-length", "0"), ("connection", "close")])
            bodiless = True
        if response.body and not head and not bodiless:
            data = self.h11.send(event) + self.h11.send(h11.Data(data=response.body))
            await self.stream.send_all(data + (self.h11.send(h11.EndOfMessage()) or b""))
        else:
            await self._send(event, h11.EndOfMessage())

    async def _reply_and_linger(self, response: Response) -> None:
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a reply is already under way; all we can do is close
        try:
            await self._send_response(response, close=True)
            await self._linger()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError) as exc:
            log.debug("could not send error reply to %s: %r", self.peer, exc)

    async def _linger(self) -> None:
        # Closing a TCP socket with unread input makes the kernel send a reset,
        # which can destroy our error reply before the client reads it (a big
        # upload answered 413). So: end our side, then read and drop input for
        # a moment, until the client closes.
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            await self.stream.send_eof()
        drained = 0
        with trio.move_on_after(self.limits.linger_timeout):
            while drained < LINGER_MAX_BYTES:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                if not data:
                    break
                drained += len(data)

    async def _close(self) -> None:
        # Shielded so a cancelled connection still closes (and sends TLS
        # close_notify); bounded so a peer that stops reading can't hold us.
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
                pass


async def handle_connection(
    stream: trio.abc.Stream, handler: Handler, *, limits: Limits = Limits(), peer: str = ""
) -> None:
    """Serve HTTP/1.1 requests on ``stream`` until the client or a timeout ends it.

    Calls ``handler`` once per request (keep-alive: several per connection).
    Replies with JSON errors for malformed (400), oversized (413/431), slowly
    sent (408) requests and failing (500) or too slow (503) handlers. Closes
    ``stream`` before returning. Raises nothing but ``trio.Cancelled``:
    connection errors end the connection and are logged at debug level.
    ``peer`` is the client's address, passed on in ``Request.peer``.
    """
    await _Connection(stream, handler, limits, peer, None).run()


def _peer_text(stream: trio.abc.Stream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _connection_task(transport: trio.abc.Stream, handler: Handler, ssl_context: ssl.SSLContext | None,
                           limits: Limits, drain: _Drain) -> None:
    peer = _peer_text(transport)
    stream: trio.abc.Stream = transport
    if ssl_context is not None:
        # The handshake runs lazily on the first receive, so it falls under
        # the idle timeout and its failures end up in _Connection.run.
        stream = trio.SSLStream(transport, ssl_context, server_side=True, https_compatible=True)
    # Shielded: cancelling serve_http must not cut requests in flight; _Drain
    # gives the shield a deadline (the grace) instead.
    with trio.CancelScope(shield=True) as shield:
        if drain.draining:
            shield.deadline = trio.current_time() + drain.grace
        drain.shields.add(shield)
        try:
            await _Connection(stream, handler, limits, peer, drain).run()
        except Exception:
            # A bug here must not take the whole server down with it.
            log.exception("connection from %s crashed", peer)
        finally:
            drain.shields.discard(shield)


async def _accept_loop(listener: trio.SocketListener, nursery: trio.Nursery, handler: Handler,
                       ssl_context: ssl.SSLContext | None, limits: Limits, drain: _Drain) -> None:
    async with listener:
        while True:
            try:
                transport = await listener.accept()
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                    raise
                # Out of file descriptors or memory: wait for connections to end.
                log.error("accept failed (%s); pausing", errno.errorcode.get(exc.errno, exc.errno))
                await trio.sleep(0.1)
                continue
            nursery.start_soon(_connection_task, transport, handler, ssl_context, limits, drain)


async def serve_http(
    handler: Handler,
    *,
    host: str | None,
    port: int,
    ssl_context: ssl.SSLContext | None,
    limits: Limits = Limits(),
    grace: float = 5.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` and serve ``handler`` until cancelled.

    Each accepted connection runs :func:`handle_connection` in its own task,
    over TLS when ``ssl_context`` is given. ``task_status.started(port)``
    reports the bound port (useful with ``port=0``; when ``host`` resolves to
    several addresses, port 0 binds each to a different port and the first is
    reported). Raises OSError if it cannot listen.

    Shutdown: cancel the scope around ``serve_http``. Listeners close at once
    and idle keep-alive connections close; requests in flight get ``grace``
    seconds to finish (their reply says ``Connection: close``) before they
    are cancelled too. ``serve_http`` returns (re-raising the cancellation)
    only when every connection is closed.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port = listeners[0].socket.getsockname()[1]
    drain = _Drain()
    async with trio.open_nursery() as connections:
        try:
            async with trio.open_nursery() as acceptors:
                for listener in listeners:
                    acceptors.start_soon(
                        _accept_loop, listener, connections, handler, ssl_context, limits, drain
                    )
                task_status.started(bound_port)
        finally:
            drain.start(grace)
