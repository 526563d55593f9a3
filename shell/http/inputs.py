"""Typed input for the client and admin APIs: JSON bodies, query strings and
path parameters, each checked against a small schema before any handler runs.

A schema is built from a few field types (:class:`Str`, :class:`Int`,
:class:`Bool`, :class:`Enum`, :class:`Array`) gathered in an :class:`Obj`.
Every field type does two things from one definition:

- ``parse(value, where)`` returns the typed value or raises :class:`BadInput`
  naming the field (``allowed_peers[2]: not a server name``);
- ``schema()`` returns its JSON Schema, which the OpenAPI document
  (:mod:`.openapi`) publishes, so what is documented is what is enforced.

The rules are strict on purpose (every byte from a user or an admin is
hostile): no type coercion (``"disabled"`` is not a boolean, ``true`` is not a
number, ``1.0`` is not an integer), no unknown fields, no repeated keys, no
``NaN``, numbers in range, strings of bounded length. Names are checked by the
core's own name functions (:mod:`scaiwave_federation.core.names`), never by a
second set of rules here.
"""

from __future__ import annotations

import json
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from scaiwave_federation.core import Code, Refused
from scaiwave_federation.core import canonical_room_id, canonical_server_name, canonical_user_id, server_name_problem

__all__ = [
    "BadInput", "Field", "Str", "Int", "Bool", "Enum", "Array", "Obj", "parse_json_body", "parse_query",
    "SERVER_NAME", "ROOM_ID", "USER_ID", "PARTICIPANT", "TENANT_NAME",
]


class BadInput(Exception):
    """Input that does not fit its schema: ``400 bad_request`` whose message names the field."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.refusal = Refused(Code.BAD_REQUEST, str(self))


class Field(ABC):
    """One typed value. ``text=True`` parses from a path segment or query value."""

    description: str = ""

    @abstractmethod
    def parse(self, value: Any, where: str) -> Any:
        """The checked value, or :class:`BadInput` naming ``where``."""

    def parse_text(self, value: str, where: str) -> Any:
        return self.parse(value, where)

    @abstractmethod
    def schema(self) -> dict[str, Any]:
        """The value's JSON schema (for the OpenAPI document)."""

    def _doc(self, schema: dict[str, Any]) -> dict[str, Any]:
        if self.description:
            schema["description"] = self.description
        return schema


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


_KINDS = {"Cc": "a control character", "Cf": "an invisible format character", "Cs": "a lone surrogate",
          "Co": "a private-use character", "Cn": "an unassigned code point"}
_NOT_IN_TEXT = frozenset({"Cc", "Cs"})


def _bad_character(value: str, text: bool) -> str | None:
    banned = _NOT_IN_TEXT if text else _KINDS
    for c in value:
        kind = unicodedata.category(c)
        if kind in banned and not (text and c in "\t\n\r"):
            return f"must not contain U+{ord(c):04X} ({_KINDS[kind]})"
    return None


@dataclass(frozen=True)
class Str(Field):
    """A string of ``min_len``..``max_len`` characters. A name may not hold
    controls, invisible format characters (the right-to-left override, zero-width
    joiners: one name made to look like another), lone surrogates, private-use
    or unassigned code points; free text (``text=True``) may not hold controls
    other than tab, newline and carriage return, nor lone surrogates (which JSON
    can spell as ``"\\ud800"`` but UTF-8 cannot store or answer).

    ``check`` (e.g. a core name function) returns an error message or None;
    ``pattern`` and ``example`` only document the shape in the OpenAPI document.
    """

    min_len: int = 1
    max_len: int = 255
    check: Callable[[str], str | None] | None = None
    pattern: str | None = None
    example: str | None = None
    description: str = ""
    text: bool = False
    #: Turns an accepted value into its one spelling (the core's lenient name
    #: parsers: ``@Bob:Peer.Test:443`` becomes ``@bob:peer.test``).
    canonical: Callable[[str], str | None] | None = None

    def parse(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise BadInput(where, f"must be a string, not {_kind(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise BadInput(where, f"must be {self.min_len} to {self.max_len} characters long, not {len(value)}")
        if (problem := _bad_character(value, self.text)) is not None:
            raise BadInput(where, problem)
        if self.check is not None and (problem := self.check(value)) is not None:
            raise BadInput(where, problem)
        if self.canonical is not None:
            canonical = self.canonical(value)
            if canonical is None:  # a check that admits what the canonical form refuses: never silent
                raise BadInput(where, "has no canonical spelling")
            return canonical
        return value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "string", "minLength": self.min_len, "maxLength": self.max_len}
        if self.pattern or not self.text:
            out["pattern"] = self.pattern or r"^[^\u0000-\u001f\u007f-\u009f]*$"
        if self.example:
            out["examples"] = [self.example]
        return self._doc(out)


@dataclass(frozen=True)
class Int(Field):
    """An integer in ``minimum``..``maximum`` (JSON ``true`` and ``1.0`` are not integers)."""

    minimum: int = 0
    maximum: int = 2**53 - 1
    description: str = ""

    def parse(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadInput(where, f"must be an integer, not {_kind(value)}")
        if not self.minimum <= value <= self.maximum:
            shown = str(value) if len(str(value)) <= 20 else f"a {len(str(value))}-digit number"
            raise BadInput(where, f"must be {self.minimum} to {self.maximum}, not {shown}")
        return value

    def parse_text(self, value: str, where: str) -> int:
        # Decimal digits only (no sign, space, "_" or non-ASCII digits), and
        # never more than the largest allowed value has: a 5,000-digit id is
        # refused before int() sees it.
        if not value.isascii() or not value.isdigit() or len(value) > len(str(self.maximum)):
            raise BadInput(where, f"must be an integer from {self.minimum} to {self.maximum}")
        return self.parse(int(value), where)

    def schema(self) -> dict[str, Any]:
        return self._doc({"type": "integer", "minimum": self.minimum, "maximum": self.maximum})


@dataclass(frozen=True)
class Bool(Field):
    """JSON ``true`` or ``false``; nothing else (not ``"disabled"``, not ``0``)."""

    description: str = ""

    def parse(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise BadInput(where, f"must be true or false, not {_kind(value)}")
        return value

    def parse_text(self, value: str, where: str) -> bool:
        # In a query string: exactly "true" or "false".
        if value not in ("true", "false"):
            raise BadInput(where, "must be true or false")
        return value == "true"

    def schema(self) -> dict[str, Any]:
        return self._doc({"type": "boolean"})


@dataclass(frozen=True)
class Enum(Field):
    """One of a fixed set of strings."""

    values: tuple[str, ...] = ()
    description: str = ""

    def parse(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or value not in self.values:
            raise BadInput(where, f"must be one of {', '.join(self.values)}")
        return value

    def schema(self) -> dict[str, Any]:
        return self._doc({"type": "string", "enum": list(self.values)})


@dataclass(frozen=True)
class Array(Field):
    """A list of at most ``max_items`` values of one field type."""

    item: Field = field(default_factory=Str)
    max_items: int = 10_000
    description: str = ""

    def parse(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise BadInput(where, f"must be a list, not {_kind(value)}")
        if len(value) > self.max_items:
            raise BadInput(where, f"must have at most {self.max_items} entries, not {len(value)}")
        return [self.item.parse(v, f"{where}[{i}]") for i, v in enumerate(value)]

    def schema(self) -> dict[str, Any]:
        return self._doc({"type": "array", "items": self.item.schema(), "maxItems": self.max_items})


@dataclass(frozen=True)
class Obj:
    """A JSON object with these fields, ``required`` ones among them; no others."""

    fields: Mapping[str, Field] = field(default_factory=dict)
    required: AbstractSet[str] = frozenset()  # kept as a frozenset

    def __post_init__(self) -> None:
        object.__setattr__(self, "required", frozenset(self.required))
        assert self.required <= set(self.fields), self.required - set(self.fields)

    def parse(self, value: Any, where: str = "body") -> dict[str, Any]:
        """The parsed fields that were given (absent optional fields are absent)."""
        if not isinstance(value, dict):
            raise BadInput(where, f"must be a JSON object, not {_kind(value)}")
        unknown = sorted(set(value) - set(self.fields))
        if unknown:
            names = ", ".join(repr(u[:40]) for u in unknown[:5])
            raise BadInput(where, f"unknown field{'s' if len(unknown) > 1 else ''} {names}"
                           f" (allowed: {', '.join(self.fields) or 'none'})")
        missing = sorted(self.required - set(value))
        if missing:
            raise BadInput(where, f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
        return {name: self.fields[name].parse(v, name) for name, v in value.items()}

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "object", "additionalProperties": False,
                               "properties": {k: f.schema() for k, f in self.fields.items()}}
        if self.required:
            out["required"] = sorted(self.required)
        return out


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadInput("body", f"field {key[:40]!r} given twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise BadInput("body", f"{name} is not JSON")


def parse_json_body(raw: bytes, schema: Obj | None) -> dict[str, Any]:
    """Decode and check a request body.

    ``schema=None`` is an endpoint without a body: an empty body or ``{}``.
    An empty body counts as ``{}`` (so fields that are all optional may be left
    out with the body), and a required field is then named as missing.
    """
    if raw.strip():
        try:
            value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except BadInput:
            raise
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise BadInput("body", f"is not JSON ({str(exc)[:80]})") from None
    else:
        value = {}
    return (schema or Obj()).parse(value)


def parse_query(pairs: list[tuple[str, str]], schema: Obj | None) -> dict[str, Any]:
    """Check query parameters (already percent-decoded): known names, each at most once."""
    fields = schema.fields if schema else {}
    seen: dict[str, Any] = {}
    for name, value in pairs:
        if name not in fields:
            raise BadInput("query", f"unknown parameter {name[:40]!r} (allowed: {', '.join(fields) or 'none'})")
        if name in seen:
            raise BadInput(name, "given twice")
        seen[name] = fields[name].parse_text(value, name)
    missing = sorted((schema.required if schema else frozenset()) - set(seen))
    if missing:
        raise BadInput("query", f"{', '.join(missing)} is required")
    return seen


# -- the APIs' named values, checked by the core's name functions ---------------------------


def _server_problem(value: str) -> str | None:
    if canonical_server_name(value) is not None:
        return None
    return f"not a server name (host or host:port): {server_name_problem(value)}"


def _id_problem(sigil: str, what: str, example: str) -> Callable[[str], str | None]:
    canonical = canonical_user_id if sigil == "@" else canonical_room_id

    def check(value: str) -> str | None:
        if canonical(value) is not None:
            return None
        return f"not a {what} like {example}"

    return check


def _participant(value: str) -> str | None:
    return canonical_user_id(value) or canonical_server_name(value)


def _participant_problem(value: str) -> str | None:
    if _participant(value) is not None:
        return None
    return "not a user id like @bob:peer.test, nor a server name"


# Names are read in any spelling (case, a trailing dot, ":443") and handed on
# in their one canonical spelling (core.names); IP literals are refused.
_SERVER_PATTERN = r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$"
SERVER_NAME = Str(check=_server_problem, pattern=_SERVER_PATTERN, example="peer.test:8449",
                  canonical=canonical_server_name,
                  description="A server name: host, or host:port when the port is not 443 (any case; kept "
                              "lower case, without :443).")
ROOM_ID = Str(max_len=385, check=_id_problem("!", "room id", "!abc:peer.test"), pattern=r"^![^:]+:.+$",
              canonical=canonical_room_id,
              example="!3f9a:peer.test", description="A room id: !local:server_name (the room's host).")
USER_ID = Str(max_len=385, check=_id_problem("@", "user id", "@bob:peer.test"), pattern=r"^@[^:]+:.+$",
              canonical=canonical_user_id,
              example="@bob:peer.test", description="A user id: @name:server_name.")
PARTICIPANT = Str(max_len=385, check=_participant_problem, pattern=r"^(@[^:]+:.+|[A-Za-z0-9.:-]+)$",
                  canonical=_participant,
                  example="@bob:peer.test", description="A user id (@name:server) or a server name.")
TENANT_NAME = Str(max_len=128, example="acme",
                  description="A tenant's name: 1 to 128 characters, no control or invisible format characters.")
