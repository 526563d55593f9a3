"""``scaiwave serve``: the Trio daemon.

Wires the pieces: configuration checked at start (one clear line on error),
storage, the core node, the HTTPS listener, the outbox worker and the core's
timers; stops cleanly on SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import signal

import trio

from ..api.federation import handle_federation
from ..config import Config, server_ssl_context
from scaiwave_federation.core import Code, Refused

from ..http.errors import INTERNAL, cbor_error, json_error
from ..http.server import FEDERATION_PREFIX, Request, Response, serve_http
from ..observe.requests import observed, outcome_code, route_template
from ..observe.logs import write_held_lines
from .ops import Ops
from ..http.routes import all_routes
from .service import Service
from ..store.store import StorageError

log = logging.getLogger("scaiwave.daemon")

__all__ = ["serve", "make_handler"]


def make_handler(service: Service, nursery: trio.Nursery, ops: Ops | None = None):
    """The HTTP handler: operations paths (metrics, health) first, federation
    paths (CBOR) to their module, everything else (client, admin and public
    JSON endpoints) through the route table; observed (access and audit lines,
    metrics: see observe.py)."""
    ops = ops or Ops(service)
    service.ops = ops  # the operator endpoints (api_ops) answer from it
    routes = all_routes()

    async def handler(request: Request) -> Response:
        path = request.path
        federation = path.startswith(FEDERATION_PREFIX)
        try:
            if federation:
                return await handle_federation(service.ctx, request)
            return await routes.dispatch(service, request, nursery)
        except StorageError as exc:
            if exc.code != "unavailable":
                log.exception("storage refused %s %s", request.method, path[:200])
                refusal = Refused(Code.INTERNAL_ERROR, "internal error (see the server log)")
            else:  # a full or failing disk: nothing was stored, the peer or client retries
                refusal = Refused(Code.STORAGE_UNAVAILABLE, str(exc))
            return cbor_error(refusal) if federation else json_error(refusal)
        except Exception:
            log.exception("handler failed for %s %s", request.method, path[:200])
            return cbor_error(Refused(Code.INTERNAL_ERROR, "internal error (see the server log)")) if federation \
                else INTERNAL

    return observed(service, ops, handler)


async def serve(config: Config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon until cancelled or signalled. ``task_status.started(port)``."""
    ssl_context = server_ssl_context(config)
    for line in config.warnings():
        log.warning("%s", line)
    service = await Service.open(config)
    ops = Ops(service)
    ops.metrics.instrument(service, route_template, outcome_code)
    ops.metrics.refresh_labels(await service.store.list_peers())
    try:
        async with trio.open_nursery() as nursery:
            handler = make_handler(service, nursery, ops)
            port = await nursery.start(lambda task_status: serve_http(
                handler, host=config.listen_host, port=config.listen_port, ssl_context=ssl_context,
                task_status=task_status))
            ops.health.listening = True
            nursery.start_soon(service.keep_running, service.outbox_worker)
            nursery.start_soon(service.keep_running, service.lease_loop)
            nursery.start_soon(service.catch_up_worker)
            nursery.start_soon(service.keep_running, service.timer_loop)
            nursery.start_soon(_signals, nursery.cancel_scope)
            nursery.start_soon(write_held_lines, config.access_log_flush_ms)
            if service.node.keyring.current is None:
                log.warning("no federation key yet: run `scaiwave admin federation key generate`")
            log.info("scaiwave serving %s on %s:%s", config.server_name, config.listen_host, port)
            task_status.started(port)
    finally:
        ops.health.listening = False
        with trio.CancelScope(shield=True):
            await service.aclose()


async def _signals(scope: trio.CancelScope) -> None:
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                scope.cancel()
                return
    except RuntimeError:  # not the main thread (tests): no signal handling
        return
