"""Two halves of the HTTP benchmark: a bare trio + h11 + TLS server (the
baseline the daemon's HTTP layer is held to), and a light load generator.

``python -m bench.httpload serve CERT KEY PORT BODYFILE`` serves ``BODYFILE``
for every request, keep-alive, with TLS: what any trio + h11 server must do at
the least (read the request, answer it in one write).

``python -m bench.httpload load HOST PORT SNI PATH CONNECTIONS REQUESTS CAFILE``
opens CONNECTIONS keep-alive TLS connections (one thread each), sends
REQUESTS GETs in all and prints ``{"rps": ..., "seconds": ...}``. It runs in
its own process, and the same client load hits both servers.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import threading
import time
from pathlib import Path


async def _serve_bare(cert: str, key: str, port: int, body: bytes) -> None:
    import h11
    import trio

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    head = [("content-type", "application/json"), ("content-length", str(len(body)))]

    async def connection(stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.EndOfMessage):
                    out = conn.send(h11.Response(status_code=200, headers=head))
                    out += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
                    await stream.send_all(out)
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_ssl_over_tcp(connection, port, context, host="127.0.0.1")


class Conn:
    """One keep-alive TLS connection speaking just enough HTTP/1.1 for the
    benchmarks (a light client: the daemons, not the client, should be busy)."""

    def __init__(self, port: int, sni: str, cafile: str, host: str = "127.0.0.1") -> None:
        raw = socket.create_connection((host, port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ssl.create_default_context(cafile=cafile).wrap_socket(raw, server_hostname=sni)
        self.authority = f"{sni}:{port}"
        self.buf = b""

    def request(self, method: str, path: str, body: object = None, token: str | None = None) -> tuple[int, bytes]:
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nhost: {self.authority}\r\ncontent-length: {len(data)}\r\n"
        if token:
            head += f"authorization: Bearer {token}\r\n"
        if data:
            head += "content-type: application/json\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + data)
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        resp, _, self.buf = self.buf.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in resp.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(self.buf) < length:
            self.buf += self.sock.recv(65536)
        answer, self.buf = self.buf[:length], self.buf[length:]
        return int(resp.split(b" ", 2)[1]), answer

    def close(self) -> None:
        self.sock.close()


def _load(host: str, port: int, sni: str, path: str, connections: int, requests: int, cafile: str) -> dict:
    per = [requests // connections + (1 if i < requests % connections else 0) for i in range(connections)]
    conns = [Conn(port, sni, cafile, host) for _ in range(connections)]
    errors: list[str] = []

    def run(conn: Conn, count: int) -> None:
        for _ in range(count):
            status, body = conn.request("GET", path)
            if status != 200:
                errors.append(f"HTTP {status}: {body[:80]!r}")
                return

    threads = [threading.Thread(target=run, args=(c, n)) for c, n in zip(conns, per)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    for c in conns:
        c.close()
    if errors:
        raise SystemExit(f"load: {errors[0]}")
    return {"rps": requests / seconds, "seconds": seconds}


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        import trio

        cert, key, port, body = argv[1], argv[2], int(argv[3]), Path(argv[4]).read_bytes()
        trio.run(_serve_bare, cert, key, port, body)
        return 0
    if argv[:1] == ["load"]:
        host, port, sni, path, conns, reqs, cafile = argv[1:8]
        print(json.dumps(_load(host, int(port), sni, path, int(conns), int(reqs), cafile)))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
