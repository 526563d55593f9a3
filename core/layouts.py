"""Fast readers for the byte layouts of the hot objects: envelopes, transactions, pages.

Everything received is canonical CBOR, and canonical CBOR leaves no freedom:
map keys come in one order, every head has one length. So the objects that
arrive by the thousand have one fixed byte layout each, which can be read
with slicing and comparisons instead of a general decoder, a re-encode to
prove the bytes canonical and a walk over the fields.

Each reader here returns ``None`` for anything but its layout, and the
caller then runs its generic strict decoder, which gives every verdict. So
these readers are only ever shortcuts to *accepting*: whatever one accepts,
the generic decoder accepts as the same value (property tests and the fuzz
harnesses check it), and none ever refuses anything on its own.

The envelope of an ordinary event (see :mod:`.events`)::

    83                                  envelope: array of 3
      58 nn | 59 nnnn                   body: byte string, minimal length head
        aa | ab                         map of 10 (11 with "source")
          61 "v"        01
          62 "ts"       1b <8 bytes>    ms since the epoch (>= 2**32, < 2**63)
          64 "prev"     58 20 <32> | f6
          64 "type"     <text>
          65 "depth"    <uint>          < 2**63
          66 "origin"   <text>
          66 "sender"   <text>
         [66 "source"   <bytes>]        chained events only
          67 "content"  a0..b7          0 to 23 text keys (canonical order) -> text
          67 "room_id"  <text>
          69 "room_type" <text>
      61..77 | 78 nn                    key id: 1 to 64 bytes of text
      58 40 <64 bytes>                  signature

:func:`read_event` reads it for about half of what decoding the body with
cbor2, re-encoding it and checking every field costs. Three runs of bytes
repeat from event to event (origin and sender, room id and type, key id):
each distinct run is read once and remembered (bounded caches of pure
functions of their bytes: they change speed, never results).

What "exactly that layout" includes, each an acceptance rule of the generic
decoder: minimal heads (a shorter head for the same length or value is
refused here and left to the generic path), valid UTF-8 in every text,
content keys in strictly increasing canonical order (so no duplicates),
``prev`` present exactly when ``depth >= 2``, ``source`` only when
``depth >= 1``, and the origin rule (the room's host signs chained events,
the sender's server signs proposals). Content with values that are not text
(numbers, lists, nested maps) and timestamps below ``2**32`` take the
generic path; they are valid, just not common.

A transaction body, ``{"events": [envelope, ...]}`` (see :mod:`.rooms`), and a
backfill page (see :mod:`.backfill`)::

    a1 66 "events" <array of byte strings>
    a4 64 "next" <uint>|f6  66 "before" <uint>|f6  66 "events" <array of byte strings>  67 "room_id" <text>

:func:`read_events_body` and :func:`read_page` read those, for about a fifth of
the generic decoder's cost (which decodes and re-encodes every envelope's
bytes once more).

The reply to a transaction whose every event was accepted as is, the usual
reply a replay reads back from a recording::

    a2 66 "events" 80  67 "results" <array of: a2 62 "ok" f5 68 "event_id" <text>>

:func:`read_accepting_reply` reads it for about a third of the generic cost.
"""

from __future__ import annotations

from hashlib import sha256
from typing import Any, TypeVar

from .names import server_of

__all__ = ["read_event", "read_events_body", "read_page", "read_accepting_reply"]

_MAX_INT = 1 << 63
_TS_MIN = 1 << 32
# Minimal-head floors: a value or length below these must use a shorter head.
_UINT_FLOOR = {0x18: 24, 0x19: 1 << 8, 0x1A: 1 << 16, 0x1B: 1 << 32}


class _NotThisLayout(Exception):
    """Internal: the input is not the one layout read here."""


def _string(data: bytes, pos: int, major: int) -> tuple[bytes, int]:
    """The byte or text string (``major`` 0x40 or 0x60) at ``pos``, and where it ends."""
    head = data[pos] - major
    if 0 <= head < 24:
        end = pos + 1 + head
        return data[pos + 1:end], end
    if head == 24:
        size = data[pos + 1]
        if size >= 24:
            end = pos + 2 + size
            return data[pos + 2:end], end
    elif head == 25:
        size = (data[pos + 1] << 8) | data[pos + 2]
        if size >= 256:
            end = pos + 3 + size
            return data[pos + 3:end], end
    raise _NotThisLayout


def _text(data: bytes, pos: int) -> tuple[str, int]:
    """The text at ``pos`` (valid UTF-8), and where it ends."""
    head = data[pos]
    if 0x60 <= head <= 0x77:  # short: the usual case, inline
        end = pos + head - 0x5F
        return data[pos + 1:end].decode(), end
    raw, end = _string(data, pos, 0x60)
    return raw.decode(), end


def _keyed_text(data: bytes, pos: int, key: bytes) -> tuple[str, int]:
    """The text that follows the encoded map key ``key`` at ``pos``, and where it ends."""
    if not data.startswith(key, pos):
        raise _NotThisLayout
    pos += len(key)
    head = data[pos]
    if 0x60 <= head <= 0x77:
        end = pos + head - 0x5F
        return data[pos + 1:end].decode(), end
    raw, end = _string(data, pos, 0x60)
    return raw.decode(), end


def _uint(data: bytes, pos: int) -> tuple[int, int]:
    head = data[pos]
    if head < 24:
        return head, pos + 1
    floor = _UINT_FLOOR.get(head)
    if floor is not None:
        width = 1 << (head - 0x18)
        value = int.from_bytes(data[pos + 1:pos + 1 + width], "big")
        if floor <= value < _MAX_INT:
            return value, pos + 1 + width
    raise _NotThisLayout


def read_event(env: bytes) -> tuple[Any, ...] | None:
    """The fields of an :class:`~.events.Event` read from envelope ``env``, or ``None``.

    ``None`` means only "not the common layout": the caller decodes the
    envelope generically. The tuple is in :class:`~.events.Event` field order.
    """
    try:
        return _read_event(env)
    except (_NotThisLayout, IndexError, UnicodeDecodeError):
        return None


def _read_event(env: bytes) -> tuple[Any, ...] | None:
    # Reads never check for running past the end: every position is computed
    # from heads and only grows, and the last check (the signature ends the
    # envelope exactly) fails if any string was cut short. Slices past the end
    # are merely short, and an index past it raises IndexError (not this layout).
    head = env[1]
    if env[0] != 0x83:
        return None
    if head == 0x59:
        size, start = (env[2] << 8) | env[3], 4
        if size < 256:
            return None
    elif head == 0x58:
        size, start = env[2], 3
        if size < 24:
            return None
    else:
        return None
    end = start + size
    head = env[start]
    if (head != 0xAA and head != 0xAB) or not env.startswith(b"\x61v\x01\x62ts\x1b", start + 1):
        return None
    ts = int.from_bytes(env[start + 8:start + 16], "big")
    if not _TS_MIN <= ts < _MAX_INT or not env.startswith(b"\x64prev", start + 16):
        return None
    if env[start + 21] == 0xF6:
        prev, pos = None, start + 22
    elif env.startswith(b"\x58\x20", start + 21):
        prev, pos = env[start + 23:start + 55], start + 55
    else:
        return None
    etype, pos = _keyed_text(env, pos, b"\x64type")
    if not env.startswith(b"\x65depth", pos):
        return None
    depth, pos = _uint(env, pos + 6)
    if (depth >= 2) is (prev is None):
        return None
    # Origin and sender repeat too (a room's host, its few writers). Where the
    # run would end if both texts are short; a wrong guess only misses.
    guess = pos + 7 + env[pos + 7] - 0x5F
    guess += 7 + env[guess + 7] - 0x5F
    parties = _PARTIES.get(env[pos:guess])
    if parties is None:
        start_of_run = pos
        origin, pos = _keyed_text(env, pos, b"\x66origin")
        sender, pos = _keyed_text(env, pos, b"\x66sender")
        parties = _remember(_PARTIES, env[start_of_run:pos], (origin, sender, server_of(sender)))
    else:
        pos = guess
    origin, sender, sender_server = parties
    source = None
    if head == 0xAB:
        if depth == 0 or not env.startswith(b"\x66source", pos):
            return None
        source, pos = _string(env, pos + 7, 0x40)
    if not env.startswith(b"\x67content", pos):
        return None
    count = env[pos + 8] - 0xA0
    if not 0 <= count < 24:
        return None
    pos += 9
    if count == 1:  # one key, no order to check; most often a message's {"body": text}
        if env.startswith(b"\x64body", pos):
            body_text, pos = _text(env, pos + 5)
            content = {"body": body_text}
        else:
            key, pos = _text(env, pos)
            value, pos = _text(env, pos)
            content = {key: value}
        count = 0
    else:
        content = {}
    last = b""
    for _ in range(count):
        key_start = pos
        key, pos = _text(env, pos)
        encoded_key = env[key_start:pos]
        # Canonical order: shorter encoded key first, then bytewise; strictly
        # increasing, so no key twice.
        if len(encoded_key) < len(last) or (len(encoded_key) == len(last) and encoded_key <= last):
            return None
        last = encoded_key
        content[key], pos = _text(env, pos)
    # The body's tail (room id and type) and the envelope's key id repeat
    # from event to event: read each distinct one once.
    tail = env[pos:end]
    room = _ROOM_TAILS.get(tail)
    if room is None:
        room_id, pos = _keyed_text(env, pos, b"\x67room_id")
        room_type, pos = _keyed_text(env, pos, b"\x69room_type")
        if pos != end:
            return None
        room = _remember(_ROOM_TAILS, tail, (room_id, room_type, server_of(room_id)))
    room_id, room_type, host = room
    size = len(env)
    # After the body: a key id (at least 2 bytes), then 58 40 and 64 bytes of signature.
    if size - 66 < end + 2 or env[size - 66] != 0x58 or env[size - 65] != 0x40:
        return None
    encoded_key_id = env[end:size - 66]
    key_id = _KEY_IDS.get(encoded_key_id)
    if key_id is None:
        raw_key_id, pos = _string(env, end, 0x60)
        if pos != size - 66 or not 0 < len(raw_key_id) <= 64:
            return None
        key_id = _remember(_KEY_IDS, encoded_key_id, raw_key_id.decode())
    # The origin rule: the host signs chained events, the sender's server a proposal.
    if host is None or sender_server is None or origin != (host if depth else sender_server):
        return None
    body = env[start:end]
    return (sha256(body).digest(), env, body, key_id, env[size - 64:], room_id, room_type, depth, prev, origin, sender,
            etype, ts, content, source)


# Caches of the repeating byte runs (see above). They change speed, never
# results: each value is a pure function of its key. Bounded by emptying.
_PARTIES: dict[bytes, tuple[str, str, str | None]] = {}
_ROOM_TAILS: dict[bytes, tuple[str, str, str | None]] = {}
_KEY_IDS: dict[bytes, str] = {}
_CACHE_ENTRIES = 1024


T = TypeVar("T")


def _remember(cache: dict[bytes, T], key: bytes, value: T) -> T:
    if len(cache) >= _CACHE_ENTRIES:
        cache.clear()
    cache[key] = value
    return value


def _array_head(data: bytes, pos: int) -> tuple[int, int]:
    """The length (1 to 65535) of the array at ``pos``, and where its items start."""
    head = data[pos]
    if 0x81 <= head <= 0x97:
        return head - 0x80, pos + 1
    if head == 0x98 and data[pos + 1] >= 24:
        return data[pos + 1], pos + 2
    if head == 0x99 and (data[pos + 1] << 8) | data[pos + 2] >= 256:
        return (data[pos + 1] << 8) | data[pos + 2], pos + 3
    raise _NotThisLayout


def _envelope_list(data: bytes, pos: int, most: int) -> tuple[list[bytes], int]:
    """The array of 1 to ``most`` (< 65536) byte strings at ``pos``, and where it ends."""
    count, pos = _array_head(data, pos)
    if count > most:
        raise _NotThisLayout
    items = []
    for _ in range(count):
        item, pos = _string(data, pos, 0x40)
        items.append(item)
    return items, pos


def read_events_body(body: bytes, most: int) -> list[bytes] | None:
    """The envelopes of ``{"events": [...]}`` (1 to ``most``), or ``None``: not this layout."""
    try:
        if not body.startswith(b"\xa1\x66events"):
            return None
        envelopes, end = _envelope_list(body, 8, most)
    except (_NotThisLayout, IndexError):
        return None
    return envelopes if end == len(body) else None


def _cursor(data: bytes, pos: int) -> tuple[int | None, int]:
    if data[pos] == 0xF6:
        return None, pos + 1
    value, pos = _uint(data, pos)
    if value == 0:
        raise _NotThisLayout
    return value, pos


def read_page(body: bytes, most: int) -> tuple[str, int | None, list[bytes], int | None] | None:
    """``(room_id, before, envelopes, next)`` of a backfill page, or ``None``: not this layout.

    A page of no events (``80``) is left to the generic decoder.
    """
    try:
        if not body.startswith(b"\xa4\x64next"):
            return None
        next_cursor, pos = _cursor(body, 6)
        if not body.startswith(b"\x66before", pos):
            return None
        before, pos = _cursor(body, pos + 7)
        if not body.startswith(b"\x66events", pos):
            return None
        envelopes, pos = _envelope_list(body, pos + 7, most)
        room_id, pos = _keyed_text(body, pos, b"\x67room_id")
    except (_NotThisLayout, IndexError, UnicodeDecodeError):
        return None
    return (room_id, before, envelopes, next_cursor) if pos == len(body) else None


def read_accepting_reply(body: bytes) -> int | None:
    """How many events a reply that accepted every one of them (and created
    none) answers for, or ``None``: not this layout.
    """
    try:
        if not body.startswith(b"\xa2\x66events\x80\x67results"):
            return None
        count, pos = _array_head(body, 17)
        for _ in range(count):
            # Each result: {"ok": true, "event_id": text}; the text is read (so
            # checked as UTF-8), its value is not needed.
            _event_id, pos = _keyed_text(body, pos, b"\xa2\x62ok\xf5\x68event_id")
    except (_NotThisLayout, IndexError, UnicodeDecodeError):
        return None
    return count if pos == len(body) else None
