"""Federation keys: ed25519 signing, key ids, our own key ring, and the validity rules.

Two views of keys live here:

- :class:`KeyRing` is a server's own keys: the current signing key (with its
  private seed) and the rotated-out keys (public half and ``expired_at``).
  Seeds come in as arguments: the core never makes randomness.
- :class:`ServerKeys` is what a verifier knows of a server's keys, read from
  its descriptor. It applies the contract's validity rules:

  * a live request may be signed by the current key, or by a rotated-out key
    for :data:`GRACE_MS` (30 days) after its ``expired_at``;
  * an event verifies under the key that was current at the event's time
    (``ts < expired_at``), forever;
  * a key's past only grows: a later descriptor never shortens the validity
    a verifier already trusted (:meth:`ServerKeys.keeping_past`), and a
    proposal inside a host-signed chained event is vouched for by the host
    (:meth:`ServerKeys.listed`).

Signing and verification are pure functions over bytes. Every signature is
over a domain-separation prefix plus the exact bytes, so an event signature
can never be replayed as a request signature and the other way round.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from nacl.bindings import crypto_sign_open, crypto_sign_seed_keypair, crypto_sign
from nacl.exceptions import BadSignatureError, CryptoError

from .codes import Code, LocalProtocolError, Refused
from .wire import b64e

__all__ = [
    "DAY_MS",
    "GRACE_MS",
    "ROTATION_PERIOD_MS",
    "Domain",
    "SigningKey",
    "OldKey",
    "KeyRing",
    "ServerKeys",
    "key_id_for",
    "sign",
    "verify",
    "verify_batch",
    "BatchVerifier",
]

DAY_MS = 24 * 60 * 60 * 1000
#: A rotated-out key still authenticates live traffic this long after expired_at.
GRACE_MS = 30 * DAY_MS
#: Keys rotate yearly.
ROTATION_PERIOD_MS = 365 * DAY_MS


class Domain:
    """Domain-separation prefixes: what kind of object a signature is for."""

    EVENT = b"scaiwave/event/v1\x00"
    REQUEST = b"scaiwave/request/v1\x00"
    DESCRIPTOR = b"scaiwave/descriptor/v1\x00"
    HANDSHAKE = b"scaiwave/handshake/v1\x00"


def key_id_for(public_key: bytes) -> str:
    """The key id of an ed25519 public key: ``ed25519:`` + 8 chars of its hash."""
    return "ed25519:" + b64e(hashlib.sha256(public_key).digest()[:6])


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private signing key. ``seed`` is the 32-byte ed25519 seed."""

    key_id: str
    seed: bytes = field(repr=False)
    public_key: bytes
    created_at: int

    @classmethod
    def from_seed(cls, seed: bytes, created_at: int) -> "SigningKey":
        """Derive a key from 32 seed bytes (the caller's randomness)."""
        if not isinstance(seed, bytes) or len(seed) != 32:
            raise LocalProtocolError("a key seed is exactly 32 bytes")
        public, _secret = crypto_sign_seed_keypair(seed)
        return cls(key_id=key_id_for(public), seed=seed, public_key=public, created_at=created_at)

    @property
    def _secret(self) -> bytes:
        return self.seed + self.public_key


def sign(key: SigningKey, domain: bytes, message: bytes) -> bytes:
    """Sign ``domain + message``; returns the 64-byte detached signature."""
    return crypto_sign(domain + message, key._secret)[:64]


def verify(public_key: bytes, domain: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is a valid ed25519 signature of ``domain + message``."""
    if len(signature) != 64 or len(public_key) != 32:
        return False
    try:
        crypto_sign_open(signature + domain + message, public_key)
    except (BadSignatureError, CryptoError, ValueError, TypeError):
        return False
    return True


#: Verifies a batch of ``(public_key, signed_bytes, signature)`` items, where
#: ``signed_bytes`` already carries its domain prefix. The default runs in the
#: calling thread; the shell may pass one that spreads the batch over threads
#: (pynacl releases the GIL while verifying).
BatchVerifier = Callable[[Sequence[tuple[bytes, bytes, bytes]]], list[bool]]


def verify_batch(items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bool]:
    """The default :data:`BatchVerifier`: verify each item in turn."""
    out = []
    for public_key, signed, signature in items:
        try:
            crypto_sign_open(signature + signed, public_key)
            out.append(True)
        except (BadSignatureError, CryptoError, ValueError, TypeError):
            out.append(False)
    return out


@dataclass(frozen=True, slots=True)
class OldKey:
    """A rotated-out key: its public half and when it stopped being current."""

    key_id: str
    public_key: bytes
    expired_at: int


@dataclass(frozen=True, slots=True)
class KeyRing:
    """A server's own keys. Immutable: operations return a new ring.

    ``current`` is ``None`` until the admin runs ``key generate``.
    """

    current: SigningKey | None = None
    old: tuple[OldKey, ...] = ()

    def generate(self, seed: bytes, now: int) -> "KeyRing":
        """First key. Raises :class:`LocalProtocolError` if one exists (use rotate)."""
        if self.current is not None:
            raise LocalProtocolError("a key already exists: rotate it instead")
        return replace(self, current=SigningKey.from_seed(seed, now))

    def rotate(self, seed: bytes, now: int) -> "KeyRing":
        """Make a new current key; the old one moves to ``old`` with ``expired_at=now``.

        Its seed is dropped: a rotated-out key never signs again.
        """
        if self.current is None:
            raise LocalProtocolError("no key to rotate: generate one first")
        new = SigningKey.from_seed(seed, now)
        if new.key_id == self.current.key_id or any(o.key_id == new.key_id for o in self.old):
            raise LocalProtocolError("rotation seed yields a key id already used")
        retired = OldKey(self.current.key_id, self.current.public_key, now)
        return KeyRing(current=new, old=(retired, *self.old))

    def rotation_due_at(self) -> int | None:
        """When the yearly rotation is due (``None`` without a key)."""
        if self.current is None:
            return None
        return self.current.created_at + ROTATION_PERIOD_MS

    def public(self, server_name: str) -> "ServerKeys":
        """The verifier's view of these keys (what our descriptor publishes)."""
        cur = self.current
        return ServerKeys(
            server_name=server_name,
            key_id=cur.key_id if cur else None,
            public_key=cur.public_key if cur else None,
            old=self.old,
        )


@dataclass(frozen=True, slots=True)
class ServerKeys:
    """What a verifier knows of one server's keys (from its descriptor)."""

    server_name: str
    key_id: str | None
    public_key: bytes | None
    old: tuple[OldKey, ...] = ()

    def shifted(self, offset_ms: int) -> "ServerKeys":
        """These keys as seen from a key clock ``offset_ms`` ahead (a what-if).

        Judging key validity at ``now + offset`` (the grace window) and event
        times at ``ts + offset`` (the event-time rule) is the same as moving
        every rotated-out key's ``expired_at`` back by ``offset``: that is what
        the copy holds. Request freshness and everything else still use the
        real clock reading. ``shifted(0)`` is ``self``.
        """
        if not offset_ms:
            return self
        return replace(self, old=tuple(replace(o, expired_at=o.expired_at - offset_ms) for o in self.old))

    def knows(self, key_id: str) -> bool:
        """True when ``key_id`` is the current key or a listed old key."""
        return key_id == self.key_id or any(o.key_id == key_id for o in self.old)

    def for_request(self, key_id: str, now: int) -> bytes | Refused | None:
        """The public key to check a live request signed under ``key_id`` at ``now``.

        Returns the key, ``Refused(expired_key)`` for an old key past its 30-day
        grace, or ``None`` when the key id is unknown (the caller may re-fetch).
        """
        if key_id == self.key_id and self.public_key is not None:
            return self.public_key
        for old in self.old:
            if old.key_id == key_id:
                if now < old.expired_at + GRACE_MS:
                    return old.public_key
                return Refused(
                    Code.EXPIRED_KEY,
                    f"{self.server_name} key {key_id} was rotated out at {old.expired_at}; "
                    f"live traffic under it ended 30 days later",
                )
        return None

    def listed(self, key_id: str) -> bytes | None:
        """The public key listed under ``key_id`` (current or old) whatever its
        validity, or ``None``: for a signature another one vouches for (the
        ``source`` proposal inside a host-signed chained event)."""
        if key_id == self.key_id:
            return self.public_key
        return next((o.public_key for o in self.old if o.key_id == key_id), None)

    def keeping_past(self, previous: "ServerKeys | None", seen_at: int) -> "ServerKeys":
        """These keys, never trusting less of the past than ``previous`` did.

        A verifier never shortens the validity it already trusted for a key: a
        key it saw as current when it read ``previous`` (at ``seen_at``) was
        valid at least until then, and an old key until its ``expired_at``
        then. A later descriptor that moves an ``expired_at`` earlier, or drops
        a key, changes nothing of that (docs/protocol.md, "Keys' past").
        """
        if previous is None:
            return self
        trusted = {o.key_id: o for o in previous.old}
        if previous.key_id is not None and previous.public_key is not None:
            # Current at seen_at: events up to and including it verified (expired_at is exclusive).
            trusted[previous.key_id] = OldKey(previous.key_id, previous.public_key, seen_at + 1)
        old = []
        for o in self.old:
            before = trusted.pop(o.key_id, None)
            if before is not None and before.public_key == o.public_key and before.expired_at > o.expired_at:
                o = OldKey(o.key_id, o.public_key, before.expired_at)
            old.append(o)
        trusted.pop(self.key_id or "", None)
        old += trusted.values()  # keys the new descriptor dropped: kept as trusted
        old.sort(key=lambda o: (-o.expired_at, o.key_id))
        return replace(self, old=tuple(old))

    def for_event(self, key_id: str, ts: int) -> bytes | Refused | None:
        """The public key to check an event signed under ``key_id`` with time ``ts``.

        A historical event verifies forever under the key that was current at
        its time. An event claiming a time after its key was rotated out is
        refused with ``expired_key``. ``None`` means the key id is unknown.
        """
        if key_id == self.key_id and self.public_key is not None:
            return self.public_key
        for old in self.old:
            if old.key_id == key_id:
                if ts < old.expired_at:
                    return old.public_key
                return Refused(
                    Code.EXPIRED_KEY,
                    f"event at {ts} signed by {self.server_name} key {key_id}, "
                    f"which was rotated out at {old.expired_at}",
                )
        return None
