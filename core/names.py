"""Names: server names (``host`` or ``host:port``), user ids and room ids, in
one canonical spelling.

Every name has exactly one spelling, and every comparison in the project is
on that spelling (a blocked server may not get in by writing its name in
capitals). The canonical form of a server name is:

1. ASCII only, lower case. Internationalised names are written as their
   IDNA A-labels (``xn--bcher-kva.example``); a U-label (``bücher.example``)
   is refused with the A-label it should have been (we do not convert:
   conversions differ between IDNA 2003 and 2008, and a name that can be
   written two ways is what this module exists to prevent).
2. No trailing dot (``peer.test.`` is ``peer.test``).
3. No default port: 443 is implied, so ``peer.test:443`` is ``peer.test``.
   Other ports are written in decimal without leading zeros, 1 to 65535.
4. Labels of letters, digits and hyphens (1 to 63, not starting or ending
   with a hyphen); at most 253 characters of host.
5. No IP literals: ``[::1]``, ``10.0.0.1`` and anything whose last label is
   all digits are refused. Server names are identities checked against TLS
   certificates and policy lists; for a server on a fixed address use a name
   and ``SCAIWAVE_RESOLVE``.

Two entry points, one parser:

- *lenient* (:func:`canonical_server_name`, :func:`canonical_user_id`,
  :func:`canonical_room_id`): for what admins and users type. Returns the
  canonical form of any acceptable spelling, or ``None``;
  :func:`server_name_problem` says why not.
- *strict* (:func:`valid_server_name`, :func:`server_of`): for what arrives
  signed over federation. Only the canonical spelling is accepted: a signed
  object whose names are spelled otherwise is malformed, never rewritten.

User ids are ``@local:server`` and room ids ``!local:server``; the server
part of a room id is the room's host. Local parts are lower case too: users
``[a-z0-9._=/-]`` (1 to 64), rooms ``[a-z0-9._=-]`` (1 to 128).
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = [
    "valid_server_name",
    "canonical_server_name",
    "server_name_problem",
    "server_of",
    "split_server_name",
    "local_of",
    "user_id",
    "canonical_user_id",
    "canonical_room_id",
    "is_user_id",
    "is_room_id",
]

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_USER_LOCAL = re.compile(r"[a-z0-9._=\-/]{1,64}")
_ROOM_LOCAL = re.compile(r"[a-z0-9._=\-]{1,128}")
_MAX_HOST = 253
_MAX_NAME = 255
# Longest possible id: sigil, 128-char local part, colon, 255-char server name.
_MAX_ID = 1 + 128 + 1 + _MAX_NAME


def server_name_problem(text: object) -> str | None:
    """Why ``text`` cannot be read as a server name (any spelling), or ``None``."""
    return _parse(text)[1]


def canonical_server_name(text: object) -> str | None:
    """The canonical spelling of ``text`` (lenient: case, trailing dot, ``:443``,
    surrounding blanks), or ``None`` when it is no server name at all."""
    if type(text) is str and len(text) <= _MAX_NAME + 1:
        return _canonical_lenient(text)  # a post reads its room's server name several times
    return _parse(text)[0]


@lru_cache(maxsize=4096)
def _canonical_lenient(text: str) -> str | None:
    return _parse(text)[0]


def valid_server_name(name: object) -> bool:
    """True only for a server name in its canonical spelling (strict)."""
    return isinstance(name, str) and _canonical_cached(name) == name


@lru_cache(maxsize=4096)
def _canonical_cached(name: str) -> str | None:
    # Cached: a batch of events and a policy check repeat the same few names.
    return _parse(name)[0] if len(name) <= _MAX_NAME else None


def _parse(text: object) -> tuple[str | None, str | None]:
    if not isinstance(text, str):
        return None, "a server name is a string"
    text = text.strip()
    if not text:
        return None, "a server name cannot be empty"
    if len(text) > _MAX_NAME + 1:
        return None, f"a server name has at most {_MAX_NAME} characters"
    if not text.isascii():
        try:
            hint = f" (write its A-label form, {text.encode('idna').decode('ascii').lower()!r})"
        except UnicodeError:
            hint = ""
        return None, f"server names are ASCII{hint}"
    text = text.lower()
    if text.startswith("["):
        return None, "IP literals are not server names (use a name, and SCAIWAVE_RESOLVE to pin its address)"
    host, sep, port = text.partition(":")
    if sep:
        if not _PORT.fullmatch(port) or int(port) > 65535:
            return None, f"bad port {port[:12]!r} (1 to 65535, no leading zeros)"
    if host.endswith("."):
        host = host[:-1]
    if not host or len(host) > _MAX_HOST:
        return None, f"a host name has 1 to {_MAX_HOST} characters"
    labels = host.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None, "a host name is dot-separated labels of letters, digits and inner hyphens (1 to 63 each)"
    if labels[-1].isdigit():
        return None, "IP literals are not server names (use a name, and SCAIWAVE_RESOLVE to pin its address)"
    return (host if not sep or port == "443" else f"{host}:{port}"), None


def split_server_name(name: str) -> tuple[str, int]:
    """``"peer.test:8449"`` -> ``("peer.test", 8449)``; the port defaults to 443.

    Raises ValueError unless ``name`` is a canonical server name.
    """
    if not valid_server_name(name):
        raise ValueError(f"not a canonical server name: {name[:100]!r}")
    host, sep, port = name.partition(":")
    return host, int(port) if sep else 443


def server_of(identifier: object) -> str | None:
    """The server part of a canonical ``@user:server`` or ``!room:server``;
    ``None`` if ``identifier`` is not an id in its canonical spelling (strict)."""
    if not isinstance(identifier, str) or len(identifier) > _MAX_ID:
        return None
    return _server_of(identifier)


@lru_cache(maxsize=4096)
def _server_of(identifier: str) -> str | None:
    # Cached: a batch of events repeats the same few room and user ids.
    local, server = _split_id(identifier)
    if local is None or not valid_server_name(server):
        return None
    return server


def _split_id(identifier: str) -> tuple[str | None, str]:
    sigil, (local, sep, server) = identifier[:1], identifier[1:].partition(":")
    pattern = _USER_LOCAL if sigil == "@" else _ROOM_LOCAL if sigil == "!" else None
    if pattern is None or not sep or not pattern.fullmatch(local):
        return None, ""
    return local, server


def is_user_id(identifier: object) -> bool:
    """A canonical ``@user:server``."""
    return isinstance(identifier, str) and identifier.startswith("@") and server_of(identifier) is not None


def is_room_id(identifier: object) -> bool:
    """A canonical ``!room:server``."""
    return isinstance(identifier, str) and identifier.startswith("!") and server_of(identifier) is not None


def local_of(identifier: str) -> str | None:
    """The local part of a canonical ``@user:server`` (``user``); ``None`` if malformed."""
    if server_of(identifier) is None:
        return None
    return identifier[1:].partition(":")[0]


def _canonical_id(text: object, sigil: str) -> str | None:
    if not isinstance(text, str) or len(text) > _MAX_ID + 2:
        return None
    text = text.strip()
    if text[:1] != sigil:
        return None
    local, _, server = text[1:].partition(":")
    canonical = canonical_server_name(server)
    if canonical is None:
        return None
    ident = f"{sigil}{local.lower()}:{canonical}"
    return ident if server_of(ident) is not None else None


def canonical_user_id(text: object) -> str | None:
    """The canonical spelling of a user id typed by a person (``@Bob:Peer.Test:443``
    is ``@bob:peer.test``), or ``None``."""
    return _canonical_id(text, "@")


def canonical_room_id(text: object) -> str | None:
    """The canonical spelling of a room id typed by a person, or ``None``."""
    return _canonical_id(text, "!")


def user_id(name: str, server_name: str) -> str:
    """``@name:server_name``; raises ValueError for a name that cannot be a local part."""
    if not isinstance(name, str) or not _USER_LOCAL.fullmatch(name):
        raise ValueError(f"user names are 1-64 of a-z 0-9 . _ = - /: {str(name)[:80]!r}")
    return f"@{name}:{server_name}"
