"""What each request did: the access line, the audit line, the metrics, the Date header.

:func:`observed` wraps the daemon's HTTP handler. For every request it
answers it writes one **access line** (logger ``scaiwave.access``: method,
route template, status, outcome code, peer, remote address, duration), counts
the request in :class:`~.metrics.Metrics`, and adds a ``Date`` header from the
daemon's clock (peers and ``federation check`` read clock offsets from it).

Every admin *change* (a non-GET under ``/v1/admin/``) also writes an **audit
line** (logger ``scaiwave.audit``): the action, its outcome, and what changed
(a policy diff, key ids before and after, the tenant or user named, the peer
acted on). Audit fields are picked from a fixed list per action: request
headers and response bodies are never copied, so a bearer token, a user's new
access token or a key seed cannot reach the log.

Routes are logged as templates (``/v1/invites/{room_id}/accept``), never as
raw paths, and the peer is the server name a federation request claims in its
signature, only when it is a valid server name: hostile bytes never reach a
log line unescaped.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from scaiwave_federation.core import Code, Refused
from scaiwave_federation.core import decode_refusal
from scaiwave_federation.core import valid_server_name
from scaiwave_federation.core import parse_authorization

from ..http.server import Request, Response
from .logs import LineHandler, _TextFormatter
from ..runtime.ops import json_object

if TYPE_CHECKING:
    from ..runtime.ops import Ops
    from ..runtime.service import Service

__all__ = ["observed", "route_template", "outcome_code", "ROUTES"]

access_log = logging.getLogger("scaiwave.access")
audit_log = logging.getLogger("scaiwave.audit")

_FED = "/_scaiwave/federation/v1"
_ADMIN = "/v1/admin"
#: Every path the daemon serves, as a template; anything else is "other".
ROUTES: tuple[str, ...] = (
    "/.well-known/scaiwave", "/metrics", "/healthz", "/readyz",
    f"{_FED}/handshake", f"{_FED}/invite/{{room_id}}", f"{_FED}/send/{{txn_id}}", f"{_FED}/rooms/{{room_id}}/backfill",
    "/v1/dms", "/v1/rooms", "/v1/rooms/{room_id}/invite", "/v1/rooms/{room_id}/messages", "/v1/notifications",
    "/v1/invites/{room_id}/accept", "/v1/invites/{room_id}/decline",
    f"{_ADMIN}/federation/peers", f"{_ADMIN}/federation/peers/{{peer}}/handshake",
    f"{_ADMIN}/federation/peers/{{peer}}/retry", f"{_ADMIN}/federation/policy", f"{_ADMIN}/federation/descriptor",
    f"{_ADMIN}/federation/foreign/{{participant_id}}/refresh", f"{_ADMIN}/federation/key",
    f"{_ADMIN}/federation/key/generate", f"{_ADMIN}/federation/key/rotate",
    f"{_ADMIN}/federation/rooms/{{room_id}}/backfill", f"{_ADMIN}/federation/backfills/{{id}}",
    f"{_ADMIN}/federation/check", f"{_ADMIN}/tenants", f"{_ADMIN}/tenants/{{name}}", f"{_ADMIN}/users",
    f"{_ADMIN}/db/backup",
)
# Templates by segment count, fewest parameters first (literals win over parameters).
_BY_LENGTH: dict[int, list[tuple[str, tuple[str, ...]]]] = {}
for _template in sorted(ROUTES, key=lambda t: sum(part.startswith("{") for part in t.split("/"))):
    _BY_LENGTH.setdefault(_template.count("/") + 1, []).append((_template, tuple(_template.split("/"))))


_TEMPLATES: dict[str, str] = {}  # path -> its template, for paths seen lately (emptied when full)


def route_template(path: str) -> str:
    """The template of ``path`` (without query) from :data:`ROUTES`, else ``"other"``.

    A ``{name}`` segment matches any one non-empty segment; literal segments
    must match exactly, and literals win over parameters.
    """
    template = _TEMPLATES.get(path)
    if template is None:
        if len(_TEMPLATES) >= 4096:
            _TEMPLATES.clear()
        template = _TEMPLATES[path] = _route_template(path)
    return template


def _route_template(path: str) -> str:
    parts = path.split("/")
    for template, split in _BY_LENGTH.get(len(parts), ()):
        if all(t == p or (p and t[:1] == "{") for t, p in zip(split, parts)):
            return template
    return "other"


class _HttpDate:
    """The Date header's text, formatted once per second (not per request)."""

    second = -1
    text = ""

    @classmethod
    def at(cls, now_ms: int) -> str:
        second = now_ms // 1000
        if second != cls.second:
            cls.second, cls.text = second, email.utils.formatdate(second, usegmt=True)
        return cls.text


def outcome_code(status: int, body: bytes, content_type: str) -> str:
    """``"ok"`` for a success, else the error code in the body (JSON or CBOR)."""
    if status < 400:
        return "ok"
    code: Any = None
    if content_type.startswith("application/json"):
        try:
            code = json.loads(body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
    elif content_type.startswith("application/cbor"):
        code = decode_refusal(status, body).code.value
    try:
        return Code(code).value
    except ValueError:
        return "other"


def claimed_peer(request: Request) -> str | None:
    """The origin a federation request's signature names (checked or not), if it is a server name."""
    if not request.path.startswith(_FED):
        return None
    signed = parse_authorization(request.header("authorization"))
    if isinstance(signed, Refused) or not valid_server_name(signed.origin):
        return None
    return signed.origin


Handler = Callable[[Request], Awaitable[Response]]


def observed(service: Service, ops: Ops, handler: Handler) -> Handler:
    """``handler`` with the access line, the audit line, the metrics and a Date header."""
    metrics = ops.metrics
    # The last answer with its Date header: a handler that answers with the
    # same Response object again (the descriptor) within the same second gets
    # the same dated Response, whose head the HTTP layer has already written.
    last: tuple[Response | None, str, Response | None] = (None, "", None)

    async def observe(request: Request) -> Response:
        nonlocal last
        start = time.perf_counter()
        route = route_template(request.path)
        audit = _Audit.begin(service, request, route) if route.startswith(_ADMIN) else None
        response = await handler(request)
        seconds = time.perf_counter() - start
        status = response.status
        code = "ok" if status < 400 else outcome_code(status, response.body, response.content_type)
        peer = claimed_peer(request)
        metrics.count_received(request.method, route, peer, code, seconds)
        if access_log.isEnabledFor(logging.INFO):
            emit_access(request.method[:16], route, status, code, peer, request.peer, seconds * 1000)
        if audit is not None:
            audit.end(service, response, code)
            ops.admin_changed()
        date = _HttpDate.at(service.now())
        if response is last[0] and date == last[1]:
            return last[2]  # type: ignore[return-value]
        # A new Response, not dataclasses.replace (which costs more than the rest of this).
        dated = Response(status, response.body, response.content_type, (*response.headers, ("date", date)))
        last = (response, date, dated)
        return dated

    return observe


def emit_access(method: str, route: str, status: int, code: str, peer: str | None, remote: str, ms: float,
                now: float | None = None) -> None:
    """Hand an access line (its values; ``now``: its time, default the
    clock's) to ``scaiwave.access``'s handlers. When the one handler it
    reaches is :func:`~.logs.setup_logging`'s own, with no filter on the way
    (the daemon's setting), the line goes straight to it: the same text on
    the same stream, without the logger's and the handler's dispatch, and in
    text format without a LogRecord (together about 7 µs of a descriptor
    GET's 100). Any other arrangement (a test's capture, an added handler or
    filter) takes logging's own path."""
    now = time.time() if now is None else now
    logger = access_log
    if not logger.disabled and not logger.filters and not logger.handlers and logger.propagate:
        parent = logger.parent
        while parent is not None and parent is not logging.root and not parent.handlers and parent.propagate:
            parent = parent.parent
        if parent is logging.root:
            handlers = parent.handlers
            if len(handlers) == 1:
                handler = handlers[0]
                if type(handler) is LineHandler and not handler.filters and logging.INFO >= handler.level:
                    formatter = handler.formatter
                    if type(formatter) is _TextFormatter:
                        line = formatter.line(now, "INFO", "scaiwave.access",
                                              _ACCESS % (method, route, status, code, peer or "-", remote or "-", ms))
                        if line is not None:
                            handler.write_text(line + handler.terminator)
                            return
                    handler.write_line(_AccessRecord(method, route, status, code, peer, remote, ms, now))
                    return
    logger.handle(_AccessRecord(method, route, status, code, peer, remote, ms, now))


#: The access line's message.
_ACCESS = "%s %s %s %s peer=%s remote=%s %.1f ms"


class _AccessRecord(logging.LogRecord):
    """One access line, handed to the ``scaiwave.access`` logger's handlers like
    any record (filters, levels, text or JSON, a test's capture), made for a
    fraction of ``logger.info``'s cost: one a request, it was the largest part
    of a descriptor GET's own work. It sets what ``LogRecord.__init__`` sets,
    without the steps whose answer is fixed here (a file name split from
    ``"(unknown file)"``, a dict as sole argument, a level name lookup); its
    message is formatted when a handler asks, and its ``fields`` (for the
    JSON lines) only if one does."""

    def __init__(self, method: str, route: str, status: int, code: str, peer: str | None, remote: str,
                 ms: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.name, self.levelno, self.levelname = "scaiwave.access", logging.INFO, "INFO"
        self.msg, self.args = _ACCESS, (method, route, status, code, peer or "-",
                                                                       remote or "-", ms)
        self.pathname = self.filename = self.module = "(unknown file)"
        self.lineno, self.funcName = 0, "(unknown function)"
        self.exc_info = self.exc_text = self.stack_info = None
        self.created, self.msecs = now, int((now - int(now)) * 1000) + 0.0
        self.relativeCreated = (now - logging._startTime) * 1000  # type: ignore[attr-defined]
        self.thread = self.threadName = self.processName = self.process = self.taskName = None
        if logging.logThreads:  # what LogRecord records when asked to (setup_logging turns these off)
            self.thread, self.threadName = threading.get_ident(), threading.current_thread().name
        if logging.logProcesses:
            self.process = os.getpid()
        if logging.logMultiprocessing:
            mp = sys.modules.get("multiprocessing")
            self.processName = mp.current_process().name if mp is not None else "MainProcess"
        self._values = (method, route, status, code, peer, remote, ms)

    @property
    def fields(self) -> dict[str, Any]:
        method, route, status, code, peer, remote, ms = self._values
        return {"event": "access", "method": method, "route": route, "status": status, "code": code,
                "peer": peer, "remote": remote, "duration_ms": round(ms, 3)}


class _Audit:
    """One admin change: what it was before, then what it did."""

    def __init__(self, request: Request, route: str, fields: dict[str, Any], before: Any) -> None:
        self.request, self.route, self.fields, self.before = request, route, fields, before

    @classmethod
    def begin(cls, service: Service, request: Request, route: str) -> _Audit | None:
        if not route.startswith(_ADMIN) or request.method in ("GET", "HEAD"):
            return None
        fields: dict[str, Any] = {k: v[:255] for k, v in _path_params(request).items()}
        body = json_object(request.body) or {}
        # Only these body fields are copied, and only as short strings, booleans or ints.
        for key in ("name", "tenant", "federation", "peer", "limit"):
            value = body.get(key)
            if isinstance(value, (bool, int)) or (isinstance(value, str) and len(value) <= 255):
                fields[key] = value
        before: Any = None
        if route.endswith("/federation/policy"):
            before = service.node.policy.as_dict()
        elif "/federation/key/" in route:
            before = _key_ids(service)
        return cls(request, route, fields, before)

    def end(self, service: Service, response: Response, code: str) -> None:
        fields = dict(self.fields)
        if self.route.endswith("/federation/policy"):
            fields["changes"] = _diff(self.before, service.node.policy.as_dict())
        elif "/federation/key/" in self.route:
            fields["key_before"], fields["key_after"] = self.before, _key_ids(service)
        action = self.route[len(_ADMIN) + 1:] if self.route != "other" else "other"
        outcome = "ok" if response.status < 400 else code
        detail = " ".join(f"{k}={json.dumps(v, ensure_ascii=True, separators=(',', ':'))}"
                          for k, v in sorted(fields.items()))
        audit_log.info("admin %s %s: %s %s", self.request.method, action, outcome, detail,
                       extra={"fields": {"event": "audit", "method": self.request.method, "action": action,
                                         "outcome": outcome, "status": response.status,
                                         "remote": self.request.peer, **fields}})




def _path_params(request: Request) -> dict[str, str]:
    """The request's path parameters as its route reads them: percent-decoded,
    names in their canonical spelling (``peer.test%3A8449`` is ``peer.test:8449``).
    A value its route refuses is shown decoded, as sent."""
    from ..http.routes import all_routes

    try:
        route, texts = all_routes().match(request.method, request.path)
    except Exception:  # noqa: BLE001 - not a route: the access line says so; nothing to audit by name
        return {}
    params = {}
    for name, text in texts.items():
        try:
            params[name] = str(route.params[name].parse_text(text, name))
        except Exception:  # noqa: BLE001 - refused input: keep it as sent
            params[name] = text
    return params


def _key_ids(service: Service) -> dict[str, Any]:
    ring = service.node.keyring
    return {"current": ring.current.key_id if ring.current else None, "old": [o.key_id for o in ring.old]}


def _diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What a policy change changed: the mode, and names added to or removed from each list."""
    out: dict[str, Any] = {}
    if before["default_mode"] != after["default_mode"]:
        out["default_mode"] = [before["default_mode"], after["default_mode"]]
    for key in ("allowed_peers", "blocked_peers"):
        added = sorted(set(after[key]) - set(before[key]))
        removed = sorted(set(before[key]) - set(after[key]))
        if added or removed:
            out[key] = {"added": added, "removed": removed}
    return out
