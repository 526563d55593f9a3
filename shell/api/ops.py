"""The operator's endpoints in the route table: ``/healthz``, ``/readyz``
(public), ``/metrics``, ``POST /v1/admin/federation/check`` and
``POST /v1/admin/db/backup`` (admin token). They answer from the daemon's
:class:`~.ops.Ops` (``ctx.runtime.ops``), which :func:`~.daemon.make_handler` sets.

``/metrics`` needs the admin token, on the same HTTPS listener as everything
else: see :mod:`.ops` for why.
"""

from __future__ import annotations

from scaiwave_federation.core import Code

from .admin import ADMIN
from ..http.server import Response
from ..http.inputs import SERVER_NAME, Obj, Str
from ..observe.metrics import CONTENT_TYPE
from ..http.routes import API, PUBLIC, Call

__all__: list[str] = []

_HEALTH = {"type": "object", "required": ["alive"], "properties": {"alive": {"const": True}},
           "additionalProperties": False}
_READY = {"type": "object", "required": ["ready", "checks"],
          "properties": {"ready": {"type": "boolean"}, "checks": {"type": "object"}, "reason": {"type": "string"}}}
_CHECK = {"type": "object", "required": ["server_name", "peer", "ok", "steps"],
          "properties": {"server_name": {"type": "string"}, "peer": {"type": ["string", "null"]},
                         "ok": {"type": "boolean"}, "steps": {"type": "array", "items": {"type": "object"}}}}
_BACKUP = {"type": "object", "required": ["path", "bytes", "schema_version", "integrity"]}


async def _healthz(call: Call) -> Response:
    return Response.json(200, {"alive": True})


async def _readyz(call: Call) -> Response:
    return Response.json(*await call.ctx.runtime.ops.health.ready())


async def _metrics(call: Call) -> Response:
    return Response(200, await call.ctx.runtime.ops.metrics.render(), CONTENT_TYPE)


async def _federation_check(call: Call) -> Response:
    return await call.ctx.runtime.ops.check(call.body.get("peer"))


async def _db_backup(call: Call) -> Response:
    return await call.ctx.runtime.ops.backup(call.body.get("name"))


API.add("GET", "/healthz", _healthz, auth=PUBLIC, tag="public", response=_HEALTH,
        summary="The process is alive.")
API.add("GET", "/readyz", _readyz, auth=PUBLIC, tag="public", response=_READY, other={503: _READY},
        summary="Ready to serve: storage writable, key provisioned, listener up (503 names what is not).")
API.add("GET", "/metrics", _metrics, auth=ADMIN, tag="admin", response={"type": "string"},
        content_type=CONTENT_TYPE, summary="Prometheus metrics (text exposition format).")
API.add("POST", "/v1/admin/federation/check", _federation_check, auth=ADMIN, tag="admin", response=_CHECK,
        summary="Test this server the way a peer would (name, TLS, descriptor; clock and handshake against peer).",
        body=Obj({"peer": SERVER_NAME}))
API.add("POST", "/v1/admin/db/backup", _db_backup, auth=ADMIN, tag="admin", response=_BACKUP,
        summary="An online backup of the database into DATA_DIR/backups/ (never overwrites).",
        errors=(Code.CONFLICT, Code.INTERNAL_ERROR),
        body=Obj({"name": Str(max_len=200, example="before-upgrade.db",
                              description="The new file's name in DATA_DIR/backups/ (default: scaiwave-TIME.db).")}))
