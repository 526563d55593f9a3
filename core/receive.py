"""One inbound federation request, from its bytes to an authenticated endpoint, as a machine.

Every host used to write the same glue around :meth:`~.node.Federation.authenticate`:
route the path, authenticate, and when the origin's key is unknown fetch its
descriptor and authenticate again, deciding on the way which fetch failure
stands as the answer. :class:`Receive` owns that order, so the key fetch is an
effect like any other machine's and is answered through :func:`~.drive.answer`::

    machine = node.receive(method=..., target=..., authorization=..., body=...)
    effects = machine.start(now)
    while effects:                      # only NeedKeys
        need = effects.pop(0)
        failure = host_fetch_keys(need)  # Federation.learn_descriptor; None or a Refused
        effects += answer(machine, need, failure, now)
    machine.refusal or (machine.route, machine.auth)

The order (each step only when the one before passed):

1. the route (``not_found``);
2. the signature, after the *claimed* origin was admitted by the policy
   (:meth:`~.node.Federation.authenticate`: a stranger's request costs one
   header decode, no fetch);
3. an unknown key: one :class:`~.events.NeedKeys` (only when the key cache's
   rate limit allows a fetch; otherwise ``unknown_key`` at once). A fetch that
   failed for any reason but ``unknown_key`` is the answer (the peer is
   unreachable, its descriptor is bad); otherwise the request is checked again,
   and a key still unknown is ``unknown_key``.

What follows (``admit``: peered or not, then the endpoint's decision) needs
stored state; the host reads it and asks the node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .codes import Code, LocalProtocolError, Refused
from .effects import Effect
from .events import NeedKeys
from .requests import Authenticated

if TYPE_CHECKING:
    from .node import Federation, Route

__all__ = ["Receive"]


class Receive:
    """The machine of one inbound request (see the module doc). ``done`` once
    ``refusal`` or ``auth`` is set; ``route`` is set as soon as the path matched."""

    def __init__(self, node: Federation, *, method: str, target: str, authorization: str | None,
                 body: bytes) -> None:
        self.node = node
        self.method = method
        self.target = target
        self.authorization = authorization
        self.body = body
        self.route: Route | None = None
        self.auth: Authenticated | None = None
        self.refusal: Refused | None = None
        self._asked: NeedKeys | None = None
        self._started = False

    @property
    def done(self) -> bool:
        return self.refusal is not None or self.auth is not None

    def start(self, now: int) -> list[Effect]:
        if self._started:
            raise LocalProtocolError("a Receive machine starts once")
        self._started = True
        route = self.node.route(self.method, urlsplit(self.target).path)
        if isinstance(route, Refused):
            self.refusal = route
            return []
        self.route = route
        return self._check(now, may_ask=True)

    def keys_updated(self, now: int, failure: Refused | None = None) -> list[Effect]:
        """The host fetched the keys asked for (``failure``: why it could not)."""
        need, self._asked = self._asked, None
        if need is None:
            raise LocalProtocolError("no NeedKeys is waiting for an answer")
        if failure is not None and failure.code is not Code.UNKNOWN_KEY:
            self.refusal = failure
            return []
        return self._check(now, may_ask=False)

    def _check(self, now: int, *, may_ask: bool) -> list[Effect]:
        result = self.node.authenticate(method=self.method, target=self.target, authorization=self.authorization,
                                        body=self.body, now=now)
        if isinstance(result, NeedKeys):
            if may_ask:
                self._asked = result
                return [result]
            self.refusal = Refused(Code.UNKNOWN_KEY, f"{result.server[:100]} does not publish key {str(result.key_id)[:64]}")
        elif isinstance(result, Refused):
            self.refusal = result
        else:
            self.auth = result
        return []
