"""The handshake: how two servers agree to federate.

Initiator A, responder B::

    A: FetchDescriptor(B)            -> checks name, self-signature, key, versions
    A: A's policy admits B?
    A: SendRequest POST handshake    body = hello {initiator, responder, versions, nonce}
                                     (signed request: proves A holds its key)
    B: verify request, B's policy admits A?, pick the best common version,
       reply welcome {initiator, responder, version, nonce, proof}
       where proof signs the transcript with B's key (proves B holds its key)
    A: check the proof under B's descriptor key -> PeerAgreed(B, version)

Any failure ends in ``FAILED`` with the refusal's code. The initiator's
transitions are the table :data:`TRANSITIONS`; an input not in the table for
the current state is caller misuse and raises :class:`LocalProtocolError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .codes import Code, LocalProtocolError, Refused
from .descriptor import PROTOCOL_VERSIONS
from .effects import Effect, Failed, FetchDescriptor, PeerAgreed, SendRequest
from .keycache import KeyCache
from .keys import Domain, KeyRing, ServerKeys, SigningKey, sign, verify
from .policy import Policy
from .requests import sign_request
from .wire import decode, encode

__all__ = ["Initiator", "State", "TRANSITIONS", "answer_hello", "HANDSHAKE_TARGET", "decode_refusal", "refusal_body"]

HANDSHAKE_TARGET = "/_scaiwave/federation/v1/handshake"
MAX_HANDSHAKE_BYTES = 4096
_HELLO = frozenset({"type", "initiator", "responder", "versions", "nonce"})
_WELCOME = frozenset({"type", "initiator", "responder", "version", "nonce", "proof"})


class State:
    """Initiator states."""

    IDLE = "idle"
    AWAIT_DESCRIPTOR = "await_descriptor"
    AWAIT_REPLY = "await_reply"
    PEERED = "peered"
    FAILED = "failed"


#: (state, input) -> the states it may lead to. The methods below implement
#: each row; docs/protocol.md draws the diagram from this table.
TRANSITIONS: dict[tuple[str, str], tuple[str, ...]] = {
    (State.IDLE, "start"): (State.AWAIT_DESCRIPTOR, State.FAILED),
    (State.AWAIT_DESCRIPTOR, "descriptor_received"): (State.AWAIT_REPLY, State.FAILED),
    (State.AWAIT_DESCRIPTOR, "descriptor_failed"): (State.FAILED,),
    (State.AWAIT_REPLY, "reply_received"): (State.PEERED, State.FAILED),
    (State.AWAIT_REPLY, "reply_failed"): (State.FAILED,),
}


@dataclass(frozen=True, slots=True)
class _Hello:
    initiator: str
    responder: str
    versions: tuple[str, ...]
    nonce: bytes


def _transcript(initiator: str, responder: str, version: str, nonce: bytes) -> bytes:
    return encode({"initiator": initiator, "responder": responder, "version": version, "nonce": nonce})


def refusal_body(refusal: Refused) -> bytes:
    """The CBOR error body federation endpoints send: ``{"error": {code, message}}``."""
    return encode({"error": refusal.as_dict()})


def decode_refusal(status: int, body: bytes) -> Refused:
    """Read a peer's error reply; unknown or unreadable codes become ``handshake_failed``."""
    value = decode(body, max_size=MAX_HANDSHAKE_BYTES)
    if isinstance(value, dict) and isinstance(value.get("error"), dict):
        err = value["error"]
        code, message = err.get("code"), err.get("message")
        try:
            return Refused(Code(code), f"peer refused: {message}" if isinstance(message, str) else "peer refused")
        except ValueError:
            pass
    return Refused(Code.HANDSHAKE_FAILED, f"peer answered HTTP {status} without a known error code")


class Initiator:
    """One handshake we start with ``peer``. Drive it: ``start`` then feed results."""

    def __init__(self, *, server_name: str, peer: str, keyring: KeyRing, policy: Policy, keys: KeyCache,
                 versions: tuple[str, ...] = PROTOCOL_VERSIONS) -> None:
        self.server_name = server_name
        self.peer = peer
        self.keyring = keyring
        self.policy = policy
        self.keys = keys
        self.versions = versions
        self.state = State.IDLE
        self.version: str | None = None
        self.refusal: Refused | None = None
        self._nonce = b""
        self._peer_keys: ServerKeys | None = None

    def _expect(self, event: str) -> None:
        # Checked before an input touches anything (nonce, key cache), so a
        # misused machine is left exactly as it was.
        if (self.state, event) not in TRANSITIONS:
            raise LocalProtocolError(f"handshake: {event!r} is not valid in state {self.state!r}")

    def _move(self, event: str, new_state: str) -> None:
        allowed = TRANSITIONS.get((self.state, event))
        if allowed is None or new_state not in allowed:
            raise LocalProtocolError(f"handshake: {event!r} is not valid in state {self.state!r}")
        self.state = new_state

    def _fail(self, event: str, refusal: Refused) -> list[Effect]:
        self._move(event, State.FAILED)
        self.refusal = refusal
        return [Failed(self.peer, refusal)]

    @property
    def nonce(self) -> bytes:
        """The nonce given to :meth:`start` (empty before): a recorder keeps it."""
        return self._nonce

    def start(self, nonce: bytes) -> list[Effect]:
        """Begin. ``nonce`` is 16-64 fresh random bytes from the host."""
        self._expect("start")
        if not 16 <= len(nonce) <= 64:
            raise LocalProtocolError("handshake nonce must be 16-64 bytes")
        self._nonce = nonce
        if self.keyring.current is None:
            return self._fail("start", Refused(Code.OWN_KEY_MISSING,
                                               "no federation key: run `scaiwave admin federation key generate`"))
        refusal = self.policy.admits(self.peer)
        if refusal is not None:
            return self._fail("start", refusal)
        self._move("start", State.AWAIT_DESCRIPTOR)
        return [FetchDescriptor(self.peer)]

    def descriptor_received(self, data: bytes, now: int) -> list[Effect]:
        """The peer's descriptor bytes arrived; returns the hello request."""
        self._expect("descriptor_received")
        entry = self.keys.learn(self.peer, data, now)
        if isinstance(entry, Refused):
            return self._fail("descriptor_received", entry)
        if not set(entry.protocol_versions) & set(self.versions):
            return self._fail(
                "descriptor_received",
                Refused(Code.PROTOCOL_VERSION_MISMATCH, f"{self.peer} speaks {', '.join(entry.protocol_versions)[:200]}"),
            )
        # The proof is checked under this descriptor's key, even if the shared
        # cache is refreshed or forgets the peer while the hello is in flight.
        self._peer_keys = entry.keys
        body = encode({
            "type": "hello",
            "initiator": self.server_name,
            "responder": self.peer,
            "versions": list(self.versions),
            "nonce": self._nonce,
        })
        key = self.keyring.current
        assert key is not None  # checked in start()
        auth = sign_request(key, origin=self.server_name, destination=self.peer, method="POST",
                            target=HANDSHAKE_TARGET, body=body, now=now)
        self._move("descriptor_received", State.AWAIT_REPLY)
        return [SendRequest(self.peer, "POST", HANDSHAKE_TARGET, body, auth)]

    def descriptor_failed(self, refusal: Refused) -> list[Effect]:
        """The descriptor could not be fetched (``no_descriptor``, ``tls_failure``...)."""
        self._expect("descriptor_failed")
        return self._fail("descriptor_failed", refusal)

    def reply_received(self, status: int, body: bytes) -> list[Effect]:
        """The peer answered the hello; checks its proof."""
        self._expect("reply_received")
        if status != 200:
            return self._fail("reply_received", decode_refusal(status, body))
        value = decode(body, max_size=MAX_HANDSHAKE_BYTES, max_depth=2)
        if isinstance(value, Refused):
            return self._fail("reply_received", value)
        if not (isinstance(value, dict) and value.keys() == _WELCOME and value["type"] == "welcome"
                and type(value["version"]) is str and type(value["proof"]) is bytes):
            return self._fail("reply_received", Refused(Code.MALFORMED, "handshake reply is not a welcome"))
        if (value["initiator"], value["responder"], value["nonce"]) != (self.server_name, self.peer, self._nonce):
            return self._fail("reply_received", Refused(Code.HANDSHAKE_FAILED, "reply is for another handshake"))
        if value["version"] not in self.versions:
            return self._fail("reply_received",
                              Refused(Code.PROTOCOL_VERSION_MISMATCH, "peer chose a version we do not speak"))
        peer_keys = self._peer_keys
        assert peer_keys is not None and peer_keys.public_key is not None  # set in descriptor_received
        transcript = _transcript(self.server_name, self.peer, value["version"], self._nonce)
        if not verify(peer_keys.public_key, Domain.HANDSHAKE, transcript, value["proof"]):
            return self._fail("reply_received",
                              Refused(Code.HANDSHAKE_FAILED, "peer's proof does not verify under its descriptor key"))
        self._move("reply_received", State.PEERED)
        self.version = value["version"]
        return [PeerAgreed(self.peer, value["version"], peer_keys.key_id or "")]

    def reply_failed(self, refusal: Refused) -> list[Effect]:
        """The hello could not be delivered (transport failure)."""
        self._expect("reply_failed")
        return self._fail("reply_failed", refusal)


def _decode_hello(body: bytes) -> _Hello | Refused:
    value = decode(body, max_size=MAX_HANDSHAKE_BYTES, max_depth=2)
    if isinstance(value, Refused):
        return value
    if not (isinstance(value, dict) and value.keys() == _HELLO and value["type"] == "hello"):
        return Refused(Code.MALFORMED, "handshake body is not a hello")
    versions, nonce = value["versions"], value["nonce"]
    if not (type(versions) is list and 0 < len(versions) <= 32 and all(type(v) is str for v in versions)
            and type(nonce) is bytes and 16 <= len(nonce) <= 64
            and type(value["initiator"]) is str and type(value["responder"]) is str):
        return Refused(Code.MALFORMED, "handshake hello fields have the wrong types")
    return _Hello(value["initiator"], value["responder"], tuple(versions), nonce)


def answer_hello(
    *,
    origin: str,
    body: bytes,
    server_name: str,
    key: SigningKey | None,
    policy: Policy,
    versions: tuple[str, ...] = PROTOCOL_VERSIONS,
    origin_key_id: str = "",
) -> tuple[bytes, PeerAgreed] | Refused:
    """The responder's side: ``origin`` is the authenticated request origin and
    ``origin_key_id`` the key its request was signed with.

    Returns the welcome body and the agreement to record (the peer, the
    version, the peer's key id), or a refusal.
    """
    if key is None:
        return Refused(Code.OWN_KEY_MISSING, f"{server_name} has no federation key yet")
    hello = _decode_hello(body)
    if isinstance(hello, Refused):
        return hello
    if hello.initiator != origin or hello.responder != server_name:
        return Refused(Code.WRONG_DESTINATION, "hello names other servers than the signed request")
    refusal = policy.admits(origin)
    if refusal is not None:
        return refusal
    common = [v for v in versions if v in hello.versions]
    if not common:
        return Refused(Code.PROTOCOL_VERSION_MISMATCH, f"no common protocol version (we speak {', '.join(versions)})")
    version = common[0]
    proof = sign(key, Domain.HANDSHAKE, _transcript(origin, server_name, version, hello.nonce))
    reply: dict[str, Any] = {
        "type": "welcome",
        "initiator": origin,
        "responder": server_name,
        "version": version,
        "nonce": hello.nonce,
        "proof": proof,
    }
    return encode(reply), PeerAgreed(origin, version, origin_key_id)
