"""The wire model: one canonical encoding for everything that is signed.

Everything signed is deterministic CBOR (RFC 8949 section 4.2.1 core
deterministic encoding, as produced by ``cbor2.dumps(canonical=True)``).

Decoding untrusted bytes is strict and bounded, in this order:

1. size: more than ``max_size`` bytes is refused (``too_large``) before parsing;
2. structure, inside cbor2's C decoder: nesting depth (``max_depth``), no
   indefinite lengths, no duplicate map keys, only text or byte strings as
   map keys, and no tags at all (every semantic tag is refused, so no bignums,
   no shared references, no regexes, no dates);
3. canonical form: the decoded value must re-encode to exactly the received
   bytes (``non_canonical`` otherwise). This also refuses trailing bytes.

Step 2 runs before step 3 on purpose: cbor2's canonical encoder takes
exponential time on maps nested as map keys (41 bytes took 1.3 s, 45 bytes
5.4 s), so such input must never reach the re-encoder. Refusing non-string
map keys while decoding makes it impossible.

Nothing here raises for bad remote bytes: :func:`decode` returns a
:class:`~.codes.Refused` instead.
"""

from __future__ import annotations

import base64
from typing import Any

import cbor2

from .codes import Code, LocalProtocolError, Refused

__all__ = ["encode", "decode", "b64e", "b64d", "MAX_DEPTH"]

#: Deepest nesting any protocol object needs (event content included).
MAX_DEPTH = 16


class _RefuseEveryTag(dict):
    """A ``semantic_decoders`` mapping that claims every tag and refuses it.

    cbor2 looks a tag up here before using its built-in decoders, so no
    built-in semantic tag (dates, bignums, shared values, regexes, ...) is ever
    interpreted. Unknown tags reach ``tag_hook``, which refuses them too.
    """

    def __contains__(self, tag: object) -> bool:
        return True

    def __getitem__(self, tag: object):
        return _refuse_tag

    def get(self, tag: object, default: object = None):
        return _refuse_tag


def _refuse_tag(*_args: object) -> Any:
    raise ValueError("CBOR tags are not allowed")


_NO_TAGS = _RefuseEveryTag()


def encode(value: Any) -> bytes:
    """Encode ``value`` as canonical CBOR.

    Takes dicts with text keys, lists, text, bytes, ints, bools and None.
    Raises :class:`LocalProtocolError` for anything else (a caller bug).
    """
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
    try:
        value = cbor2.loads(
            data,
            semantic_decoders=_NO_TAGS,
            tag_hook=_refuse_tag,
            max_depth=max_depth,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
            str_errors="strict",
        )
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError, OverflowError, MemoryError) as exc:
        return Refused(Code.MALFORMED, f"not well-formed CBOR: {_short(exc)}")
    try:
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
