"""The operator's endpoints: ``/metrics``, ``/healthz``, ``/readyz``, and the
admin API's ``federation/check`` and ``db/backup``.

:class:`Ops` holds the daemon's :class:`~.metrics.Metrics` and
:class:`~.health.Health`; the endpoints themselves are in the route table
(:mod:`.api_ops`), so the OpenAPI document lists them like every other.

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

from ..store.backup import BackupError, backup_database, backup_path
from ..http.errors import json_error
from ..observe.health import Health
from ..http.server import Response
from ..observe.metrics import Metrics
from ..observe.selfcheck import run_check
from ..store.store import DB_FILENAME

if TYPE_CHECKING:
    from .service import Service

__all__ = ["Ops", "json_object"]

log = logging.getLogger("scaiwave.ops")

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

    async def backup(self, name: str | None) -> Response:
        """``POST /v1/admin/db/backup``: an online backup into ``DATA_DIR/backups/``."""
        config = self.service.config
        if config.database_url is not None:
            return json_error(Refused(Code.BAD_REQUEST, "the database is PostgreSQL: back it up with PostgreSQL's "
                                      "own tools (pg_dump, pg_basebackup or your provider's snapshots)"))
        try:
            dest = backup_path(config.data_dir, name, self.service.now())
            result = await trio.to_thread.run_sync(backup_database, config.data_dir / DB_FILENAME, dest)
        except BackupError as exc:
            return json_error(Refused(Code(exc.code), str(exc)))
        log.info("database backed up to %s (%s bytes)", result["path"], result["bytes"])
        return Response.json(200, result)

    async def check(self, peer: str | None) -> Response:
        """``POST /v1/admin/federation/check``: the self-test (``peer``: canonical, or None)."""
        if peer is not None and peer == self.service.config.server_name:
            return json_error(Refused(Code.BAD_REQUEST, "peer is this server: name another server"))
        steps = await run_check(self.service, peer)
        return Response.json(200, {"server_name": self.service.config.server_name, "peer": peer,
                                   "ok": all(s.ok is not False for s in steps), "steps": [s.view() for s in steps]})


def json_object(body: bytes) -> dict[str, Any] | None:
    """A JSON object body (empty means ``{}``), else None."""
    try:
        value = json.loads(body or b"{}")
    except (ValueError, RecursionError):  # hostile nesting too: the route's own check answers it
        return None
    return value if isinstance(value, dict) else None
