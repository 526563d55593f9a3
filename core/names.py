"""Names: server names (``host`` or ``host:port``), user ids and room ids.

Server names may carry a port (``peer.test:8449``; 443 when absent). Users are
``@name:server_name`` and rooms ``!local:server_name``; the server part of a
room id is the room's host.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["valid_server_name", "server_of", "split_server_name", "local_of", "user_id"]

_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]{2,45}\])"
_SERVER_RE = re.compile(rf"{_HOST}(?::[1-9][0-9]{{0,4}})?")
_LOCAL_RE = re.compile(r"[a-z0-9._=\-/]{1,64}")
_ID_RE = re.compile(r"([@!])([^:]{1,128}):(.{1,255})", re.S)


def valid_server_name(name: object) -> bool:
    """True for ``host`` or ``host:port`` with a DNS name or bracketed IPv6 host."""
    if not isinstance(name, str) or len(name) > 255 or not _SERVER_RE.fullmatch(name):
        return False
    port = name.rsplit(":", 1)[1] if not name.endswith("]") and ":" in name else None
    return port is None or 0 < int(port) < 65536


def split_server_name(name: str) -> tuple[str, int]:
    """``"peer.test:8449"`` -> ``("peer.test", 8449)``; the port defaults to 443."""
    if name.startswith("["):
        host, _, rest = name[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 443
    host, sep, port = name.partition(":")
    return host, int(port) if sep else 443


def server_of(identifier: object) -> str | None:
    """The server part of ``@user:server`` or ``!room:server``; ``None`` if malformed."""
    # Longer than _ID_RE can match (1 + 128 + 1 + 255): never an id.
    if not isinstance(identifier, str) or len(identifier) > 385:
        return None
    return _server_of(identifier)


@lru_cache(maxsize=4096)
def _server_of(identifier: str) -> str | None:
    # Cached: a batch of events repeats the same few room and user ids.
    match = _ID_RE.fullmatch(identifier)
    if match is None or not valid_server_name(match.group(3)):
        return None
    return match.group(3)


def local_of(identifier: str) -> str | None:
    """The local part of ``@user:server`` (``user``); ``None`` if malformed."""
    match = _ID_RE.fullmatch(identifier) if isinstance(identifier, str) else None
    return match.group(2) if match and server_of(identifier) else None


def user_id(name: str, server_name: str) -> str:
    """``@name:server_name``; raises ValueError for a name that cannot be a local part."""
    if not _LOCAL_RE.fullmatch(name):
        raise ValueError(f"user names are 1-64 of a-z 0-9 . _ = - /: {name!r}")
    return f"@{name}:{server_name}"
