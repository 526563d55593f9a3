"""The operator's endpoints: ``/metrics``, ``/healthz``, ``/readyz``, and the
admin API's ``federation/check`` and ``db/backup``.

:class:`Ops` holds the daemon's :class:`~.metrics.Metrics` and
:class:`~.health.Health`; the daemon asks :meth:`Ops.handle` first, and it
answers the paths it owns (None for every other path).

``/metrics`` needs the admin token (``Authorization: Bearer``), on the same
HTTPS listener as everything else. A separate plain-HTTP address would be one
more port to firewall, and metrics name our peers, queue depths and key age:
that is for our operators, not for anyone who can reach the federation port.
Prometheus sends the token with ``authorization: {credentials_file: ...}``.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import trio

from scaiwave_federation.core import Code, Refused
from scaiwave_federation.core.names import valid_server_name

from .backup import BackupError, backup_database, backup_path
from .errors import json_error
from .health import Health
from .http import Request, Response
from .metrics import CONTENT_TYPE, Metrics
from .selfcheck import run_check
from .storage import DB_FILENAME

if TYPE_CHECKING:
    from .service import Service

__all__ = ["Ops", "json_object"]

log = logging.getLogger("scaiwave.ops")

_UNAUTHORIZED = Refused(Code.UNAUTHORIZED, "this endpoint needs Authorization: Bearer $SCAIWAVE_ADMIN_TOKEN")


class Ops:
    """The operator endpoints of one daemon."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.metrics = Metrics(service)
        self.health = Health(service)

    def admin_changed(self) -> None:
        """An admin change went through: labels and readiness may differ now."""
        self.metrics.refresh_labels()
        self.health.forget()

    async def handle(self, request: Request) -> Response | None:
        """Answer ``request`` if it is one of ours, else None."""
        from .api_admin import _authorized

        path, method = request.path, request.method
        if path not in _PATHS:
            return None
        want = _PATHS[path]
        if method != want and not (want == "GET" and method == "HEAD"):
            return json_error(Refused(Code.NOT_FOUND, f"{path} takes {want}"))
        if path == "/healthz":
            return Response.json(200, {"alive": True})
        if path == "/readyz":
            return Response.json(*await self.health.ready())
        if not _authorized(self.service, request):
            return json_error(_UNAUTHORIZED)
        if path == "/metrics":
            return Response(200, await self.metrics.render(), CONTENT_TYPE)
        body = json_object(request.body)
        if body is None:
            return json_error(Refused(Code.BAD_REQUEST, "the body is a JSON object"))
        if path == "/v1/admin/federation/check":
            return await self._check(body)
        return await self._backup(body)

    async def _backup(self, body: dict[str, Any]) -> Response:
        config = self.service.config
        try:
            dest = backup_path(config.data_dir, body.get("name"), self.service.now())
            result = await trio.to_thread.run_sync(backup_database, config.data_dir / DB_FILENAME, dest)
        except BackupError as exc:
            return json_error(Refused(Code(exc.code), str(exc)))
        log.info("database backed up to %s (%s bytes)", result["path"], result["bytes"])
        return Response.json(200, result)

    async def _check(self, body: dict[str, Any]) -> Response:
        peer = body.get("peer")
        if peer is not None:
            if not isinstance(peer, str) or not valid_server_name(peer.lower()):
                return json_error(Refused(Code.BAD_REQUEST, "peer is a server name (host or host:port)"))
            peer = peer.lower().removesuffix(":443")  # one spelling per server, as in policies
            if peer == self.service.config.server_name:
                return json_error(Refused(Code.BAD_REQUEST, "peer is this server: name another server"))
        steps = await run_check(self.service, peer)
        return Response.json(200, {"server_name": self.service.config.server_name, "peer": peer,
                                   "ok": all(s.ok is not False for s in steps), "steps": [s.view() for s in steps]})


_PATHS = {"/healthz": "GET", "/readyz": "GET", "/metrics": "GET", "/v1/admin/federation/check": "POST",
          "/v1/admin/db/backup": "POST"}


def json_object(body: bytes) -> dict[str, Any] | None:
    """A JSON object body (empty means ``{}``), else None."""
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
