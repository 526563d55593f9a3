"""Input generation for the fuzzer: raw CBOR, JSON, and mutations.

Everything draws from a caller-supplied :class:`random.Random`, so a run is
a function of its seed.

:func:`cbor_item` writes CBOR bytes directly (not through an encoder), so it
can produce what no encoder would: non-minimal heads, indefinite-length
strings and containers, tags, simple values, half/single/double floats,
declared lengths far beyond the data, very deep nesting, duplicate keys and
maps (or arrays) used as map keys, including the nested-map-keys shape that
makes cbor2's canonical encoder take exponential time.

:func:`mutate_bytes` is the byte-level mutator (bit flips, interesting bytes,
CBOR heads spliced in, insert/delete/duplicate/truncate, crossover);
:func:`mutate_value` changes a decoded value tree (replace, drop or add
entries, change types, boundary integers).
"""

from __future__ import annotations

import json
import random
import struct
from typing import Any

__all__ = [
    "cbor_head",
    "cbor_item",
    "cbor_nasty",
    "json_value",
    "json_nasty",
    "mutate_bytes",
    "mutate_value",
    "random_value",
    "INTERESTING_INTS",
]

#: Integers at the edges of CBOR's argument sizes and of the core's checks.
INTERESTING_INTS = (
    0, 1, 2, 15, 16, 17, 23, 24, 255, 256, 65535, 65536, (1 << 31) - 1, 1 << 31,
    (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, -1, -24, -25, -(1 << 63), -(1 << 64),
)
_INTERESTING_BYTES = bytes(
    [0x00, 0x01, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1F, 0x20, 0x3F, 0x40, 0x5F, 0x60, 0x7F, 0x80, 0x9F, 0xA0,
     0xBF, 0xC0, 0xC2, 0xD8, 0xD9, 0xE0, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8, 0xF9, 0xFA, 0xFB, 0xFF]
)
_TAGS = (0, 1, 2, 3, 4, 5, 21, 22, 23, 24, 25, 28, 29, 30, 32, 35, 36, 37, 256, 258, 260, 261, 55799, (1 << 64) - 1)
_TEXTS = (
    "", "a", "v", "room_id", "events", "type", "hello", "welcome", "@bob:peer.test", "!grp:peer.test",
    "peer.test", "peer.test:8449", "your-host.test", "ed25519:AAAAAAAA", "m.message", "m.member",
    "\x00", "\ud7ff", "\U0010ffff", "é", "a" * 300, "x:" * 40, "@" + "a" * 200 + ":b", "[::1]:8449",
)


def cbor_head(major: int, arg: int, rng: random.Random | None = None) -> bytes:
    """A CBOR head; with ``rng``, sometimes in a longer form than minimal."""
    if arg < 0:
        raise ValueError("CBOR arguments are unsigned")
    minimal = 0 if arg < 24 else 1 if arg < 1 << 8 else 2 if arg < 1 << 16 else 3 if arg < 1 << 32 else 4
    size = minimal
    if rng is not None and rng.random() < 0.08 and minimal < 4:
        size = rng.randint(minimal + 1, 4)  # non-minimal: must be refused as non-canonical
    mt = major << 5
    if size == 0:
        return bytes([mt | arg])
    width = 1 << (size - 1)
    return bytes([mt | (23 + size)]) + (arg & ((1 << (8 * width)) - 1)).to_bytes(width, "big")


def _int_item(rng: random.Random) -> bytes:
    n = rng.choice(INTERESTING_INTS) if rng.random() < 0.5 else rng.randint(-300, 70000)
    if n >= 0:
        return cbor_head(0, min(n, (1 << 64) - 1), rng)
    return cbor_head(1, min(-1 - n, (1 << 64) - 1), rng)


def _string_item(rng: random.Random, major: int) -> bytes:
    if major == 3 and rng.random() < 0.7:
        raw = rng.choice(_TEXTS).encode("utf-8", "surrogatepass")
    else:
        raw = rng.randbytes(rng.choice((0, 1, 8, 16, 32, 33, 64, 65, rng.randint(0, 300))))
    if rng.random() < 0.05:
        # Indefinite string made of chunks (refused by the core).
        chunks = b"".join(cbor_head(major, len(raw[i:i + 4])) + raw[i:i + 4] for i in range(0, len(raw), 4))
        return bytes([(major << 5) | 31]) + chunks + b"\xff"
    return cbor_head(major, len(raw), rng) + raw


def _simple_item(rng: random.Random) -> bytes:
    pick = rng.randrange(8)
    if pick < 3:
        return bytes([0xF4 + pick])  # false, true, null
    if pick == 3:
        return b"\xf7"  # undefined
    if pick == 4:
        return bytes([0xE0 | rng.randrange(20)]) if rng.random() < 0.5 else b"\xf8" + bytes([rng.randrange(256)])
    if pick == 5:
        return b"\xf9" + rng.randbytes(2)
    if pick == 6:
        return b"\xfa" + struct.pack(">f", rng.choice((0.0, 1.0, -1.5, 1e30, float("inf"))))
    return b"\xfb" + struct.pack(">d", rng.choice((0.0, 1.0, 0.1, float("nan"), 1e300, -0.0)))


def cbor_item(rng: random.Random, depth: int = 0, max_depth: int = 6) -> bytes:
    """One random, mostly well-formed CBOR data item as bytes."""
    roll = rng.random()
    if depth >= max_depth or roll < 0.35:
        kind = rng.randrange(4)
        if kind == 0:
            return _int_item(rng)
        if kind == 1:
            return _string_item(rng, 2)
        if kind == 2:
            return _string_item(rng, 3)
        return _simple_item(rng)
    if roll < 0.60:
        n = rng.choice((0, 1, 2, 3, 4, rng.randint(0, 12)))
        items = b"".join(cbor_item(rng, depth + 1, max_depth) for _ in range(n))
        if rng.random() < 0.05:
            return b"\x9f" + items + b"\xff"
        return cbor_head(4, n, rng) + items
    if roll < 0.88:
        n = rng.choice((0, 1, 2, 3, rng.randint(0, 10)))
        out = []
        for _ in range(n):
            r = rng.random()
            if r < 0.75:
                key = _string_item(rng, 3)
            elif r < 0.85:
                key = _string_item(rng, 2)
            else:
                key = cbor_item(rng, depth + 1, max_depth)  # ints, maps, arrays as keys
            out.append(key + cbor_item(rng, depth + 1, max_depth))
        if out and rng.random() < 0.1:
            out.append(out[0])  # duplicate key
        body = b"".join(out)
        if rng.random() < 0.05:
            return b"\xbf" + body + b"\xff"
        return cbor_head(5, len(out), rng) + body
    if roll < 0.95:
        return cbor_head(6, rng.choice(_TAGS), rng) + cbor_item(rng, depth + 1, max_depth)
    return cbor_nasty(rng)


def cbor_nasty(rng: random.Random) -> bytes:
    """One of the known-hostile shapes, with random sizes."""
    kind = rng.randrange(9)
    n = rng.randint(1, 40)
    if kind == 0:
        # Maps nested as map keys: exponential in cbor2's canonical encoder.
        return b"\xa1" * n + b"\xa0" + b"\x00" * n
    if kind == 1:
        return b"\xa1" * n + rng.choice((b"\x80", b"\x60", b"\x00")) + b"\x00" * n
    if kind == 2:
        return b"\x81" * rng.randint(10, 3000) + b"\x00"
    if kind == 3:
        # Declared length far beyond the data.
        return bytes([rng.choice((0x5B, 0x7B, 0x9B, 0xBB))]) + rng.randbytes(8) + rng.randbytes(rng.randint(0, 8))
    if kind == 4:
        return bytes([rng.choice((0x5A, 0x7A, 0x9A, 0xBA))]) + b"\x7f\xff\xff\xff"
    if kind == 5:
        count = rng.randint(100, 5000)
        return cbor_head(4, count) + rng.choice((b"\xa0", b"\x80", b"\x00", b"\x60")) * count
    if kind == 6:
        count = rng.randint(50, 2000)
        return cbor_head(5, count) + b"".join(cbor_head(3, len(str(i))) + str(i).encode() + b"\xa0" for i in range(count))
    if kind == 7:
        return b"\x9f" * n + b"\xff" * n
    return b"\xd9\xd9\xf7" * n + b"\x00"


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A random Python value of the kinds canonical CBOR carries (for tree mutation)."""
    r = rng.random()
    if depth > 3 or r < 0.6:
        return rng.choice((
            rng.choice(INTERESTING_INTS), rng.randint(-5, 5), rng.choice(_TEXTS),
            rng.randbytes(rng.choice((0, 31, 32, 33, 64))),
            None, True, False, 1.0, float("nan"),
        ))
    if r < 0.8:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(_TEXTS): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def mutate_value(value: Any, rng: random.Random, *, keys: tuple[str, ...] = ()) -> Any:
    """A copy of ``value`` with one random change somewhere in its tree."""
    if isinstance(value, dict) and value and rng.random() < 0.85:
        out = dict(value)
        key = rng.choice(list(out))
        action = rng.randrange(6)
        if action == 0:
            del out[key]
        elif action == 1:
            out[rng.choice(keys or _TEXTS)] = random_value(rng)
        elif action == 2:
            out[key] = random_value(rng)
        else:
            out[key] = mutate_value(out[key], rng, keys=keys)
        return out
    if isinstance(value, list) and value and rng.random() < 0.85:
        out = list(value)
        i = rng.randrange(len(out))
        action = rng.randrange(6)
        if action == 0:
            del out[i]
        elif action == 1:
            out.insert(i, out[rng.randrange(len(out))])
        elif action == 2:
            rng.shuffle(out)
        elif action == 3:
            out[i] = random_value(rng)
        else:
            out[i] = mutate_value(out[i], rng, keys=keys)
        return out
    if isinstance(value, bool) or value is None:
        return random_value(rng)
    if isinstance(value, int):
        return rng.choice((value + 1, value - 1, -value, rng.choice(INTERESTING_INTS), str(value), value * 2))
    if isinstance(value, str):
        choices = [value + "x", value[:-1], value.upper(), value + "\x00", rng.choice(_TEXTS), value * 2,
                   value.encode("utf-8", "surrogatepass"), value[:1] + "\ud800" + value[1:]]
        return rng.choice(choices)
    if isinstance(value, bytes):
        if value and rng.random() < 0.5:
            b = bytearray(value)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            return bytes(b)
        return rng.choice((value[:-1], value + b"\x00", b"", value.decode("latin-1"), rng.randbytes(len(value))))
    return random_value(rng)


def mutate_bytes(data: bytes, rng: random.Random, other: bytes = b"", *, max_len: int = 1 << 16) -> bytes:
    """One to four random byte-level edits of ``data``; ``other`` feeds crossover."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        op = rng.randrange(11)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.choice(_INTERESTING_BYTES)
        elif op == 2 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 3:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 4 and buf:
            end = min(len(buf), pos + rng.randint(1, 16))
            del buf[pos:end]
        elif op == 5 and buf:
            start = rng.randrange(len(buf))
            chunk = buf[start:start + rng.randint(1, 64)]
            buf[pos:pos] = chunk * rng.randint(1, 4)
        elif op == 6:
            del buf[pos:]
        elif op == 7:
            buf[pos:pos] = cbor_item(rng, max_depth=3)
        elif op == 8 and other:
            start = rng.randrange(len(other))
            buf[pos:pos] = other[start:start + rng.randint(1, 256)]
        elif op == 9 and len(buf) >= 2:
            # Rewrite a byte as a head with a random argument size.
            i = rng.randrange(len(buf))
            buf[i] = (buf[i] & 0xE0) | rng.choice((24, 25, 26, 27, 28, 31))
        else:
            buf[pos:pos] = bytes([rng.choice(_INTERESTING_BYTES)])
    return bytes(buf[:max_len])


def json_value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON-able value (for descriptor fields)."""
    r = rng.random()
    if depth > 3 or r < 0.6:
        return rng.choice((
            rng.choice(INTERESTING_INTS), rng.choice(_TEXTS), None, True, False, 1.5, -0.0, 10 ** 30,
            "\ud800", "A" * 43, "",
        ))
    if r < 0.8:
        return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(_TEXTS): json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def json_nasty(rng: random.Random) -> bytes:
    """Hostile JSON texts: deep nesting, huge numbers, odd escapes and encodings."""
    kind = rng.randrange(7)
    if kind == 0:
        n = rng.randint(100, 30000)
        return b"[" * n + b"]" * n
    if kind == 1:
        return b'{"valid_until": 1' + b"0" * rng.randint(10, 20000) + b"}"
    if kind == 2:
        return b'"' + b"\\ud800" * rng.randint(1, 500) + b'"'
    if kind == 3:
        return json.dumps({"a": "b"}).encode("utf-16")
    if kind == 4:
        return b"\xef\xbb\xbf{}"
    if kind == 5:
        return b'{"x": NaN, "y": Infinity, "z": -Infinity}'
    return b'{"a":' * rng.randint(1, 5000) + b"1" + b"}" * rng.randint(0, 5000)
