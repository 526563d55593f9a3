"""The wire model: canonical CBOR in, strict bounded decoding of untrusted bytes.

Every refusal is a value with a code, never an exception; the
exponential-time input (maps nested as map keys) is refused fast.
"""

from __future__ import annotations

import struct
import time

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scaiwave_federation.core import Code, LocalProtocolError, Refused
from scaiwave_federation.core.wire import MAX_DEPTH, b64d, b64e, decode, encode

# Values the protocol encodes: text-keyed maps, lists, text, bytes, ints, bools, None.
values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64 - 1) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


@given(values)
def test_canonical_round_trip(value):
    data = encode(value)
    assert decode(data, max_size=len(data)) == value
    # One encoding per value: encoding the decoded value gives the same bytes.
    assert encode(decode(data, max_size=len(data))) == data


# Values the encoder's plain path must keep canonical: any text keys (surrogates
# too), ints past 64 bits, and floats (which take cbor2's canonical encoder).
any_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.binary() | st.floats(),
    lambda inner: st.lists(inner, max_size=5) | st.tuples(inner) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=25,
)


@given(any_values)
def test_encode_is_cbor2_canonical(value):
    try:
        expected = cbor2.dumps(value, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError):
        with pytest.raises(LocalProtocolError):
            encode(value)
        return
    assert encode(value) == expected


def test_encode_sorts_keys_canonically():
    # RFC 8949 4.2.1: keys sorted by their encoded bytes (shorter first).
    assert encode({"bb": 1, "a": 2, "c": 3}) == bytes.fromhex("a3") + b"\x61a\x02" + b"\x61c\x03" + b"\x62bb\x01"


def test_encode_refuses_what_the_protocol_cannot_carry():
    with pytest.raises(LocalProtocolError):
        encode(object())


def test_encode_refuses_values_nested_too_deep_instead_of_crashing():
    """cbor2's C encoder kills the process on a value nested ~10k deep; encode
    refuses it first. In a subprocess, so a regression fails this test, not the run."""
    import subprocess
    import sys

    program = (
        "from scaiwave_federation.core.wire import encode\n"
        "from scaiwave_federation.core import LocalProtocolError\n"
        "v = []\n"
        "for _ in range(100_000): v = [v]\n"
        "try:\n    encode({'deep': v})\nexcept LocalProtocolError as e:\n    print('refused:', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-500:]
    assert "refused: cannot encode a value nested more than 64 deep" in done.stdout


def test_encode_takes_values_up_to_the_encode_depth():
    from scaiwave_federation.core.wire import MAX_ENCODE_DEPTH

    value: list = []
    for _ in range(MAX_ENCODE_DEPTH - 1):
        value = [value]
    assert encode(value).startswith(b"\x81" * (MAX_ENCODE_DEPTH - 1) + b"\x80")
    with pytest.raises(LocalProtocolError):
        encode([value])
    assert encode(({"a": (1, [2])},)) == encode([{"a": [1, [2]]}])


def test_decode_takes_only_bytes():
    with pytest.raises(LocalProtocolError):
        decode("text", max_size=10)


def test_bytearray_and_memoryview_are_accepted():
    data = encode([1, "x"])
    assert decode(bytearray(data), max_size=100) == [1, "x"]
    assert decode(memoryview(data), max_size=100) == [1, "x"]


def test_too_large_is_refused_before_parsing():
    data = encode("x" * 100)
    assert decode(data, max_size=len(data)) == "x" * 100
    refused = decode(data, max_size=len(data) - 1)
    assert isinstance(refused, Refused) and refused.code is Code.TOO_LARGE
    # Even garbage is only measured, not parsed.
    assert decode(b"\xff" * 11, max_size=10).code is Code.TOO_LARGE


TAGGED = {
    "datetime string, tag 0": "c074323031332d30332d32315432303a30343a30305a",
    "epoch datetime, tag 1": "c11a514b67b0",
    "positive bignum, tag 2": "c249010000000000000000",
    "negative bignum, tag 3": "c349010000000000000000",
    "decimal fraction, tag 4": "c48221196ab3",
    "shared value, tag 28": "d81c80",
    "shared reference, tag 29": "82d81c80d81d00",
    "bare shared reference, tag 29": "d81d00",
    "regex, tag 35": "d8236161",
    "uuid, tag 37": "d82550" + "00" * 16,
    "set, tag 258": "d9010283010203",
    "self-described CBOR, tag 55799": "d9d9f701",
    "unknown tag 65535": "d9ffff01",
    "unknown tag 2**32": "db000000010000000001",
    "tag inside a map": "a16161c11a514b67b0",
}


@pytest.mark.parametrize("hex_data", TAGGED.values(), ids=TAGGED.keys())
def test_every_tag_is_malformed(hex_data):
    refused = decode(bytes.fromhex(hex_data), max_size=1000)
    assert isinstance(refused, Refused)
    assert refused.code is Code.MALFORMED


MALFORMED = {
    "indefinite array": "9f0102ff",
    "indefinite map": "bf616101ff",
    "indefinite text": "7f616161626163ff",
    "indefinite bytes": "5f4101ff",
    "duplicate key": "a2616101616102",
    "integer map key": "a10101",
    "array map key": "a1800000",
    "map map key": "a1a00000",
    "bool map key": "a1f500",
    "invalid utf-8 text": "62c328",
    "truncated array": "8201",
    "empty input": "",
    "lone break": "ff",
    "length beyond the input": "5bffffffffffffffff",
    "reserved additional info": "1c",
}


@pytest.mark.parametrize("hex_data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_inputs(hex_data):
    refused = decode(bytes.fromhex(hex_data), max_size=1000)
    assert isinstance(refused, Refused), refused
    assert refused.code is Code.MALFORMED


def test_bytes_map_keys_are_allowed_when_canonical():
    data = encode({b"k": 1})
    assert decode(data, max_size=100) == {b"k": 1}


def test_depth_limit():
    def nested(depth):
        value: object = 0
        for _ in range(depth):
            value = [value]
        return encode(value)

    assert decode(nested(MAX_DEPTH), max_size=1000) == nested_value(MAX_DEPTH)
    assert decode(nested(MAX_DEPTH + 1), max_size=1000).code is Code.MALFORMED
    assert decode(nested(3), max_size=1000, max_depth=2).code is Code.MALFORMED
    # Far deeper than Python's recursion limit: still a value, not an exception.
    assert decode(b"\x81" * 100_000 + b"\x00", max_size=1 << 20).code in (Code.MALFORMED, Code.TOO_LARGE)
    deep = b"\x81" * 20_000 + encode(b"x" * 700_000)  # inside the container budget
    refused = decode(deep, max_size=1 << 20)
    assert refused.code is Code.MALFORMED and "depth" in refused.detail


def nested_value(depth):
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


NON_CANONICAL = {
    "trailing byte": "0100",
    "two items": "0101",
    "1 as two bytes": "1801",
    "23 as two bytes": "1817",
    "24 as three bytes": "190018",
    "-1 as two bytes": "3800",
    "length 1 text with a two-byte length": "780161",
    "array length with a two-byte length": "980100",
    "unsorted keys": "a2616201616101",
    "longer key before shorter": "a262616101616202",
    "float64 1.0 (shortest is float16)": "fb3ff0000000000000",
}


@pytest.mark.parametrize("hex_data", NON_CANONICAL.values(), ids=NON_CANONICAL.keys())
def test_non_canonical_inputs(hex_data):
    refused = decode(bytes.fromhex(hex_data), max_size=1000)
    assert isinstance(refused, Refused), refused
    assert refused.code is Code.NON_CANONICAL


def _maps_as_keys(levels: int, pad: int = 0) -> bytes:
    # {{{...{}:0}:0}:0}: each level is a one-entry map whose key is the level
    # below; ``pad`` bytes of string value per level keep it inside the
    # container budget, so that the map-key rule itself is what refuses it.
    value = encode(b"x" * pad) if pad else b"\x00"
    data = b"\xa0"
    for _ in range(levels):
        data = b"\xa1" + data + value
    return data


FAST = 0.050  # seconds; re-encoding the 45-byte input alone took 5 s before the fix


def _timed_decode(data: bytes, max_depth: int) -> tuple[object, float]:
    """``decode``'s result and its best time of three tries.

    The best of three, so that one stall of a busy machine cannot fail the
    test, while a super-linear decoder (seconds per try) still does.
    """
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        result = decode(data, max_size=1 << 20, max_depth=max_depth)
        best = min(best, time.perf_counter() - started)
    return result, best


@pytest.mark.parametrize("levels", [22, 1000])
@pytest.mark.parametrize("max_depth", [MAX_DEPTH, 5000])
def test_maps_nested_as_map_keys_are_refused_fast(levels, max_depth):
    """cbor2's canonical encoder is exponential on such input (45 bytes took 5 s):
    it must be refused before it can reach the re-encoder."""
    data = _maps_as_keys(levels)
    assert len(data) in (45, 2001)
    refused, elapsed = _timed_decode(data, max_depth)
    assert isinstance(refused, Refused)
    assert refused.code in (Code.MALFORMED, Code.TOO_LARGE)
    assert elapsed < FAST, f"took {elapsed * 1000:.1f} ms"


@pytest.mark.parametrize("levels, pad, max_depth", [(10, 40, MAX_DEPTH), (1000, 40, 5000)])
def test_maps_as_map_keys_within_every_budget_are_malformed_fast(levels, pad, max_depth):
    data = _maps_as_keys(levels, pad)
    refused, elapsed = _timed_decode(data, max_depth)
    assert isinstance(refused, Refused) and refused.code is Code.MALFORMED
    assert "map key" in refused.detail
    assert elapsed < FAST, f"took {elapsed * 1000:.1f} ms"


def test_arrays_as_map_keys_are_refused_fast():
    data = b"\x80"
    for _ in range(1000):
        data = b"\xa1\x81" + data + encode(b"x" * 80)
    refused, elapsed = _timed_decode(data, 5000)
    assert refused.code is Code.MALFORMED
    assert elapsed < FAST, f"took {elapsed * 1000:.1f} ms"


# -- the container budget --


def test_many_containers_in_few_bytes_are_too_large():
    data = encode([{}] * 1000)
    assert len(data) == 1003
    refused = decode(data, max_size=1 << 20)
    assert refused.code is Code.TOO_LARGE
    # The same count is fine when the bytes carry that much content.
    padded = encode([{"k": "x" * 40}] * 1000)
    assert decode(padded, max_size=1 << 20) == [{"k": "x" * 40}] * 1000


def test_container_head_bytes_inside_strings_do_not_count():
    # Bytes 0x80-0xbf inside strings look like container heads to the cheap
    # bound; the walk that follows skips string contents.
    value = [b"\xa0" * 5000, "\u00a0" * 700, {"k": b"\x80" * 300}]
    data = encode(value)
    assert decode(data, max_size=1 << 20) == value


@pytest.mark.parametrize(
    "data, code",
    [
        # The walk leaves what it does not follow to cbor2, which refuses it.
        (b"\xc1" + encode(b"\xa0" * 500), Code.MALFORMED),  # a tag
        (b"\x9f" + b"\xa0" * 500 + b"\xff", Code.MALFORMED),  # indefinite length
        (b"\x82" + encode(b"\xa0" * 500), Code.MALFORMED),  # truncated: one item of two
        (b"\x1f" + b"\xa0" * 500, Code.MALFORMED),  # reserved additional information
    ],
)
def test_budget_walk_hands_odd_input_to_the_decoder(data, code):
    assert decode(data, max_size=1 << 20).code is code


def test_unsorted_keys_anywhere_are_non_canonical():
    good = encode({"a": 1, "bb": 2})
    bad = bytes.fromhex("a2626262026161" + "01")  # {"bb": 2, "a": 1}
    assert decode(good, max_size=100) == {"a": 1, "bb": 2}
    for _ in range(2):  # the second time the key order comes from the cache
        assert decode(bad, max_size=100).code is Code.NON_CANONICAL
        assert decode(b"\x81" + bad, max_size=100).code is Code.NON_CANONICAL
        assert decode(bytes.fromhex("a16178") + bad, max_size=100).code is Code.NON_CANONICAL
        assert decode(good, max_size=100) == {"a": 1, "bb": 2}


@pytest.mark.parametrize("value", [1.0, 0.1, 1e300, -2.5, 65504.0, 1.5e-5, float("inf")])
def test_floats_must_be_shortest(value):
    data = encode(value)
    assert decode(data, max_size=100) == value
    # The 8-byte form of a value that fits shorter is not canonical.
    eight = b"\xfb" + struct.pack(">d", value)
    if eight != data:
        assert decode(eight, max_size=100).code is Code.NON_CANONICAL
    assert decode(encode({"f": value, "n": [value]}), max_size=100) == {"f": value, "n": [value]}


@given(st.binary(max_size=64))
def test_any_bytes_decode_or_refuse(data):
    # The h11 fuzz invariant: any bytes are a value or a refusal, never an exception.
    result = decode(data, max_size=64)
    if isinstance(result, Refused):
        assert result.code in (Code.MALFORMED, Code.NON_CANONICAL)
    else:
        assert cbor2.dumps(result, canonical=True) == data


# -- base64url --


@given(st.binary(max_size=100))
def test_b64_round_trip(raw):
    text = b64e(raw)
    assert "=" not in text and "+" not in text and "/" not in text
    assert b64d(text) == raw


@pytest.mark.parametrize(
    "text",
    [
        "AA==",  # padded
        "AB",  # non-zero unused bits: decodes, but is not b64e of anything
        "A",  # impossible length
        "A+8",  # standard alphabet
        "A/8",
        "AA AA",  # whitespace
        "é",  # not ASCII
        "AA\n",
    ],
)
def test_b64d_rejects_non_canonical_text(text):
    assert b64d(text) is None


def test_b64d_rejects_non_text_and_huge_input():
    assert b64d(b"AA") is None
    assert b64d(None) is None
    assert b64d("A" * ((1 << 16) + 4)) is None
    assert b64d("") == b""
