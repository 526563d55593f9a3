"""The wire model: one canonical encoding for everything that is signed.

Everything signed is deterministic CBOR as produced by
``cbor2.dumps(canonical=True)``: minimal-length heads, definite lengths, the
shortest float that keeps the value, and map keys sorted by the length of
their encoding first, then bytewise (RFC 7049 section 3.9 "canonical CBOR";
for keys of one major type this is the same order as RFC 8949 section
4.2.1).

Decoding untrusted bytes is strict and bounded, in this order:

1. size: more than ``max_size`` bytes is refused (``too_large``) before parsing;
2. item budget: an input of more than 512 bytes may hold at most
   ``16 + size // 32`` arrays and maps (``too_large``). Each container costs
   cbor2 up to a microsecond to build and re-encode, so without this bound
   2 MB of empty maps took 1.7 s. A cheap upper bound
   (bytes that could be container heads) settles almost every input; only
   when it is inconclusive are the heads walked, skipping string contents
   (that walk also applies step 3's depth and map-key rules as it goes);
3. structure, inside cbor2's decoder: nesting depth (``max_depth``), no
   indefinite lengths, no duplicate map keys, only text or byte strings as
   map keys, and no tags at all (every semantic tag is refused, so no bignums,
   no shared references, no regexes, no dates);
4. canonical form: the decoded value must re-encode to exactly the received
   bytes (``non_canonical`` otherwise). This also refuses trailing bytes.

Step 3 runs before step 4 on purpose: cbor2's canonical encoder takes
exponential time on maps nested as map keys (41 bytes took 1.3 s, 45 bytes
5.4 s), so such input must never reach the re-encoder. Refusing non-string
map keys while decoding makes it impossible.

Step 4 is fast on the common path: while decoding, every map is checked to
be in canonical key order (and, if it is not, replaced by a canonically
ordered copy, so the comparison below fails). A plain re-encode then equals
the canonical one unless the value holds floats, which a plain encode always
writes as 8 bytes; so the canonical encoder only runs when the plain
re-encode differs, or when the bytes contain ``0xfb`` (a possible 8-byte
float) and the value does hold a float.

Nothing here raises for bad remote bytes: :func:`decode` returns a
:class:`~.codes.Refused` instead.
"""

from __future__ import annotations

import base64
from typing import Any, Mapping

import cbor2

from .codes import Code, LocalProtocolError, Refused

__all__ = ["encode", "decode", "b64e", "b64d", "MAX_DEPTH", "MAX_ENCODE_DEPTH", "CONTAINER_FLOOR",
           "BYTES_PER_CONTAINER", "PRESCAN_ABOVE"]

#: Deepest nesting any protocol object needs (event content included).
MAX_DEPTH = 16
#: Deepest nesting :func:`encode` takes: what we write may be a little deeper
#: than what we read (a recording's records wrap protocol objects).
MAX_ENCODE_DEPTH = 64
#: The item budget: an object may hold ``CONTAINER_FLOOR + size // BYTES_PER_CONTAINER``
#: arrays and maps. Protocol objects hold a handful (an event: its envelope,
#: body and content); a page or transaction two, whatever its size.
CONTAINER_FLOOR = 16
BYTES_PER_CONTAINER = 32
#: Inputs this small skip the budget: at about half a microsecond per
#: container (decode plus re-encode) they cost at most a quarter millisecond.
PRESCAN_ABOVE = 512
# Every array or map head is one of these bytes (major types 4 and 5).
_CONTAINER_HEADS = bytes(range(0x80, 0xC0))


class _RefuseEveryTag(dict[int, Any]):
    """A ``semantic_decoders`` mapping that claims every tag and refuses it.

    cbor2 looks a tag up here before using its built-in decoders, so no
    built-in semantic tag (dates, bignums, shared values, regexes, ...) is ever
    interpreted. Unknown tags reach ``tag_hook``, which refuses them too.
    """

    def __contains__(self, tag: object) -> bool:
        return True

    def __getitem__(self, tag: object) -> Any:
        return _refuse_tag

    def get(self, tag: object, default: object = None) -> Any:
        return _refuse_tag


def _refuse_tag(*_args: object) -> Any:
    raise ValueError("CBOR tags are not allowed")


_NO_TAGS = _RefuseEveryTag()

#: The cbor2 decoder options of step 2 (structure), shared by :func:`decode`
#: and the fast paths in other core modules that check key order themselves.
STRICT_OPTIONS: dict[str, Any] = dict(
    semantic_decoders=_NO_TAGS,
    tag_hook=_refuse_tag,
    allow_indefinite=False,
    allow_duplicate_keys=False,
    strict_hashable_types=True,
    str_errors="strict",
)

# Tuples of map keys already seen in canonical order (a cache: it changes
# speed, never results). Only short key tuples are kept, and only so many.
_ORDERED_KEYS: set[tuple[Any, ...]] = set()
_MAX_CACHED_KEY_TUPLES = 4096


def _key_order(key: str | bytes) -> tuple[int, bytes]:
    encoded = cbor2.dumps(key)
    return len(encoded), encoded


def _canonical_map(value: Mapping[Any, Any], _immutable: bool = False) -> Any:
    """cbor2 ``object_hook`` (cbor2 >= 6 calls it with ``(mapping, immutable)``).

    Returns ``value`` when its keys are in canonical order, else a copy in
    canonical order, which can then never re-encode to the received bytes.
    """
    if len(value) < 2:
        return value
    keys = tuple(value)
    if keys in _ORDERED_KEYS:
        return value
    ordered = sorted(keys, key=_key_order)
    if ordered == list(keys):
        if len(keys) <= 32 and len(_ORDERED_KEYS) < _MAX_CACHED_KEY_TUPLES:
            _ORDERED_KEYS.add(keys)
        return value
    return {k: value[k] for k in ordered}


def _nodes(value: Any) -> Any:
    """Every node of ``value`` (a decoded, depth-bounded tree): maps, lists and scalars."""
    stack = [value]
    while stack:
        item = stack.pop()
        yield item
        kind = type(item)
        if kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)


def _has_float(value: Any) -> bool:
    """True if a float is anywhere in ``value``."""
    return any(type(item) is float for item in _nodes(value))


#: Public names for fast paths in other core modules.
has_float = _has_float


def _prescan(data: bytes, max_depth: int) -> Refused | None:
    """Step 2, the item budget; ``None`` when ``data`` is within it (or cbor2 must judge)."""
    size = len(data)
    if size <= PRESCAN_ABOVE:
        return None
    allowed = CONTAINER_FLOOR + size // BYTES_PER_CONTAINER
    # Upper bound: every container head is a byte in 0x80-0xbf (string
    # contents may count too). Settles nearly every legitimate input at C speed.
    if size - len(data.translate(None, _CONTAINER_HEADS)) <= allowed:
        return None
    # Walk the heads of the first item, skipping string contents. The walk
    # applies step 3's depth and map-key rules too, in stream order, so a
    # malformed input gets the same verdict as from cbor2. Anything else it
    # does not follow (tags, indefinite lengths, reserved values, truncation)
    # is left to cbor2, which refuses it.
    remaining = [1]  # per open container: items still to read (the bottom: the top-level item)
    is_map = [False]
    pos = containers = 0
    while True:
        while remaining[-1] == 0:
            remaining.pop()
            is_map.pop()
            if not remaining:
                return None
        if pos >= size:
            return None
        initial = data[pos]
        pos += 1
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            arg = info
        elif info < 28:
            width = 1 << (info - 24)
            arg = int.from_bytes(data[pos:pos + width], "big")
            pos += width
        else:
            return None
        is_key = is_map[-1] and remaining[-1] % 2 == 0
        remaining[-1] -= 1
        if is_key and major != 2 and major != 3:
            return Refused(Code.MALFORMED, "not well-formed CBOR: map keys are text or byte strings")
        if major == 4 or major == 5:
            containers += 1
            if containers > allowed:
                return Refused(Code.TOO_LARGE, f"more than {allowed} arrays and maps in {size} bytes")
            if arg:
                # As in cbor2, depth is how many containers enclose an item.
                if len(remaining) > max_depth:
                    return Refused(Code.MALFORMED, f"not well-formed CBOR: nesting deeper than {max_depth}")
                remaining.append(arg if major == 4 else 2 * arg)
                is_map.append(major == 5)
        elif major == 2 or major == 3:
            pos += arg
        elif major == 6:
            return None


def maps_in_order(value: Any) -> bool:
    """True when every map in ``value`` (depth-bounded) has its keys in canonical order."""
    return all(type(item) is not dict or len(item) < 2 or _canonical_map(item) is item
               for item in _nodes(value))


def prescan(data: bytes, max_depth: int) -> Refused | None:
    """The item budget of :func:`decode` (step 2) on its own, for fast paths."""
    return _prescan(data, max_depth)


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """True if arrays and maps in ``value`` nest more than ``limit`` deep (no recursion)."""
    if not isinstance(value, (dict, list, tuple)):
        return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, (dict, list, tuple)):
                stack.append((child, depth + 1))
    return False


_NOT_PLAIN = object()
_SCALARS = frozenset({str, bytes, int, bool, type(None)})


def _in_canonical_order(value: Any, depth: int) -> Any:
    """``value`` with every map's keys in canonical order (RFC 8949 4.2.1:
    by encoded key, shorter first, as cbor2's canonical mode sorts them), so
    that cbor2's plain encoder writes the canonical bytes at a fifth of the
    canonical encoder's cost. :data:`_NOT_PLAIN` when ``value`` holds anything
    but text-keyed maps, lists, tuples, text, bytes, ints, bools and None, or
    nests past :data:`MAX_ENCODE_DEPTH`: those take the canonical encoder,
    whose verdicts stand (floats, whose canonical form is their shortest)."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if depth > MAX_ENCODE_DEPTH:
        return _NOT_PLAIN
    if kind is dict:
        items = []
        for key, item in value.items():
            if type(key) is not str:
                return _NOT_PLAIN
            item = _in_canonical_order(item, depth + 1)
            if item is _NOT_PLAIN:
                return _NOT_PLAIN
            raw = key.encode("utf-8", "surrogatepass")
            items.append((len(raw), raw, key, item))
        items.sort(key=lambda entry: (entry[0], entry[1]))
        return {key: item for _, _, key, item in items}
    if kind is list or kind is tuple:
        out = []
        for item in value:
            item = _in_canonical_order(item, depth + 1)
            if item is _NOT_PLAIN:
                return _NOT_PLAIN
            out.append(item)
        return out
    return _NOT_PLAIN


def encode(value: Any) -> bytes:
    """Encode ``value`` as canonical CBOR.

    Takes dicts with text keys, lists, text, bytes, ints, bools and None,
    nested at most :data:`MAX_ENCODE_DEPTH` deep. Raises
    :class:`LocalProtocolError` for anything else (a caller bug). The depth
    bound is not only tidiness: cbor2's C encoder overflows the C stack on
    values nested some ten thousand deep and kills the process.

    The common case (no floats) is put in canonical key order and written by
    cbor2's plain encoder; a property test holds it to the canonical
    encoder's bytes.
    """
    ordered = _in_canonical_order(value, 1)
    if ordered is not _NOT_PLAIN:
        try:
            return cbor2.dumps(ordered)
        except (cbor2.CBOREncodeError, TypeError, ValueError):
            pass  # the canonical encoder below gives the verdict
    if _nested_deeper_than(value, MAX_ENCODE_DEPTH):
        raise LocalProtocolError(f"cannot encode a value nested more than {MAX_ENCODE_DEPTH} deep")
    try:
        return cbor2.dumps(value, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise LocalProtocolError(f"cannot encode {type(value).__name__}: {exc}") from exc


def decode(data: bytes, *, max_size: int, max_depth: int = MAX_DEPTH) -> Any | Refused:
    """Strictly decode one canonical CBOR item from untrusted ``data``.

    Returns the decoded value, or :class:`Refused` with ``too_large``,
    ``malformed`` or ``non_canonical``. Never raises for bad input.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise LocalProtocolError("decode() takes bytes")
    if len(data) > max_size:
        return Refused(Code.TOO_LARGE, f"{len(data)} bytes, limit {max_size}")
    data = bytes(data)
    refused = _prescan(data, max_depth)
    if refused is not None:
        return refused
    try:
        value = cbor2.loads(data, object_hook=_canonical_map, max_depth=max_depth, **STRICT_OPTIONS)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError, OverflowError, MemoryError) as exc:
        return Refused(Code.MALFORMED, f"not well-formed CBOR: {_short(exc)}")
    try:
        # Maps are already in canonical order (see _canonical_map): a plain
        # encode is canonical unless floats are involved (see module doc).
        again = cbor2.dumps(value)
        if again != data or (b"\xfb" in data and _has_float(value)):
            again = cbor2.dumps(value, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError, RecursionError) as exc:
        return Refused(Code.MALFORMED, f"value cannot be re-encoded: {_short(exc)}")
    if again != data:
        return Refused(Code.NON_CANONICAL, "bytes are not the canonical encoding of their value")
    return value


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:160]


def b64e(raw: bytes) -> str:
    """Unpadded URL-safe base64, the text form of keys, signatures and ids."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes | None:
    """Inverse of :func:`b64e`; ``None`` if ``text`` is not canonical unpadded base64url."""
    if not isinstance(text, str) or len(text) > 1 << 16:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        return None
    # Canonical only: one text form per byte string.
    if b64e(raw) != text:
        return None
    return raw
