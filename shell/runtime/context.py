"""What a handler is given: :class:`Ctx`.

The handlers (``shell/api/``) get their collaborators handed to them rather
than reaching through the running service for them: the store, the core
node, the clock, our server name, and the runtime for what only the running
daemon does (push events, handshake, learn a descriptor, its locks). One
``Ctx`` per running daemon, made with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scaiwave_federation.core import Federation

from ..store.async_store import AsyncStore

if TYPE_CHECKING:
    from .service import Service

__all__ = ["Ctx"]


@dataclass(frozen=True, slots=True)
class Ctx:
    """A handler's collaborators (see the module doc)."""

    store: AsyncStore
    node: Federation
    now: Callable[[], int]
    server_name: str
    runtime: Service
