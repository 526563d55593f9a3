"""The one route table of the client and admin APIs (and the public documents).

Each :class:`Route` is a method, a path template (``/v1/rooms/{room_id}/messages``),
an authentication, typed path parameters, query and body schemas
(:mod:`.inputs`), the JSON Schema of its ``200`` answer and the refusal codes it
may answer with. The modules that own the handlers register into :data:`API`
(one ``API.add(...)`` per endpoint), and two readers use the same table: the
daemon's dispatcher (:meth:`RouteTable.dispatch`) and the OpenAPI document
(:mod:`.openapi`), so the document cannot list an endpoint the daemon does not
serve, or the other way round.

Path parameters are percent-decoded, one segment at a time after the path is
split at ``/``: ``/v1/rooms/%21abc%3Apeer.test/messages`` is the room
``!abc:peer.test``, exactly like the raw spelling, and ``%2F`` stays inside its
segment. Every HTTP client library encodes ``!``, ``:`` and ``@`` in a path.

Order of checks for a request: the route (``404 not_found``; ``405
method_not_allowed`` with an ``Allow`` header when the path exists; ``HEAD``
is served by the ``GET`` route), the caller
(``401 unauthorized``: nothing about the input is looked at for a stranger),
then path parameters, query and body (``400 bad_request`` naming the field),
and only then the handler, which receives typed values.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from scaiwave_federation.core import Code, LocalProtocolError, Refused

from .errors import json_error
from .server import Request, Response
from .inputs import BadInput, Field, Obj, parse_json_body, parse_query
from ..store.schema import StorageError

if TYPE_CHECKING:
    import trio

    from ..runtime.context import Ctx
    from ..runtime.service import Service

__all__ = ["API", "Auth", "ApiFailure", "Call", "Route", "RouteTable", "PUBLIC", "all_routes"]

log = logging.getLogger("scaiwave.routes")
_PARAM = re.compile(r"\{([a-z_]+)\}")
#: How many (method, path) pairs RouteTable.match remembers.
MATCH_CACHE = 4096
#: Storage refusals an API caller can cause (a race past a handler's own check).
#: ``unavailable``: a full or failing disk (503, retryable).
_STORAGE_CODES = {"conflict": Code.CONFLICT, "not_found": Code.NOT_FOUND, "invalid": Code.BAD_REQUEST,
                  "unavailable": Code.STORAGE_UNAVAILABLE}


class ApiFailure(Exception):
    """Raised by a handler (or an authentication) to answer with this refusal."""

    def __init__(self, refusal: Refused, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(refusal.detail)
        self.refusal, self.headers = refusal, headers


@dataclass(frozen=True)
class Auth:
    """Who may call a route. ``check`` returns the caller (a user row for user
    routes) or raises :class:`ApiFailure`; ``scheme`` names the OpenAPI
    security scheme (empty: public)."""

    scheme: str
    check: Callable[[Ctx, Request], Awaitable[Any]] | None = None
    description: str = ""


PUBLIC = Auth("")


@dataclass(frozen=True)
class Call:
    """What a handler gets: its collaborators (:class:`~..runtime.context.Ctx`),
    the raw request and the typed input."""

    ctx: Ctx
    request: Request
    nursery: trio.Nursery
    caller: Any
    params: dict[str, Any]
    query: dict[str, Any]
    body: dict[str, Any]


Handler = Callable[[Call], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    handler: Handler
    auth: Auth
    summary: str
    response: Mapping[str, Any]
    params: Mapping[str, Field] = field(default_factory=dict)
    query: Obj | None = None
    body: Obj | None = None
    errors: tuple[Code, ...] = ()
    tag: str = ""
    content_type: str = "application/json"
    #: Answers other than 200 that are not refusals: status -> JSON schema
    #: (``/readyz``'s 503 names what is not ready).
    other: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    #: For a public route that takes no input: its answer from the handlers'
    #: collaborators alone, given without building a Call (the descriptor,
    #: fetched by every peer and load balancer). ``handler`` must answer the same.
    static: Callable[[Ctx], Response] | None = None

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.template.split("/"))

    @property
    def operation_id(self) -> str:
        return self.handler.__name__.lstrip("_")


class RouteTable:
    """Routes in registration order; see the module docstring."""

    def __init__(self) -> None:
        self.routes: list[Route] = []
        # Routes by segment count, each with its split template: a request is
        # matched against the few of its length, not against every template.
        self._by_length: dict[int, list[tuple[Route, tuple[str, ...]]]] = {}
        # (method, path) -> what match() answered: the same paths come again
        # and again (a client's room, the descriptor). Bounded: emptied when full.
        self._matched: dict[tuple[str, str], tuple[Route, dict[str, str]]] = {}
        # (method, exact path) -> Route.static, looked up before anything else.
        self._static: dict[tuple[str, str], Callable[[Ctx], Response]] = {}

    def add(self, method: str, template: str, handler: Handler, *, auth: Auth, summary: str,
            response: Mapping[str, Any], **options: Any) -> None:
        """Register one endpoint (``options``: the rest of :class:`Route`'s fields)."""
        route = Route(method, template, handler, auth, summary, response, **options)
        if route.static is not None and (route.auth is not PUBLIC or route.params or route.query or route.body):
            raise ValueError(f"{method} {template}: only a public route without input can answer statically")
        names = _PARAM.findall(template)
        if sorted(names) != sorted(route.params):
            raise ValueError(f"{template}: path parameters {names} but types for {sorted(route.params)}")
        if any(r.method == method and r.template == template for r in self.routes):
            raise ValueError(f"{method} {template} registered twice")
        if any(r.operation_id == route.operation_id for r in self.routes):
            raise ValueError(f"{route.operation_id} names two routes")
        if route.static is not None:
            self._static[(method, template)] = route.static
            if method == "GET":
                self._static[("HEAD", template)] = route.static
        self.routes.append(route)
        self._by_length.setdefault(len(route.segments), []).append((route, route.segments))
        self._matched.clear()

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route for ``method path`` and its decoded path parameters (still text).

        Raises :class:`ApiFailure` (``not_found``) or :class:`BadInput`.
        The parameters' dict is shared with later matches of the same path: read it only.
        """
        found = self._matched.get((method, path))
        if found is not None:
            return found
        raw = path.split("/")
        try:
            segments = [unquote(s, errors="strict") for s in raw]
        except UnicodeDecodeError:
            raise BadInput("path", "percent-encoding that is not UTF-8") from None
        allowed = []
        for route, template in self._by_length.get(len(segments), ()):
            params = _bind(template, segments)
            if params is None:
                continue
            # HEAD is GET without the body (the HTTP layer drops it).
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                if len(self._matched) >= MATCH_CACHE:
                    self._matched.clear()
                self._matched[(method, path)] = (route, params)
                return route, params
            allowed.append(route.method)
        where = f"{method} {path[:100]}"
        if allowed:
            refusal = Refused(Code.METHOD_NOT_ALLOWED, f"no endpoint {where}: this path takes {', '.join(allowed)}")
            raise ApiFailure(refusal, (("allow", ", ".join(allowed)),))
        raise ApiFailure(Refused(Code.NOT_FOUND, f"no endpoint {where}"))

    async def dispatch(self, service: Service, request: Request, nursery: trio.Nursery) -> Response:
        """Answer ``request`` from the table: every expected failure is a JSON refusal."""
        try:
            static = self._static.get((request.method, request.target))
            if static is not None and not request.body:  # the exact path, without a query
                if request.target.startswith(_SHARED_STATE_PATHS) and not service.alone():
                    await service.refresh_shared()  # as below
                return static(service.ctx)
            route, texts = self.match(request.method, request.path)
            if request.path.startswith(_SHARED_STATE_PATHS) and not service.alone():
                # The admin API and our descriptor answer the same on every
                # worker: a key or policy another worker changed is loaded first
                # (one read; a worker alone has nobody to hear from but its
                # look, every outbox_poll, so its descriptor costs no read).
                await service.refresh_shared()
            caller = await route.auth.check(service.ctx, request) if route.auth.check else None
            params = {name: route.params[name].parse_text(text, name) for name, text in texts.items()}
            query = parse_query(_query_pairs(request.target), route.query) \
                if route.query is not None or "?" in request.target else {}
            body = parse_json_body(request.body, route.body) if route.body is not None or request.body else {}
            return await route.handler(Call(service.ctx, request, nursery, caller, params, query, body))
        except ApiFailure as fail:
            return json_error(fail.refusal, fail.headers)
        except BadInput as fail:
            return json_error(fail.refusal)
        except LocalProtocolError as exc:  # the core refused a value as the caller's mistake
            log.info("%s %s: the core refused the input: %s", request.method, request.path[:200], exc)
            return json_error(Refused(Code.BAD_REQUEST, str(exc)))
        except StorageError as exc:
            if exc.code not in _STORAGE_CODES:
                raise
            return json_error(Refused(_STORAGE_CODES[exc.code], exc.message))


#: Paths that answer from state workers share (see Service.refresh_shared).
_SHARED_STATE_PATHS = ("/v1/admin/", "/.well-known/")


def _bind(template: tuple[str, ...], segments: list[str]) -> dict[str, str] | None:
    if len(template) != len(segments):
        return None
    params = {}
    for pattern, segment in zip(template, segments):
        if pattern.startswith("{"):
            if not segment:
                return None
            params[pattern[1:-1]] = segment
        elif pattern != segment:
            return None
    return params


def _query_pairs(target: str) -> list[tuple[str, str]]:
    query = urlsplit(target).query
    try:
        return parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query), errors="strict",
                         max_num_fields=20)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput("query", f"not a valid query string ({str(exc)[:80]})") from None


#: The client and admin APIs' routes; api_client, api_admin and api_public add theirs.
API = RouteTable()


def all_routes() -> RouteTable:
    """:data:`API` with every module's routes registered."""
    from ..api import admin, client, ops, public  # noqa: F401  (they register on import)

    return API
