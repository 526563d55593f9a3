"""``scaiwave admin federation check [PEER]``: our own server, seen the way a peer sees it.

The daemon runs each step against its own public name, over the network, as
a peer would, and reports for each one ``ok`` and what it found, or the
exact reason it failed and what to do about it:

0. ``storage``: which database the daemon stores in (``sqlite`` and its
   file, or ``postgresql`` and its URL without the password), its schema
   version, and that a write commits there;
1. ``resolve``: our server name resolves (DNS, or ``SCAIWAVE_RESOLVE``);
2. ``tls``: a TLS connection to that address verifies our certificate chain
   and name, with verification on even under the test setting that turns it
   off for peers;
3. ``descriptor``: ``/.well-known/scaiwave`` fetched by name parses, names
   us, is signed by the key this daemon holds, and that key is in date;
4. ``clock`` (with PEER): our clock against PEER's, read from the ``Date``
   header of its descriptor response, within the window requests are
   accepted in;
5. ``handshake`` (with PEER): a real handshake, in which PEER fetches and
   checks our descriptor and our signature.

A step that cannot run because an earlier one failed is reported as skipped.
The verdict and advice functions (:func:`clock_step`, :func:`fix_for`) are
pure, so tests drive them without a network.
"""

from __future__ import annotations

import dataclasses
import email.utils
import os
import socket
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from scaiwave_federation.core import Code, PeerAgreed, Refused
from scaiwave_federation.core import DESCRIPTIONS
from scaiwave_federation.core import parse_descriptor
from scaiwave_federation.core import DEFAULT_SKEW_MS

from ..http.client import DESCRIPTOR_PATH, TransportError, _chain
from ..config import client_ssl_context

if TYPE_CHECKING:
    from ..runtime.service import Service

__all__ = ["Step", "run_check", "clock_step", "fix_for", "check_report"]

#: Each network step gives up after this long.
STEP_TIMEOUT_S = 10.0
# OpenSSL verify codes.
_NAME_MISMATCH = {62, 63, 64}
_UNTRUSTED = {2, 18, 19, 20, 21}
_EXPIRED = {9, 10}


@dataclass(frozen=True)
class Step:
    """One step's result. ``ok`` is None when skipped; ``code`` and ``fix`` are set when it failed."""

    step: str
    ok: bool | None
    detail: str
    code: str | None = None
    fix: str | None = None

    def view(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _failed(step: str, refusal: Refused, fix: str) -> Step:
    return Step(step, False, refusal.as_dict()["message"], refusal.code.value, fix)


def fix_for(code: Code, message: str, *, us: str, peer: str | None) -> str:
    """What an admin can do about a failed step's ``code`` (pure)."""
    them = peer or "the peer"
    by_peer = message.startswith("peer refused")
    table = {
        Code.OWN_KEY_MISSING: "run `scaiwave admin federation key generate`",
        Code.PEER_NOT_ALLOWED: (f"ask the admin of {them} to run `scaiwave admin federation policy allow {us}`"
                                if by_peer else f"allow it here: `scaiwave admin federation policy allow {them}`"),
        Code.PEER_BLOCKED: (f"{them} blocks {us}: ask its admin" if by_peer
                            else f"{them} is in blocked_peers here: remove it with `policy set --block ...`"),
        Code.FEDERATION_CLOSED: (f"{them} refuses all federation (policy closed)" if by_peer
                                 else "this server's policy is closed: `policy set --mode invite_only --allow ...`"),
        Code.TLS_FAILURE: f"check {them}'s certificate chain and name, or add its CA to SCAIWAVE_CA_BUNDLE",
        Code.PEER_UNREACHABLE: f"check that {them} is up and that its name and port reach it from here",
        Code.NO_DESCRIPTOR: f"{them} must serve GET {DESCRIPTOR_PATH}",
        Code.UNKNOWN_KEY: f"{them} could not get our key: run this check without PEER and fix what it shows",
        Code.BAD_SIGNATURE: f"{them} holds an old copy of our keys: its admin runs "
                            f"`scaiwave admin federation refresh {us}`",
        Code.CLOCK_SKEW: "synchronise both servers' clocks (NTP)",
        Code.PROTOCOL_VERSION_MISMATCH: "upgrade the older of the two servers",
    }
    return table.get(code, DESCRIPTIONS[code])


def clock_step(peer: str, peer_date: str | None, sent_ms: int, received_ms: int,
               skew_ms: int = DEFAULT_SKEW_MS) -> Step:
    """The clock step from PEER's ``Date`` header and our clock around the request (pure).

    ``Date`` has a resolution of one second, so an offset under 1 s is not
    told apart from 0, and the limit is the accepted window less that second.
    """
    if not peer_date:
        return Step("clock", None, f"{peer} sent no Date header: its clock cannot be read from here")
    parsed = email.utils.parsedate_to_datetime(peer_date) if _looks_like_date(peer_date) else None
    if parsed is None or parsed.tzinfo is None:
        return Step("clock", None, f"{peer} sent a Date header that is not an HTTP date")
    theirs = int(parsed.timestamp() * 1000)
    ours = (sent_ms + received_ms) // 2
    offset = theirs - ours
    window = skew_ms // 1000
    where = "ahead of" if offset > 0 else "behind"
    seconds = round(abs(offset) / 1000)
    if abs(offset) + 1000 <= skew_ms:
        return Step("clock", True, f"{peer} is {seconds} s {where} us (requests are accepted within ±{window} s)")
    refusal = Refused(Code.CLOCK_SKEW, f"{peer}'s clock is {seconds} s {where} ours; signed requests are refused "
                      f"beyond ±{window} s")
    return _failed("clock", refusal, fix_for(Code.CLOCK_SKEW, "", us="", peer=peer))


def _looks_like_date(text: str) -> bool:
    try:
        return email.utils.parsedate_tz(text) is not None
    except (TypeError, ValueError):
        return False


async def run_check(service: Service, peer: str | None) -> list[Step]:
    """Run every step (see the module docs) and return them in order."""
    config = service.config
    us = config.server_name
    steps: list[Step] = [await _storage(service)]
    address = await _resolve(service, steps)
    if address is None:
        steps.append(Step("tls", None, "not run: the name does not resolve"))
    tls_ok = address is not None and await _tls(service, address, steps)
    if tls_ok:
        await _descriptor(service, steps)
    else:
        steps.append(Step("descriptor", None, "not run: the TLS step failed"))
    if peer is None:
        steps.append(Step("clock", None, "name a PEER to compare clocks with"))
        steps.append(Step("handshake", None, "name a PEER to handshake with"))
        return steps
    sent = service.now()
    try:
        with trio.fail_after(STEP_TIMEOUT_S):
            resp = await service.client.get(peer, DESCRIPTOR_PATH)
        steps.append(clock_step(peer, resp.headers.get("date"), sent, service.now(),
                                service.node.requests.skew_ms))
    except (TransportError, trio.TooSlowError) as exc:
        refusal = _transport_refusal(exc, peer)
        steps.append(_failed("clock", refusal, fix_for(refusal.code, "", us=us, peer=peer)))
    result = await service.handshake(peer)
    if isinstance(result, PeerAgreed):
        steps.append(Step("handshake", True, f"peered with {peer} ({result.protocol_version}, its key "
                                             f"{result.key_id}); {peer} verified our descriptor and signature"))
    else:
        steps.append(_failed("handshake", result, fix_for(result.code, result.as_dict()["message"], us=us, peer=peer)))
    return steps


def _transport_refusal(exc: Exception, where: str) -> Refused:
    if isinstance(exc, TransportError):
        try:
            return Refused(Code(exc.code), exc.message)
        except ValueError:
            return Refused(Code.PEER_UNREACHABLE, exc.message)
    return Refused(Code.PEER_UNREACHABLE, f"{where} did not answer within {STEP_TIMEOUT_S:g} s")


async def _storage(service: Service) -> Step:
    """Which database this daemon stores in, and that a write commits there."""
    try:
        where = await service.store.describe()
        probe = await service.store.probe_write(service.now())
    except Exception as exc:  # a closed database or a server that went away: a failed step, not a crash
        where, probe = None, f"not writable: {' '.join(str(exc).split())[:200]}"
    if where is None or probe != "ok":
        refusal = Refused(Code.STORAGE_UNAVAILABLE, probe)
        return _failed("storage", refusal, "free disk space (SQLite) or check that the PostgreSQL server is up "
                                           "and accepts writes (SCAIWAVE_DATABASE_URL)")
    return Step("storage", True, f"{where['backend']} at {where['location']}, schema version "
                                 f"{where['schema_version']}, a write commits")


async def _resolve(service: Service, steps: list[Step]) -> tuple[str, int] | None:
    config = service.config
    host, port = config.server_host, config.server_port
    override = config.resolve.get((host.lower(), port))
    if override is not None:
        steps.append(Step("resolve", True, f"{config.server_name} -> {override} (SCAIWAVE_RESOLVE, not DNS)"))
        return override, port
    try:
        with trio.fail_after(STEP_TIMEOUT_S):
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, trio.TooSlowError) as exc:
        reason = getattr(exc, "strerror", None) or f"no answer within {STEP_TIMEOUT_S:g} s"
        steps.append(_failed("resolve", Refused(Code.PEER_UNREACHABLE, f"cannot resolve {host}: {reason}"),
                             f"publish an A or AAAA record for {host} that points at this server"))
        return None
    addresses = sorted({str(info[4][0]) for info in infos})
    steps.append(Step("resolve", True, f"{config.server_name} -> {', '.join(addresses)}"))
    return str(infos[0][4][0]), port


async def _tls(service: Service, address: tuple[str, int], steps: list[Step]) -> bool:
    config = service.config
    host, where = config.server_host, f"{address[0]}:{address[1]}"
    # Verified as a peer verifies, even when this daemon skips verifying peers.
    context = client_ssl_context(dataclasses.replace(config, insecure_skip_tls_verify=False))
    try:
        with trio.fail_after(STEP_TIMEOUT_S):
            tcp = await trio.open_tcp_stream(*address)
            stream = trio.SSLStream(tcp, context, server_hostname=host)
            try:
                await stream.do_handshake()
                cert = stream.getpeercert()
            finally:
                await trio.aclose_forcefully(stream)
    except trio.TooSlowError:
        refusal = Refused(Code.PEER_UNREACHABLE, f"{where} did not finish a TLS handshake in {STEP_TIMEOUT_S:g} s")
        steps.append(_failed("tls", refusal, f"check that {where} is this daemon's listener"))
        return False
    except OSError as exc:
        # trio reports "all attempts to connect failed"; the reason is behind it.
        reason = next((os.strerror(e.errno) for e in _chain(exc) if isinstance(e, OSError) and e.errno), str(exc))
        refusal = Refused(Code.PEER_UNREACHABLE, f"cannot connect to {where}: {reason}")
        steps.append(_failed("tls", refusal, f"check that the daemon listens there (SCAIWAVE_LISTEN is "
                                             f"{config.listen_host}:{config.listen_port}), or that the port forward "
                                             f"or proxy in front of it works"))
        return False
    except (trio.BrokenResourceError, ssl.SSLError) as exc:
        steps.append(_tls_failure(exc, host, where))
        return False
    expires = ssl.cert_time_to_seconds(cert["notAfter"]) if cert and cert.get("notAfter") else None
    left = f"; the certificate expires {time.strftime('%Y-%m-%d', time.gmtime(expires))}" if expires else ""
    days = f" (in {int((expires - service.now() / 1000) // 86400)} days)" if expires else ""
    steps.append(Step("tls", True, f"chain and name verified for {host} at {where}{left}{days}"))
    return True


def _tls_failure(exc: BaseException, host: str, where: str) -> Step:
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        reason = f"certificate verify failed: {cause.verify_message}"
        if cause.verify_code in _NAME_MISMATCH:
            fix = (f"the certificate served at {where} does not cover {host}: serve one that does "
                   f"(SCAIWAVE_TLS_CERT), or point {host} at this server")
        elif cause.verify_code in _EXPIRED:
            fix = "renew the certificate"
        elif cause.verify_code in _UNTRUSTED:
            fix = ("serve the whole chain (leaf first, then intermediates) from a CA peers trust; a private CA "
                   "must be in every peer's SCAIWAVE_CA_BUNDLE")
        else:
            fix = "serve a valid certificate chain for " + host
    else:
        reason = f"TLS failed: {getattr(cause, 'reason', None) or cause or exc}"
        fix = f"check that {where} serves TLS (a pass-through proxy must not terminate it)"
    return _failed("tls", Refused(Code.TLS_FAILURE, f"TLS with {host} at {where}: {reason}"), fix)


async def _descriptor(service: Service, steps: list[Step]) -> None:
    us = service.config.server_name
    try:
        with trio.fail_after(STEP_TIMEOUT_S):
            data = await service.client.fetch_descriptor(us)
    except (TransportError, trio.TooSlowError) as exc:
        refusal = _transport_refusal(exc, us)
        steps.append(_failed("descriptor", refusal, fix_for(refusal.code, "", us=us, peer=us)))
        return
    ring = service.node.keyring
    if ring.current is None:
        refusal = Refused(Code.OWN_KEY_MISSING, f"{DESCRIPTOR_PATH} has no key: peers cannot verify anything we sign")
        steps.append(_failed("descriptor", refusal, fix_for(Code.OWN_KEY_MISSING, "", us=us, peer=None)))
        return
    parsed = parse_descriptor(data, us)
    if isinstance(parsed, Refused):
        steps.append(_failed("descriptor", parsed, f"{us} serves another server's descriptor: check what answers "
                                                    f"at {us}" if parsed.code is Code.SERVER_NAME_MISMATCH
                             else "check what answers at " + us))
        return
    keys, _versions, fields = parsed
    now = service.now()
    if keys.key_id != ring.current.key_id:
        refusal = Refused(Code.INVALID_DESCRIPTOR, f"{us} publishes key {keys.key_id}, but this daemon signs with "
                          f"{ring.current.key_id}")
        steps.append(_failed("descriptor", refusal, f"{us} reaches another server (an old host, a proxy to the "
                                                     f"wrong backend): point it at this daemon"))
        return
    valid_until = fields.get("valid_until")
    if isinstance(valid_until, int) and valid_until <= now:
        refusal = Refused(Code.INVALID_DESCRIPTOR, f"key {keys.key_id} was due to rotate at "
                          f"{time.strftime('%Y-%m-%d', time.gmtime(valid_until / 1000))}")
        steps.append(_failed("descriptor", refusal, "run `scaiwave admin federation key rotate`"))
        return
    left = f", rotates in {(valid_until - now) // 86_400_000} days" if isinstance(valid_until, int) else ""
    steps.append(Step("descriptor", True, f"names {us}, signature verified, key {keys.key_id} is this daemon's{left}"))


def check_report(data: dict[str, Any]) -> str:
    """The CLI's text for the check API's answer: one line per step, and the fix under a failure."""
    against = f" against {data['peer']}" if data.get("peer") else ""
    lines = [f"federation check of {data['server_name']}{against}"]
    for s in data["steps"]:
        mark = "ok" if s["ok"] else ("skip" if s["ok"] is None else "FAIL")
        detail = f"{s['code']}: {s['detail']}" if s["ok"] is False else s["detail"]
        lines.append(f"  {s['step']:<11} {mark:<5} {detail}")
        if s["ok"] is False and s.get("fix"):
            lines.append(f"  {'':<11} {'':<5} what to do: {s['fix']}")
    failed = sum(1 for s in data["steps"] if s["ok"] is False)
    lines.append("all checks passed" if not failed else f"{failed} of {len(data['steps'])} steps failed")
    return "\n".join(lines)
