"""Known-answer vectors from fixed seeds and a fixed clock.

The same values, with the inputs that produce them, are listed in
docs/vectors.md so another implementation can check itself. Where it is
cheap, a vector is also recomputed without the core (the ``cryptography``
package's ed25519, ``hashlib``, hand-built CBOR), so the vectors do not
merely agree with themselves.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from scaiwave_federation.core import KeyRing, SigningKey, build_descriptor, make_event, sign_request
from scaiwave_federation.core.handshake import _transcript
from scaiwave_federation.core.keys import Domain, sign
from scaiwave_federation.core.wire import b64d, b64e, encode

# -- inputs --
NOW = 1_764_000_000_000
SEED_A = bytes([0x01]) * 32
SEED_B = bytes([0x02]) * 32
A = "your-host.test"
B = "peer.test:8449"

# -- expected outputs --
KEY_ID_A = "ed25519:NHUPmL1Z"
PUBLIC_KEY_A = "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
KEY_ID_B = "ed25519:ajgD1fBZ"
PUBLIC_KEY_B = "8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394"

EVENT_BODY = (
    "aa6176016274731b0000019ab697e8006470726576f66474797065686d2e63726561746565646570746801666f7269"
    "67696e6e706565722e746573743a383434396673656e6465727340626f623a706565722e746573743a383434396763"
    "6f6e74656e74a16763726561746f727340626f623a706565722e746573743a3834343967726f6f6d5f696473216772"
    "703a706565722e746573743a3834343969726f6f6d5f747970656567726f7570"
)
EVENT_SIGNATURE = (
    "5ffe53700bdb96b2526c33ac95195bdf8e68b4a11392a2bb95e52dc26a4b69ba"
    "9f16221533f27510c1ce08d209d810f9fbb85f0cb2f286d0f319924ff42de309"
)
EVENT_ENVELOPE = "8358ad" + EVENT_BODY + "70656432353531393a616a67443166425a" + "5840" + EVENT_SIGNATURE
EVENT_ID = "4d434635d438d6932240f616573464e819e0acd301b93498c372d0f29c901767"
EVENT_ID_TEXT = "$TUNGNdQ41pMiQPYWVzRk6BngrNMBuTSYw3LQ8pyQF2c"

REQUEST_TARGET = "/_scaiwave/federation/v1/rooms/!grp:peer.test:8449/backfill?limit=100"
AUTHORIZATION = (
    "ScaiWave-Sig "
    "p2R0aW1lGwAAAZq2l-gAZmRpZ2VzdFgg47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFVma2V5X2lkcGVkMjU1MTk6"
    "TkhVUG1MMVpmbWV0aG9kY0dFVGZvcmlnaW5ueW91ci1ob3N0LnRlc3RmdGFyZ2V0eEUvX3NjYWl3YXZlL2ZlZGVyYXRpb24v"
    "djEvcm9vbXMvIWdycDpwZWVyLnRlc3Q6ODQ0OS9iYWNrZmlsbD9saW1pdD0xMDBrZGVzdGluYXRpb25ucGVlci50ZXN0Ojg0"
    "NDk"
    ".CnoXEzp6ZVSX3EojrRKEjVL3SKPyiOrJ_-g5l-t5tDEp_cnBjx6xpWf9mIKKWrKXBqLT8k45ja3vM_SuytN8Ag"
)

DESCRIPTOR_ENDPOINT = "https://peer.test:8449/_scaiwave/federation/v1"
DESCRIPTOR_SIGNATURE = "A9D59y54mSDAPDwGj8_udCsvw3GPQRCQP6ZwdzhfEd6UzWGjhCuIq_Lx68iArxBXFz8hucEoxru4iD3E4YzOCw"

HANDSHAKE_NONCE = b"n" * 16
HANDSHAKE_TRANSCRIPT = (
    "a4656e6f6e6365506e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6776657273696f6e6e73636169776176652d6665642f31"
    "69696e69746961746f726e796f75722d686f73742e7465737469726573706f6e6465726e706565722e746573743a38343439"
)
HANDSHAKE_PROOF = (
    "1281096a21d17fa53b20d59abc0f30fa04c0d7e8d4d0e47a26ad1bc1daea85f9"
    "56d07a24907a957fd613da6af5313c43746d28e7253493b346aaa6320712700d"
)


def _ed25519_public(seed: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> None:
    Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)  # raises if wrong


def test_keys():
    for seed, key_id, public in ((SEED_A, KEY_ID_A, PUBLIC_KEY_A), (SEED_B, KEY_ID_B, PUBLIC_KEY_B)):
        key = SigningKey.from_seed(seed, NOW)
        assert key.key_id == key_id
        assert key.public_key.hex() == public
        # Independently: RFC 8032 key derivation, and the key id rule.
        assert _ed25519_public(seed).hex() == public
        assert key_id == "ed25519:" + b64e(hashlib.sha256(bytes.fromhex(public)).digest()[:6])


def _vector_event():
    return make_event(SigningKey.from_seed(SEED_B, NOW), room_id=f"!grp:{B}", room_type="group", depth=1,
                      prev=None, origin=B, sender=f"@bob:{B}", type="m.create", ts=NOW,
                      content={"creator": f"@bob:{B}"})


def test_event():
    event = _vector_event()
    assert event.body.hex() == EVENT_BODY
    assert event.signature.hex() == EVENT_SIGNATURE
    assert event.envelope.hex() == EVENT_ENVELOPE
    assert event.event_id.hex() == EVENT_ID
    assert event.id_text == EVENT_ID_TEXT
    # Independently: the id is sha256 of the body, the signature is ed25519 over
    # the domain prefix + body, the envelope is the 3-array [body, key_id, sig].
    body = bytes.fromhex(EVENT_BODY)
    assert hashlib.sha256(body).hexdigest() == EVENT_ID
    _ed25519_verify(bytes.fromhex(PUBLIC_KEY_B), b"scaiwave/event/v1\x00" + body, bytes.fromhex(EVENT_SIGNATURE))
    assert bytes.fromhex(EVENT_ENVELOPE) == (
        b"\x83" + b"\x58\xad" + body + b"\x70" + KEY_ID_B.encode() + b"\x58\x40" + bytes.fromhex(EVENT_SIGNATURE))
    # The body's first map entries in canonical order: "v" then "ts" (shortest keys first).
    assert body.startswith(b"\xaa" + b"\x61v\x01" + b"\x62ts\x1b" + NOW.to_bytes(8, "big"))


def test_request_authorization():
    key = SigningKey.from_seed(SEED_A, NOW)
    header = sign_request(key, origin=A, destination=B, method="GET", target=REQUEST_TARGET, body=b"", now=NOW)
    assert header == AUTHORIZATION
    signed_text, sig_text = AUTHORIZATION.split(" ", 1)[1].split(".")
    signed = b64d(signed_text)
    assert signed == encode({"origin": A, "destination": B, "method": "GET", "target": REQUEST_TARGET,
                             "time": NOW, "digest": hashlib.sha256(b"").digest(), "key_id": KEY_ID_A})
    _ed25519_verify(bytes.fromhex(PUBLIC_KEY_A), b"scaiwave/request/v1\x00" + signed, b64d(sig_text))


def test_descriptor_signature():
    ring = KeyRing().generate(SEED_B, NOW)
    doc = build_descriptor(B, ring, federation_endpoint=DESCRIPTOR_ENDPOINT)
    assert doc["signature"] == DESCRIPTOR_SIGNATURE
    assert doc["valid_until"] == NOW + 365 * 24 * 3600 * 1000
    fields = {k: v for k, v in doc.items() if k != "signature"}
    assert fields == {
        "server_name": B,
        "protocol_versions": ["scaiwave-fed/1"],
        "federation_endpoint": DESCRIPTOR_ENDPOINT,
        "public_key": b64e(bytes.fromhex(PUBLIC_KEY_B)),
        "key_id": KEY_ID_B,
        "valid_until": 1_795_536_000_000,
        "old_keys": [],
    }
    _ed25519_verify(bytes.fromhex(PUBLIC_KEY_B), b"scaiwave/descriptor/v1\x00" + encode(fields),
                    b64d(DESCRIPTOR_SIGNATURE))


def test_handshake_proof():
    transcript = _transcript(A, B, "scaiwave-fed/1", HANDSHAKE_NONCE)
    assert transcript.hex() == HANDSHAKE_TRANSCRIPT
    assert transcript == encode({"initiator": A, "responder": B, "version": "scaiwave-fed/1",
                                 "nonce": HANDSHAKE_NONCE})
    proof = sign(SigningKey.from_seed(SEED_B, NOW), Domain.HANDSHAKE, transcript)
    assert proof.hex() == HANDSHAKE_PROOF
    _ed25519_verify(bytes.fromhex(PUBLIC_KEY_B), b"scaiwave/handshake/v1\x00" + transcript, proof)


def test_domain_prefixes():
    assert (Domain.EVENT, Domain.REQUEST, Domain.DESCRIPTOR, Domain.HANDSHAKE) == (
        b"scaiwave/event/v1\x00", b"scaiwave/request/v1\x00", b"scaiwave/descriptor/v1\x00",
        b"scaiwave/handshake/v1\x00")


def test_docs_list_the_same_vectors():
    from pathlib import Path

    docs = Path(__file__).resolve().parent.parent / "docs"
    text = (docs / "vectors.md").read_text()
    flat = "".join(text.split())  # hex blocks are wrapped over lines
    appendix = (docs / "protocol.md").read_text().split("## Appendix: known-answer vectors", 1)[1]
    flat_protocol = "".join(appendix.split())
    for value in (KEY_ID_A, PUBLIC_KEY_A, KEY_ID_B, PUBLIC_KEY_B, EVENT_BODY, EVENT_SIGNATURE, EVENT_ID,
                  EVENT_ID_TEXT, EVENT_ENVELOPE, AUTHORIZATION.split(" ", 1)[1], DESCRIPTOR_SIGNATURE,
                  HANDSHAKE_TRANSCRIPT, HANDSHAKE_PROOF, REQUEST_TARGET, DESCRIPTOR_ENDPOINT, str(NOW)):
        assert "".join(value.split()) in flat, value
        assert "".join(value.split()) in flat_protocol, value
