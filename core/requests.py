"""Signed federation requests: signing, checking, and the replay window.

Every federation request carries an ``Authorization`` header::

    Authorization: ScaiWave-Sig <base64url(signed)>.<base64url(signature)>

``signed`` is the canonical CBOR map ``{origin, destination, method, target,
time, digest, key_id}`` (``digest`` is sha256 of the body, ``target`` the
path with its query) and the signature is ed25519 over
``Domain.REQUEST + signed``. The verifier decodes the bytes it received and
checks them against the request it actually got; it never re-encodes.

Checks, in order (each with its code):

1. the header is present and well-formed (``unauthorized``, ``malformed``,
   ``non_canonical``, ``too_large``);
2. destination, method and target are ours (``wrong_destination``) and the
   body digest matches (``bad_signature``);
3. the time is within ``skew_ms`` of ``now`` (``clock_skew``);
4. the origin's key: unknown -> :class:`~.events.NeedKeys` (rate-limited, then
   ``unknown_key``), rotated out past 30 days -> ``expired_key``;
5. the signature (``bad_signature``);
6. the replay window: a signature seen before inside the window is
   ``replayed_request``. This runs last so forged requests cannot fill it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

from .codes import Code, Refused
from .events import NeedKeys
from .keycache import KeyCache
from .keys import Domain, SigningKey, sign, verify
from .names import valid_server_name
from .wire import b64d, b64e, decode, encode

__all__ = [
    "SCHEME",
    "DEFAULT_SKEW_MS",
    "SignedRequest",
    "Authenticated",
    "ReplayGuard",
    "RequestVerifier",
    "sign_request",
    "parse_authorization",
]

SCHEME = "ScaiWave-Sig"
DEFAULT_SKEW_MS = 120_000
MAX_HEADER_CHARS = 2048
_FIELDS = frozenset({"origin", "destination", "method", "target", "time", "digest", "key_id"})


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """A decoded (not yet verified) request signature."""

    origin: str
    destination: str
    method: str
    target: str
    time: int
    digest: bytes
    key_id: str
    signed: bytes
    signature: bytes

    @property
    def nonce(self) -> bytes:
        """What the replay window remembers: the hash of the signature."""
        return hashlib.sha256(self.signature).digest()


@dataclass(frozen=True, slots=True)
class Authenticated:
    """A request that passed every check. Persist ``nonce`` until ``nonce_expires_at``."""

    origin: str
    key_id: str
    nonce: bytes
    nonce_expires_at: int


def sign_request(
    key: SigningKey,
    *,
    origin: str,
    destination: str,
    method: str,
    target: str,
    body: bytes,
    now: int,
) -> str:
    """The ``Authorization`` header value for a request we send."""
    signed = encode(
        {
            "origin": origin,
            "destination": destination,
            "method": method.upper(),
            "target": target,
            "time": now,
            "digest": hashlib.sha256(body).digest(),
            "key_id": key.key_id,
        }
    )
    return f"{SCHEME} {b64e(signed)}.{b64e(sign(key, Domain.REQUEST, signed))}"


def parse_authorization(header: str | None) -> SignedRequest | Refused:
    """Decode an ``Authorization`` header value (no key or time checks)."""
    if not header:
        return Refused(Code.UNAUTHORIZED, "federation requests must be signed (Authorization: ScaiWave-Sig ...)")
    if len(header) > MAX_HEADER_CHARS:
        return Refused(Code.TOO_LARGE, "Authorization header is too long")
    scheme, _, token = header.partition(" ")
    if scheme != SCHEME:
        return Refused(Code.UNAUTHORIZED, f"unknown authorization scheme {scheme[:32]!r}")
    signed_text, dot, sig_text = token.strip().partition(".")
    signed, signature = b64d(signed_text), b64d(sig_text)
    if not dot or signed is None or signature is None or len(signature) != 64:
        return Refused(Code.MALFORMED, "Authorization token is not <base64url>.<base64url signature>")
    fields = decode(signed, max_size=MAX_HEADER_CHARS, max_depth=1)
    if isinstance(fields, Refused):
        return fields
    if type(fields) is not dict or fields.keys() != _FIELDS:
        return Refused(Code.MALFORMED, "request signature fields are missing or unknown")
    f = fields
    if not (
        all(type(f[k]) is str for k in ("origin", "destination", "method", "target", "key_id"))
        and type(f["time"]) is int
        and 0 <= f["time"] < 1 << 63
        and type(f["digest"]) is bytes
        and len(f["digest"]) == 32
        and valid_server_name(f["origin"])
    ):
        return Refused(Code.MALFORMED, "request signature fields have the wrong types")
    return SignedRequest(
        f["origin"], f["destination"], f["method"], f["target"], f["time"], f["digest"], f["key_id"], signed, signature
    )


class ReplayGuard:
    """Signatures seen inside the skew window. The shell persists and restores it."""

    def __init__(self) -> None:
        self._seen: dict[bytes, int] = {}

    def seen(self, nonce: bytes, now: int) -> bool:
        """True if ``nonce`` is remembered and not yet expired at ``now``."""
        expires = self._seen.get(nonce)
        return expires is not None and expires > now

    def remember(self, nonce: bytes, expires_at: int) -> None:
        """Remember ``nonce`` until ``expires_at`` (also used to restore from storage)."""
        self._seen[nonce] = max(expires_at, self._seen.get(nonce, 0))

    def expire(self, now: int) -> int:
        """Forget everything expired at ``now``; returns how many were dropped."""
        dead = [n for n, t in self._seen.items() if t <= now]
        for n in dead:
            del self._seen[n]
        return len(dead)

    def next_expiry(self) -> int | None:
        """The earliest expiry (a timer for :meth:`expire`), or ``None``."""
        return min(self._seen.values(), default=None)

    def __len__(self) -> int:
        return len(self._seen)


class RequestVerifier:
    """Checks inbound federation requests for one server (see module doc for the order)."""

    def __init__(self, server_name: str, keys: KeyCache, *, skew_ms: int = DEFAULT_SKEW_MS) -> None:
        self.server_name = server_name
        self.keys = keys
        self.skew_ms = skew_ms
        self.replay = ReplayGuard()

    def verify(
        self, authorization: str | None, *, method: str, target: str, body: bytes, now: int,
        admit: Callable[[str], Refused | None] | None = None,
    ) -> Authenticated | Refused | NeedKeys:
        """Check one request. On :class:`NeedKeys`, fetch the descriptor, feed
        it to ``keys.learn`` and call again with the same arguments.

        ``admit(origin)`` (the policy) is asked about the *claimed* origin as
        soon as the header parses, before any key lookup or fetch and before
        the replay window remembers anything: a refused stranger costs us one
        header decode.
        """
        req = parse_authorization(authorization)
        if isinstance(req, Refused):
            return req
        if admit is not None:
            refusal = admit(req.origin)
            if refusal is not None:
                return refusal
        if req.destination != self.server_name:
            return Refused(Code.WRONG_DESTINATION, f"signed for {req.destination[:100]}, this is {self.server_name}")
        if req.method != method.upper() or req.target != target:
            return Refused(Code.WRONG_DESTINATION, "signed for another method or path")
        if hashlib.sha256(body).digest() != req.digest:
            return Refused(Code.BAD_SIGNATURE, "body does not match the signed digest")
        if abs(now - req.time) > self.skew_ms:
            return Refused(Code.CLOCK_SKEW, f"request time is {now - req.time} ms from ours (window {self.skew_ms} ms)")
        known = self.keys.keys(req.origin)
        public_key = known.for_request(req.key_id, now) if known else None
        if isinstance(public_key, Refused):
            return public_key
        if public_key is None:
            if self.keys.may_fetch(req.origin, now, req.key_id):
                return NeedKeys(req.origin, req.key_id)
            return Refused(Code.UNKNOWN_KEY, f"key {req.key_id[:64]} of {req.origin} is unknown here "
                                             f"(its descriptor was fetched moments ago; retry shortly)")
        if not verify(public_key, Domain.REQUEST, req.signed, req.signature):
            return Refused(Code.BAD_SIGNATURE, "request signature does not verify")
        nonce = req.nonce
        if self.replay.seen(nonce, now):
            return Refused(Code.REPLAYED_REQUEST, "this signed request was already received")
        expires_at = req.time + self.skew_ms + 1
        self.replay.remember(nonce, expires_at)
        return Authenticated(req.origin, req.key_id, nonce, expires_at)
