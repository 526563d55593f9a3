"""The daemon's outbound HTTPS client to peer servers (httpx on Trio).

One :class:`PeerClient` holds one ``httpx.AsyncClient`` (one connection pool)
for the daemon's lifetime. It speaks to peers by *server name*
(``peer.test:8449``, 443 when no port is given) and turns every transport
failure into a :class:`TransportError` with a stable code and a one-line
message naming the real cause. HTTP error statuses are *not* exceptions: the
caller gets a :class:`PeerResponse` and decodes the peer's refusal body.

Resolve overrides (``SCAIWAVE_RESOLVE``, like curl's ``--resolve``) change only
where the TCP connection goes. TLS still verifies the peer's certificate
against the server name: the request goes to ``https://ADDRESS:PORT/...`` with
``Host: SERVER_NAME`` and httpcore's ``sni_hostname`` request extension set to
the name's host, which httpcore passes to the TLS layer as ``server_hostname``;
so SNI is sent for the real name and ``check_hostname`` checks the certificate
against it (tests/test_shell_client.py proves a wrong-name certificate fails).

Names not pinned that way are resolved by the client itself and connected to
only at an address ``core.netguard`` allows: no loopback, private or
link-local address unless ``SCAIWAVE_OUTBOUND_ALLOW`` names its range
(``address_blocked`` otherwise).

:func:`backoff_ms` (the retry schedule) lives in ``core.delivery``; it is re-exported here.

Two bounds keep one peer from stalling or starving the others (issue 16):

- a **total deadline** per request (``deadline``, default 30 s): waiting for
  a connection slot, connecting, TLS, sending and reading the whole body
  must finish in time. httpx's own ``timeout`` is per read, so a peer
  trickling one byte a second would otherwise hold a request for ever;
- a **per-peer limit** on requests in flight (``per_peer``, default 8). The
  connection pool itself has no overall cap (httpx's default of 100 let 115
  trickling strangers take every connection and a post to a healthy peer
  failed after 21 s): each peer is bounded on its own, and what can make
  us talk to many peers at once is capped where it starts (descriptor
  fetches, ``core.limits``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import httpcore
import httpx
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


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, with ``core.netguard`` between the name and
    the socket: a name is resolved here, and only to an address the core
    allows is a connection opened. The URL (and so the pool key, SNI and the
    certificate check) keeps the name; checking and connecting use the same
    resolved address, so a DNS answer cannot change between the two.
    Hosts that are IP literals come from ``SCAIWAVE_RESOLVE`` (server names
    never are IP literals): the admin pinned them, they pass."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend, allowed: Sequence[Network]) -> None:
        self._inner = inner
        self._allowed = tuple(allowed)

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        try:
            ipaddress.ip_address(host)
            return await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        except ValueError:
            pass
        try:
            with trio.fail_after(timeout) if timeout else contextlib.nullcontext():
                infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except trio.TooSlowError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except OSError as exc:  # socket.gaierror: the name does not resolve
            raise httpcore.ConnectError(str(exc)) from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        allowed = [a for a in addresses if address_refusal(a, allowed=self._allowed) is None]
        if not allowed:
            refusal = address_refusal(addresses[0], allowed=self._allowed) if addresses else None
            raise _AddressBlocked(f"{host} resolves to {', '.join(addresses[:4])}: "
                                  f"{refusal.detail if refusal else 'no address'}")
        error: Exception | None = None
        for address in allowed:
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout, OSError) as exc:
                error = exc
        assert error is not None
        raise error

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _AddressBlocked(httpcore.ConnectError):
    """A name that leads only to addresses outbound federation may not reach."""


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


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing (see PeerClient.__init__)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


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
        # The pool keys connections by URL origin, i.e. by the override
        # address, not by SNI. If two names share one address:port, a
        # connection verified for one name must not carry the other's
        # requests, so those names never keep connections alive.
        shared = Counter((a, p) for (_, p), a in self._resolve.items())
        self._no_reuse = {k for k, a in self._resolve.items() if shared[(a, k[1])] > 1}
        # trust_env=False: proxies, SSL_CERT_FILE and .netrc from the
        # environment must not silently change whom we talk to or trust.
        # Accept-Encoding identity: bodies are returned (and size-capped)
        # exactly as they crossed the wire, so no decompression bombs.
        transport = httpx.AsyncHTTPTransport(verify=ssl_context)
        # httpx has no public hook for the network backend: its transport's
        # pool (httpcore) takes one. Pinned httpx/httpcore versions; the
        # address_blocked tests fail loudly if this ever stops applying.
        pool = transport._pool
        pool._network_backend = _GuardedBackend(pool._network_backend, outbound_allow)
        self._http = httpx.AsyncClient(
            transport=transport,
            verify=ssl_context,
            trust_env=False,
            timeout=httpx.Timeout(timeout),
            # No overall cap: peers are bounded one by one (see the module doc).
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            follow_redirects=False,
            headers={"Accept-Encoding": "identity", "User-Agent": "scaiwave-federation"},
        )
        # Peers authenticate by signature, never by cookie: what a peer's
        # Set-Cookie says is not kept (httpx parsed each response's cookies
        # through urllib's cookie jar, a tenth of a delivery's time).
        self._http._cookies = _NoCookies()

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every pooled connection. Safe to call twice."""
        await self._http.aclose()

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
        req_headers = dict(headers or {})
        extensions: dict[str, object] = {}
        if address is not None:
            # Connect to the override but verify, SNI and Host as the name.
            req_headers["Host"] = server_name
            extensions["sni_hostname"] = host
            if key in self._no_reuse:
                req_headers["Connection"] = "close"
        url = httpx.URL(
            scheme="https", host=address or host, port=port, raw_path=target.encode("ascii")
        )
        where = server_name + (f" ({address})" if address else "")
        req = self._http.build_request(
            method, url, headers=req_headers, content=body, extensions=extensions
        )
        slot = self._slots.setdefault(key, [trio.CapacityLimiter(self._per_peer), 0])
        slot[1] += 1
        limit = self._deadline if deadline is None else min(deadline, self._deadline)
        try:
            with trio.move_on_after(limit):
                async with slot[0]:
                    return await self._exchange(req, where)
            raise TransportError(
                "peer_unreachable", f"{where}: no complete answer within {limit:g}s"
            )
        finally:
            slot[1] -= 1
            if not slot[1]:
                del self._slots[key]  # no table of every name ever asked for

    async def _exchange(self, req: httpx.Request, where: str) -> PeerResponse:
        try:
            resp = await self._http.send(req, stream=True)
            try:
                return PeerResponse(
                    status=resp.status_code,
                    headers={k.lower(): v for k, v in resp.headers.items()},
                    body=await self._read_capped(resp, where),
                )
            finally:
                # Closing an unfinished response drops its connection.
                await resp.aclose()
        except httpx.HTTPError as exc:
            raise self._classify(exc, where) from exc

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

    async def _read_capped(self, resp: httpx.Response, where: str) -> bytes:
        too_large = TransportError(
            "too_large", f"response from {where} exceeds {self._max} bytes"
        )
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max:
            raise too_large  # refuse before reading anything
        chunks: list[bytes] = []
        size = 0
        body = resp.aiter_raw()
        async for chunk in body:
            size += len(chunk)
            if size > self._max:
                # Stop reading: closing drops the connection. httpx streams
                # are nested async generators that a `break` leaves
                # suspended (trio then warns when they are collected,
                # httpx#3686); one more pull on the closed stream fails
                # through every level and finishes them all.
                await resp.aclose()
                with contextlib.suppress(Exception):
                    async for _ in body:
                        pass
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _classify(self, exc: httpx.HTTPError, where: str) -> TransportError:
        """Map an httpx error to a TransportError naming the real cause.

        On Trio, httpx's ConnectError is often empty; the ssl / OS error that
        caused it sits further down the __cause__/__context__ chain.
        """
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
        if isinstance(exc, httpx.TimeoutException):
            phase = "connecting to" if isinstance(exc, httpx.ConnectTimeout) else "waiting for"
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
