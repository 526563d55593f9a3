"""The daemon's outbound HTTPS client to peer servers (h11 on Trio).

One :class:`PeerClient` keeps the daemon's connections to peers (kept
alive, reused, at most :data:`_IDLE_MAX` idle). It speaks to peers by
*server name* (``peer.test:8449``, 443 when no port is given) and turns
every transport failure into a :class:`TransportError` with a stable code
and a one-line message naming the real cause. HTTP error statuses are *not*
exceptions: the caller gets a :class:`PeerResponse` and decodes the peer's
refusal body.

It is h11 on a Trio TLS stream, as the daemon's server is, and not httpx:
a federation transaction's PUT cost the sender about 0.5 ms of CPU through
httpx (its request and URL models, its transport and pool layers, the
stream wrappers around the body) and about 0.16 ms through h11 alone; in a
queue drained to a peer, the sender's event loop went from 17-22 to 10-12
µs a message (``python -m bench.federation`` measures the delivery rows).

Resolve overrides (``SCAIWAVE_RESOLVE``, like curl's ``--resolve``) change only
where the TCP connection goes: TLS sends SNI for the server name and checks
the certificate against it (``check_hostname``; tests/test_shell_client.py
proves a wrong-name certificate fails), and ``Host`` is the server name.
Connections are pooled by the name they were verified for: two names the
admin pinned to one address:port never share one.

Names not pinned that way are resolved by the client itself and connected to
only at an address ``core.netguard`` allows: no loopback, private or
link-local address unless ``SCAIWAVE_OUTBOUND_ALLOW`` names its range
(``address_blocked`` otherwise). The address checked is the address
connected to: a DNS answer cannot change between the two.

Nothing from the environment changes whom we talk to or trust (no proxy
variables, no ``SSL_CERT_FILE``, no ``.netrc``); no cookie is kept (peers
authenticate by signature); ``Accept-Encoding: identity``, so bodies are
returned, and size-capped, exactly as they crossed the wire.

:func:`backoff_ms` (the retry schedule) lives in ``core.delivery``; it is re-exported here.

Bounds that keep one peer from stalling or starving the others (issue 16):

- a **total deadline** per request (``deadline``, default 30 s): waiting for
  a connection slot, connecting, TLS, sending and reading the whole body
  must finish in time. ``timeout`` bounds each step (a connect, a read, a
  write), so a peer trickling one byte a second would otherwise hold a
  request for ever;
- a **per-peer limit** on requests in flight (``per_peer``, default 8).
  Connections have no overall cap (a cap of 100 let 115 trickling
  strangers take every connection and a post to a healthy peer failed
  after 21 s): each peer is bounded on its own, and what can make us talk
  to many peers at once is capped where it starts (descriptor fetches,
  ``core.limits``);
- a response larger than ``max_response_bytes`` is refused (``too_large``),
  before a byte of it is read when its ``Content-Length`` says so.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Any, Sequence

import h11
import trio

from scaiwave_federation.core import backoff_ms
from scaiwave_federation.core import split_server_name as _core_split_server_name
from scaiwave_federation.core import Network, address_refusal

__all__ = [
    "DESCRIPTOR_PATH",
    "DESCRIPTOR_DEADLINE_S",
    "PeerClient",
    "PeerResponse",
    "TransportError",
    "backoff_ms",
    "split_server_name",
]

# One parser of server names, the core's (canonical spelling only).
split_server_name = _core_split_server_name

DESCRIPTOR_PATH = "/.well-known/scaiwave"
#: A descriptor fetch must be complete within this (or the client's deadline, if shorter):
#: a stranger trickling its descriptor holds a fetch slot no longer than this.
DESCRIPTOR_DEADLINE_S = 10.0


class TransportError(Exception):
    """A peer could not be talked to.

    ``code`` is one of the stable refusal codes ``"tls_failure"``,
    ``"peer_unreachable"``, ``"no_descriptor"``, ``"too_large"``,
    ``"address_blocked"`` (the same
    strings as ``scaiwave_federation.core.codes.Code``); ``message`` is one
    line naming the real cause.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class PeerResponse:
    """A complete HTTP response from a peer: status, lower-cased headers, body."""

    status: int
    headers: dict[str, str]
    body: bytes


class _AddressBlocked(OSError):
    """A name that leads only to addresses outbound federation may not reach."""


class _Closed(Exception):
    """The peer closed the connection before its answer was complete."""


class _ConnectTimeout(Exception):
    """Resolving, connecting or the TLS handshake took longer than the timeout."""


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything behind it, outermost first.

    Follows ``__cause__``/``__context__`` and the members of exception groups
    (trio reports "all attempts to connect failed" as a group holding the
    ConnectionRefusedError of each address tried).
    """
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return seen


class _Conn:
    """One HTTPS connection to a peer: a Trio TLS stream and h11's client state."""

    __slots__ = ("stream", "http")

    def __init__(self, stream: trio.SSLStream) -> None:
        self.stream = stream
        self.http = h11.Connection(h11.CLIENT)

    @property
    def socket(self) -> Any:
        return self.stream.transport_stream.socket

    def reusable(self) -> bool:
        """Idle, and the peer has not closed it meanwhile (a readable idle
        socket is an EOF or bytes nobody asked for: either way, not reused)."""
        return self.http.our_state is h11.IDLE and not self.socket.is_readable()

    def close(self) -> None:
        """Drop the connection at once (no TLS goodbye: what was not a complete
        exchange is not worth one), safe in a cancelled task and twice."""
        self.socket.close()


#: Bytes read from the socket at a time.
_READ_SIZE = 64 * 1024
#: Idle connections kept for reuse, across all peers.
_IDLE_MAX = 64
#: Sent with every request. Accept-Encoding identity: bodies are returned (and
#: size-capped) exactly as they crossed the wire, so no decompression bombs.
_DEFAULT_HEADERS = (("Accept-Encoding", "identity"), ("User-Agent", "scaiwave-federation"),
                    ("Connection", "keep-alive"))


class PeerClient:
    """Outbound HTTPS to peers; use as ``async with PeerClient(...) as c``.

    ``ssl_context`` verifies peers (chain and host name: keep
    ``check_hostname`` on). ``resolve`` maps ``(host, port)`` to the address to
    connect to instead of using DNS. ``timeout`` (seconds) bounds each of
    connect, read and write; ``deadline`` (seconds) bounds the whole request,
    from waiting for a slot to the last byte of the body; ``per_peer`` is how
    many requests to one server may be in flight at once (the others wait,
    inside their deadline). Bodies larger than ``max_response_bytes`` are
    refused with ``too_large``.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        resolve: dict[tuple[str, int], str] | None = None,
        timeout: float = 10.0,
        deadline: float = 30.0,
        per_peer: int = 8,
        max_response_bytes: int = 8 * 1024 * 1024,
        outbound_allow: Sequence[Network] = (),
    ) -> None:
        self._resolve = {(h.lower(), p): a for (h, p), a in (resolve or {}).items()}
        self._timeout = timeout
        self._deadline = deadline
        self._per_peer = per_peer
        self._slots: dict[tuple[str, int], list] = {}  # (host, port) -> [limiter, users]
        self._max = max_response_bytes
        self._ssl = ssl_context
        self._allowed = tuple(outbound_allow)
        #: (host, port, address) -> idle connections, most recently used last.
        #: Keyed by the name a connection was verified for, never by address
        #: alone: two names the admin pinned to one address:port never share one.
        self._idle: dict[tuple[str, int, str | None], list[_Conn]] = {}

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every idle pooled connection. Safe to call twice."""
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
        await trio.lowlevel.checkpoint()

    async def get(
        self, server_name: str, target: str, *, headers: dict[str, str] | None = None
    ) -> PeerResponse:
        """GET ``target`` (path and query) from ``server_name``; see :meth:`request`."""
        return await self.request(server_name, "GET", target, headers=headers)

    async def request(
        self,
        server_name: str,
        method: str,
        target: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        deadline: float | None = None,
    ) -> PeerResponse:
        """Send one request to ``server_name`` and read the whole response.

        ``target`` is sent byte for byte as the request target (it is what the
        caller signed). Returns the response whatever its status. Raises
        TransportError (``tls_failure``, ``peer_unreachable``, ``too_large``;
        ``peer_unreachable`` also when the whole exchange overruns the
        deadline, ``deadline`` seconds when given, else the client's); raises
        ValueError if ``target`` does not start with ``/``
        or holds spaces, control or non-ASCII characters (caller misuse).
        """
        bad = not target.isascii() or any(c <= " " or c == "\x7f" for c in target)
        if bad or not target.startswith("/"):
            raise ValueError(f"invalid request target {target!r}")
        try:
            host, port = split_server_name(server_name)
        except ValueError as exc:
            raise TransportError("peer_unreachable", str(exc)) from None
        key = (host.lower(), port)
        address = self._resolve.get(key)
        # Connect to the override, if any, but verify, send SNI and Host as the name.
        head = [("Host", server_name), *_DEFAULT_HEADERS, *(headers or {}).items()]
        if body or method in ("PUT", "POST"):
            head.append(("Content-Length", str(len(body))))
        where = server_name + (f" ({address})" if address else "")
        slot = self._slots.setdefault(key, [trio.CapacityLimiter(self._per_peer), 0])
        slot[1] += 1
        limit = self._deadline if deadline is None else min(deadline, self._deadline)
        try:
            with trio.move_on_after(limit):
                async with slot[0]:
                    try:
                        return await self._exchange((key[0], port, address), method, target, head, body, where)
                    except (OSError, ssl.SSLError, trio.TooSlowError, trio.BrokenResourceError,
                            h11.ProtocolError, _Closed, _ConnectTimeout) as exc:
                        raise self._classify(exc, where) from exc
            raise TransportError(
                "peer_unreachable", f"{where}: no complete answer within {limit:g}s"
            )
        finally:
            slot[1] -= 1
            if not slot[1]:
                del self._slots[key]  # no table of every name ever asked for

    async def _exchange(self, pool_key: tuple[str, int, str | None], method: str, target: str,
                        head: list[tuple[str, str]], body: bytes, where: str) -> PeerResponse:
        """One request and its whole answer on a kept-alive connection to the
        peer, or a new one. A connection goes back to the pool only once its
        exchange is complete; one left in any other state (an error, a cancel,
        a body too large) is closed."""
        conn = self._reuse(pool_key)
        if conn is None:
            conn = await self._connect(*pool_key)
        done = False
        try:
            http, stream = conn.http, conn.stream
            data = http.send(h11.Request(method=method, target=target.encode("ascii"), headers=head))
            if body:
                data += http.send(h11.Data(data=body))
            data += http.send(h11.EndOfMessage())
            with trio.fail_after(self._timeout):
                await stream.send_all(data)
            response = await self._next(conn, where)
            while isinstance(response, h11.InformationalResponse):
                response = await self._next(conn, where)
            assert isinstance(response, h11.Response)
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self._max:
                raise self._too_large(where)  # refuse before reading anything
            chunks: list[bytes] = []
            size = 0
            while True:
                event = await self._next(conn, where)
                if isinstance(event, h11.EndOfMessage):
                    break
                assert isinstance(event, h11.Data)
                size += len(event.data)
                if size > self._max:
                    raise self._too_large(where)
                chunks.append(bytes(event.data))
            done = True
            return PeerResponse(status=response.status_code, headers=headers, body=b"".join(chunks))
        finally:
            # Kept only after a complete exchange with nothing more sent: bytes
            # after the answer would be read as the answer to the next request.
            if done and http.our_state is h11.DONE and http.their_state is h11.DONE \
                    and not http.trailing_data[0]:
                http.start_next_cycle()
                self._keep(pool_key, conn)
            else:
                conn.close()

    async def _next(self, conn: _Conn, where: str) -> Any:
        """The peer's next h11 event, reading from the socket as needed."""
        while True:
            event = conn.http.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_after(self._timeout):
                    data = await conn.stream.receive_some(_READ_SIZE)
                conn.http.receive_data(bytes(data))
                continue
            if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                raise _Closed("the peer closed the connection before its answer was complete")
            return event

    def _reuse(self, pool_key: tuple[str, int, str | None]) -> _Conn | None:
        conns = self._idle.get(pool_key)
        while conns:
            conn = conns.pop()
            if conn.reusable():
                if not conns:
                    del self._idle[pool_key]
                return conn
            conn.close()  # gone stale while idle
        self._idle.pop(pool_key, None)
        return None

    def _keep(self, pool_key: tuple[str, int, str | None], conn: _Conn) -> None:
        if sum(len(c) for c in self._idle.values()) >= _IDLE_MAX:
            conn.close()
            return
        self._idle.setdefault(pool_key, []).append(conn)

    async def _connect(self, host: str, port: int, address: str | None) -> _Conn:
        """A new TLS connection to ``host``:``port`` (at ``address`` when the
        admin pinned one): the name resolved here, and only an address the
        core allows connected to (``core.netguard``); SNI and the certificate
        check are for the name."""
        try:
            return await self._open(host, port, address)
        except trio.TooSlowError:
            raise _ConnectTimeout() from None

    async def _open(self, host: str, port: int, address: str | None) -> _Conn:
        with trio.fail_after(self._timeout):
            if address is not None:
                addresses = [address]  # pinned by the admin: it passes
            else:
                infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                found = list(dict.fromkeys(str(info[4][0]) for info in infos))
                addresses = [a for a in found if address_refusal(a, allowed=self._allowed) is None]
                if not addresses:
                    refusal = address_refusal(found[0], allowed=self._allowed) if found else None
                    raise _AddressBlocked(f"{host} resolves to {', '.join(found[:4])}: "
                                          f"{refusal.detail if refusal else 'no address'}")
            error: Exception | None = None
            for candidate in addresses:
                try:
                    tcp = await trio.open_tcp_stream(candidate, port)
                    break
                except OSError as exc:
                    error = exc
            else:
                assert error is not None
                raise error
            stream = trio.SSLStream(tcp, self._ssl, server_hostname=host, https_compatible=True)
            try:
                await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        return _Conn(stream)

    def _too_large(self, where: str) -> TransportError:
        return TransportError("too_large", f"response from {where} exceeds {self._max} bytes")

    async def fetch_descriptor(self, server_name: str) -> bytes:
        """GET ``/.well-known/scaiwave`` and return the body bytes, unparsed,
        within :data:`DESCRIPTOR_DEADLINE_S` (a descriptor is at most 64 KiB).

        Raises TransportError ``no_descriptor`` on any status but 200, and the
        transport errors of :meth:`request`.
        """
        resp = await self.request(server_name, "GET", DESCRIPTOR_PATH, deadline=DESCRIPTOR_DEADLINE_S)
        if resp.status != 200:
            raise TransportError(
                "no_descriptor",
                f"{server_name} publishes no {DESCRIPTOR_PATH} (HTTP {resp.status})",
            )
        return resp.body

    def _classify(self, exc: BaseException, where: str) -> TransportError:
        """Map a failure of the exchange to a TransportError naming the real
        cause (trio wraps TLS errors in BrokenResourceError, and reports
        "all attempts to connect failed" as a group holding each address's
        error: the cause is searched along the whole chain)."""
        chain = _chain(exc)
        for e in chain:
            if isinstance(e, _AddressBlocked):
                return TransportError("address_blocked", f"not connecting to {where}: {e}")
        for e in chain:
            if isinstance(e, ssl.SSLCertVerificationError):
                reason = e.verify_message or e.reason or str(e)
                return TransportError(
                    "tls_failure", f"TLS with {where} failed: certificate verify failed: {reason}"
                )
        for e in chain:
            if isinstance(e, ssl.SSLError):
                reason = e.reason or str(e)
                return TransportError("tls_failure", f"TLS with {where} failed: {reason}")
        if isinstance(exc, (_ConnectTimeout, trio.TooSlowError)):
            phase = "connecting to" if isinstance(exc, _ConnectTimeout) else "waiting for"
            return TransportError(
                "peer_unreachable", f"{phase} {where}: timed out after {self._timeout:g}s"
            )
        for e in chain:
            if isinstance(e, ConnectionRefusedError):
                return TransportError("peer_unreachable", f"connection refused by {where}")
            if isinstance(e, socket.gaierror):
                return TransportError(
                    "peer_unreachable", f"cannot resolve {where}: {e.strerror or e}"
                )
        for e in chain:
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            if text:
                return TransportError("peer_unreachable", f"{where}: {text}")
        return TransportError("peer_unreachable", f"{where}: {type(exc).__name__}")
