"""Descriptors (``/.well-known/scaiwave``) and the key cache that holds peers' ones."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corehelpers import DAY, NOW, seed
from scaiwave_federation.core import PROTOCOL_VERSIONS, Code, KeyCache, KeyRing, Refused, build_descriptor, parse_descriptor
from scaiwave_federation.core.descriptor import MAX_DESCRIPTOR_BYTES
from scaiwave_federation.core.wire import b64e

NAME = "peer.test:8449"
ENDPOINT = "https://peer.test:8449/_scaiwave/federation/v1"


def _ring(rotations: int = 0) -> KeyRing:
    ring = KeyRing().generate(seed(1), NOW)
    for i in range(rotations):
        ring = ring.rotate(seed(2 + i), NOW + (i + 1) * DAY)
    return ring


def _doc(ring: KeyRing | None = None, name: str = NAME) -> dict:
    return build_descriptor(name, ring or _ring(), federation_endpoint=ENDPOINT)


def _bytes(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def test_build_fields():
    ring = _ring(1)
    doc = _doc(ring)
    assert set(doc) == {"server_name", "protocol_versions", "federation_endpoint", "public_key", "key_id",
                        "valid_until", "old_keys", "signature"}
    assert doc["server_name"] == NAME
    assert doc["protocol_versions"] == list(PROTOCOL_VERSIONS)
    assert doc["federation_endpoint"] == ENDPOINT
    assert doc["public_key"] == b64e(ring.current.public_key)
    assert doc["key_id"] == ring.current.key_id
    assert doc["valid_until"] == ring.rotation_due_at()
    assert doc["old_keys"] == [{"key_id": ring.old[0].key_id, "public_key": b64e(ring.old[0].public_key),
                                "expired_at": NOW + DAY}]


@pytest.mark.parametrize("rotations", [0, 1, 3])
def test_round_trip(rotations):
    ring = _ring(rotations)
    parsed = parse_descriptor(_bytes(_doc(ring)), NAME)
    assert not isinstance(parsed, Refused), parsed
    keys, versions, fields = parsed
    assert keys == ring.public(NAME)
    assert versions == PROTOCOL_VERSIONS
    assert fields["federation_endpoint"] == ENDPOINT


def test_json_formatting_does_not_matter():
    # The signature is over the canonical CBOR of the fields, not the JSON text.
    doc = _doc()
    pretty = json.dumps(doc, indent=4, sort_keys=True).encode()
    assert not isinstance(parse_descriptor(pretty, NAME), Refused)


def test_without_a_key_it_says_not_federating_yet():
    doc = build_descriptor(NAME, KeyRing(), federation_endpoint=ENDPOINT)
    assert (doc["public_key"], doc["key_id"], doc["signature"], doc["valid_until"]) == ("", "", "", 0)
    refused = parse_descriptor(_bytes(doc), NAME)
    assert isinstance(refused, Refused) and refused.code is Code.INVALID_DESCRIPTOR


def test_other_server_name_is_a_mismatch():
    refused = parse_descriptor(_bytes(_doc(name="evil.test")), NAME)
    assert isinstance(refused, Refused) and refused.code is Code.SERVER_NAME_MISMATCH


TAMPERINGS = {
    "endpoint": lambda d: d.update(federation_endpoint="https://evil.test/"),
    "versions": lambda d: d.update(protocol_versions=["scaiwave-fed/0"]),
    "valid_until": lambda d: d.update(valid_until=d["valid_until"] + 1),
    "old key expiry": lambda d: d["old_keys"][0].update(expired_at=NOW + 400 * DAY),
    "old key dropped": lambda d: d.update(old_keys=[]),
    "old key added": lambda d: d["old_keys"].append(dict(d["old_keys"][0], expired_at=1)),
    "key swapped for another valid key": lambda d: d.update(
        public_key=b64e(KeyRing().generate(seed(9), 0).current.public_key),
        key_id=KeyRing().generate(seed(9), 0).current.key_id),
    "key_id not of public_key": lambda d: d.update(key_id=KeyRing().generate(seed(9), 0).current.key_id),
    "signature flipped": lambda d: d.update(signature=b64e(bytes(64))),
    "signature not base64url": lambda d: d.update(signature="!!"),
    "public_key not base64url": lambda d: d.update(public_key="a+b/"),
    "public_key too short": lambda d: d.update(public_key=b64e(bytes(31))),
    "old public key malformed": lambda d: d["old_keys"][0].update(public_key="AA=="),
    "old key_id not of its key": lambda d: d["old_keys"][0].update(key_id="ed25519:AAAAAAAA"),
}


@pytest.mark.parametrize("tamper", TAMPERINGS.values(), ids=TAMPERINGS.keys())
def test_tampered_field_is_invalid(tamper):
    doc = _doc(_ring(1))
    tamper(doc)
    refused = parse_descriptor(_bytes(doc), NAME)
    assert isinstance(refused, Refused), refused
    assert refused.code is Code.INVALID_DESCRIPTOR


SHAPES = {
    "missing field": lambda d: d.pop("valid_until"),
    "extra field": lambda d: d.update(extra=1),
    "server_name not text": lambda d: d.update(server_name=5),
    "text too long": lambda d: d.update(federation_endpoint="x" * 2000),
    "versions empty": lambda d: d.update(protocol_versions=[]),
    "versions not a list": lambda d: d.update(protocol_versions="scaiwave-fed/1"),
    "version not text": lambda d: d.update(protocol_versions=[1]),
    "too many versions": lambda d: d.update(protocol_versions=["v"] * 33),
    "valid_until negative": lambda d: d.update(valid_until=-1),
    "valid_until float": lambda d: d.update(valid_until=1.5),
    "valid_until bool": lambda d: d.update(valid_until=True),
    "old_keys not a list": lambda d: d.update(old_keys={}),
    "old key not a map": lambda d: d.update(old_keys=[1]),
    "old key extra field": lambda d: d["old_keys"][0].update(x=1),
    "old key id not text": lambda d: d["old_keys"][0].update(key_id=1),
    "old key expiry text": lambda d: d["old_keys"][0].update(expired_at="1"),
    "too many old keys": lambda d: d.update(old_keys=d["old_keys"] * 257),
    "lone surrogate in the endpoint": lambda d: d.update(federation_endpoint="\ud800"),
    "lone surrogate in a version": lambda d: d.update(protocol_versions=["\udfff"]),
}


@pytest.mark.parametrize("change", SHAPES.values(), ids=SHAPES.keys())
def test_wrong_shapes_are_refused_never_raised(change):
    doc = _doc(_ring(1))
    change(doc)
    refused = parse_descriptor(_bytes(doc), NAME)
    assert isinstance(refused, Refused), refused
    assert refused.code is Code.INVALID_DESCRIPTOR


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff\xfe", b"not json", b"[]", b"null", b"{}", b"[" * 60_000, b'{"a": 1e999}',
     b'{"valid_until": ' + b"9" * 5000 + b"}"],
)
def test_garbage_is_invalid_descriptor(data):
    refused = parse_descriptor(data, NAME)
    assert isinstance(refused, Refused) and refused.code is Code.INVALID_DESCRIPTOR


def test_oversized_is_too_large():
    doc = _doc()
    data = _bytes(doc)
    padded = data[:-1] + b" " * (MAX_DESCRIPTOR_BYTES - len(data) + 1) + b"}"
    assert len(padded) == MAX_DESCRIPTOR_BYTES + 1
    refused = parse_descriptor(padded, NAME)
    assert isinstance(refused, Refused) and refused.code is Code.TOO_LARGE


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_refuse(data):
    result = parse_descriptor(data, NAME)
    assert isinstance(result, Refused)


@given(st.dictionaries(st.sampled_from(["server_name", "protocol_versions", "federation_endpoint", "public_key",
                                        "key_id", "valid_until", "old_keys", "signature"]),
                       st.none() | st.integers() | st.text(max_size=5) | st.lists(st.text(max_size=3), max_size=3)))
def test_any_json_shape_is_refused_never_raised(fields):
    doc = {**_doc(), **fields}
    result = parse_descriptor(_bytes(doc), NAME)
    if fields and any(doc[k] != _doc()[k] for k in fields):
        assert isinstance(result, Refused)


# -- the key cache ----------------------------------------------------------------


def test_key_cache_learn_get_forget():
    cache = KeyCache(refetch_interval_ms=1000)
    assert cache.get(NAME) is None and cache.keys(NAME) is None
    assert cache.may_fetch(NAME, NOW)
    entry = cache.learn(NAME, _bytes(_doc()), NOW)
    assert not isinstance(entry, Refused)
    assert entry.fetched_at == NOW and entry.protocol_versions == PROTOCOL_VERSIONS
    assert cache.keys(NAME) == _ring().public(NAME)
    assert cache.servers() == [NAME]
    # The rate limit counts from the fetch.
    assert not cache.may_fetch(NAME, NOW + 999)
    assert cache.may_fetch(NAME, NOW + 1000)
    cache.forget(NAME)
    assert cache.get(NAME) is None and cache.may_fetch(NAME, NOW + 1)


def test_a_broken_fetch_never_loses_trusted_keys():
    cache = KeyCache()
    cache.learn(NAME, _bytes(_doc()), NOW)
    refused = cache.learn(NAME, b"garbage", NOW + 60_000)
    assert isinstance(refused, Refused)
    assert cache.keys(NAME) == _ring().public(NAME)
    # ...but the failed attempt still counts for the rate limit.
    assert not cache.may_fetch(NAME, NOW + 60_001)


def test_relearning_replaces_keys_after_rotation():
    cache = KeyCache()
    cache.learn(NAME, _bytes(_doc(_ring(0))), NOW)
    cache.learn(NAME, _bytes(_doc(_ring(1))), NOW + DAY)
    assert cache.keys(NAME) == _ring(1).public(NAME)
