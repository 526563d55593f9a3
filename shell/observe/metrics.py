"""Prometheus metrics: what the daemon counts, and ``/metrics``.

Each daemon has its own :class:`Metrics` (its own ``CollectorRegistry``, so two
daemons in one test process never mix counts). Two kinds of metric:

- **counted as it happens**: requests in and out (per peer, route and outcome
  code), their durations, signature verifications and request
  authentications. :mod:`.observe` and :meth:`Metrics.instrument` feed them.
- **read at scrape time** from the daemon's state (:meth:`Metrics.render`
  reads storage once, then renders): outbox depth and oldest age per peer,
  backfill jobs and events stored, the federation key's age and time to
  rotation, and each peer's handshake state.

**Cardinality.** Peer names are chosen by whoever runs a server, so a label
with every name a request claims would let anyone grow our metrics without
bound. Only :func:`labelled_peers` get their own ``peer`` label: the names in
``allowed_peers`` (chosen by our admin) and, under an ``open`` policy, at most
:data:`MAX_OPEN_PEER_LABELS` peers that completed a handshake and that the
policy admits. Everything else is counted under ``peer="other"``; requests that
name no peer (client, admin) under ``peer=""``. Routes are templates
(``/v1/rooms/{room_id}/messages``) and codes are the fixed :class:`Code`
values, so those labels are bounded too.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from scaiwave_federation.core import Code, NeedKeys, Policy, Refused

if TYPE_CHECKING:
    from ..runtime.service import Service

__all__ = ["Metrics", "labelled_peers", "peer_label", "MAX_OPEN_PEER_LABELS", "OTHER", "CONTENT_TYPE"]

# The *_created series (one more per labelled series) tell nothing a restart
# counter does not; off for every registry of the process.
disable_created_metrics()

#: Under an ``open`` policy: at most this many peers beyond allowed_peers get a label.
MAX_OPEN_PEER_LABELS = 50
OTHER = "other"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Outcome codes: "ok" or a Code value; anything else is counted as "other".
CODES = frozenset({"ok", *(c.value for c in Code)})
# Request latencies: 1 ms to 2 min (the handler timeout).
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
_VERIFY = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def labelled_peers(policy: Policy, peers: Iterable[dict[str, Any]]) -> frozenset[str]:
    """The peer names that get their own label (see the module docs).

    ``peers`` are peers rows (``server_name``, ``state``). Blocked names never
    get one. Pure: the same policy and rows give the same set.
    """
    chosen = set(policy.allowed_peers) - set(policy.blocked_peers)
    if policy.default_mode == "open":
        active = sorted({p["server_name"] for p in peers
                         if p.get("state") == "active" and isinstance(p.get("server_name"), str)
                         and policy.admits(p["server_name"]) is None} - chosen)
        chosen.update(active[:MAX_OPEN_PEER_LABELS])
    return frozenset(chosen)


def peer_label(name: str | None, labelled: frozenset[str]) -> str:
    """``name`` if it is labelled, ``""`` for no peer, else ``"other"``."""
    if not name:
        return ""
    return name if name in labelled else OTHER


_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"))


def code_label(code: str) -> str:
    return code if code in CODES else OTHER


class Metrics:
    """One daemon's metrics. Build it after the service; :meth:`render` for ``/metrics``."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        self.labelled: frozenset[str] = labelled_peers(service.node.policy, ())
        self._snapshot: dict[str, Any] = {"peers": [], "outbox": []}
        r = self.registry
        # Requests served: counted in plain dicts (see count_received), given
        # to Prometheus as a counter and a histogram at scrape time.
        self._received: dict[tuple[str, str, str, str], int] = {}
        self._received_seconds: dict[tuple[str, str], list[float]] = {}
        r.register(_ReceivedCollector(self))
        self.sent = Counter("scaiwave_requests_sent", "Requests sent to peers, by peer, route template and outcome "
                            "code", ["peer", "method", "route", "code"], registry=r)
        self.sent_seconds = Histogram("scaiwave_request_sent_duration_seconds", "Time for a peer to answer",
                                      ["route"], buckets=_LATENCY, registry=r)
        self.signatures = Counter("scaiwave_signatures_verified", "Event signatures verified, by result",
                                  ["result"], registry=r)
        self.signature_seconds = Histogram("scaiwave_signature_batch_duration_seconds",
                                           "Time to verify one batch of event signatures", buckets=_VERIFY, registry=r)
        self.authentications = Counter("scaiwave_request_authentications", "Signed federation requests checked, by "
                                       "claimed peer and outcome code", ["peer", "code"], registry=r)
        self.authentication_seconds = Histogram("scaiwave_request_authentication_duration_seconds",
                                                "Time to check one request signature", buckets=_VERIFY, registry=r)
        r.register(_StateCollector(self))
        self._sent_children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}

    # -- feeding ------------------------------------------------------------------

    def refresh_labels(self, peers: Sequence[dict[str, Any]] | None = None) -> None:
        """Recompute which peers are labelled: at start, at each scrape (with the
        peers rows just read) and after an admin change (with the last ones read)."""
        if peers is not None:
            self._snapshot = {**self._snapshot, "peers": list(peers)}
        self.labelled = labelled_peers(self.service.node.policy, self._snapshot["peers"])

    def peer(self, name: str | None) -> str:
        return peer_label(name, self.labelled)

    def count_received(self, method: str, route: str, peer: str | None, code: str, seconds: float) -> None:
        """One request served. Called once a request, from the event loop's
        thread only: a count and a histogram bucket in plain dicts, without
        the locks and the per-bucket loop of prometheus_client's own metrics
        (they were a tenth of the daemon's own work for a descriptor GET).
        Every label is bounded (see the module doc)."""
        method = method if method in _METHODS else OTHER
        key = (method, route, self.peer(peer) if peer else "", code if code in CODES else OTHER)
        counts = self._received
        counts[key] = counts.get(key, 0) + 1
        hist = self._received_seconds.get((method, route))
        if hist is None:  # a count per bucket (the last: over every bound), then the sum
            hist = self._received_seconds[(method, route)] = [0.0] * (len(_LATENCY) + 2)
        hist[bisect.bisect_left(_LATENCY, seconds)] += 1
        hist[-1] += seconds

    def count_sent(self, peer: str, method: str, route: str, code: str, seconds: float) -> None:
        key = (self.peer(peer), method, route, code if code in CODES else OTHER)
        children = self._sent_children.get(key)
        if children is None:
            children = self._sent_children[key] = (self.sent.labels(*key), self.sent_seconds.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    def instrument(self, service: Service, route_of: Callable[[str], str],
                   code_of: Callable[[int, bytes, str], str]) -> None:
        """Count what the service does without changing it: wrap its event
        signature verifier, its request authentication and its peer client."""
        node = service.node
        verify = node.batch_verifier

        def counted_verifier(items):
            start = time.perf_counter()
            verdicts = list(verify(items))
            self.signature_seconds.observe(time.perf_counter() - start)
            good = sum(1 for v in verdicts if v)
            if good:
                self.signatures.labels("valid").inc(good)
            if len(verdicts) - good:
                self.signatures.labels("invalid").inc(len(verdicts) - good)
            return verdicts

        counted_verifier.__wrapped__ = verify  # type: ignore[attr-defined]  # the timed verifier stays findable
        node.batch_verifier = counted_verifier
        authenticate = node.authenticate

        def counted_authenticate(*args, **kwargs):
            start = time.perf_counter()
            result = authenticate(*args, **kwargs)
            self.authentication_seconds.observe(time.perf_counter() - start)
            if isinstance(result, NeedKeys):  # asked again once the keys are fetched: counted then
                return result
            code = result.code.value if isinstance(result, Refused) else "ok"
            origin = result.origin if not isinstance(result, Refused) else None
            self.authentications.labels(self.peer(origin), code).inc()
            return result

        node.authenticate = counted_authenticate
        client = service.client
        request = client.request

        async def counted_request(server_name: str, method: str, target: str, *args, **kwargs):
            from ..http.client import TransportError

            route, start = route_of(target.split("?", 1)[0]), time.perf_counter()
            try:
                resp = await request(server_name, method, target, *args, **kwargs)
            except TransportError as exc:
                self.count_sent(server_name, method, route, exc.code, time.perf_counter() - start)
                raise
            code = code_of(resp.status, resp.body, resp.headers.get("content-type", ""))
            if route == "/.well-known/scaiwave" and resp.status != 200:
                code = Code.NO_DESCRIPTOR.value
            self.count_sent(server_name, method, route, code, time.perf_counter() - start)
            return resp

        client.request = counted_request  # type: ignore[method-assign]

    # -- /metrics -----------------------------------------------------------------

    async def render(self) -> bytes:
        """Read the state metrics from storage, then the whole exposition text."""
        store = self.service.store
        peers = await store.list_peers()
        outbox = await store.run(_outbox_by_peer)
        self._snapshot = {"peers": peers, "outbox": outbox}
        self.refresh_labels()
        return generate_latest(self.registry)


def _outbox_by_peer(store) -> list[tuple[str, int, int]]:
    """(peer, queued, oldest created_at) for every peer with something queued."""
    rows = store.db.execute("SELECT peer, count(*), min(created_at) FROM outbox GROUP BY peer").fetchall()
    return [(str(peer), int(count), int(oldest)) for peer, count, oldest in rows]


class _ReceivedCollector(Collector):
    """``scaiwave_requests_received`` and ``scaiwave_request_duration_seconds``,
    from the counts :meth:`Metrics.count_received` keeps: the families
    prometheus_client's Counter and Histogram would expose."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Any]:
        received = CounterMetricFamily("scaiwave_requests_received", "HTTP requests served, by route template, "
                                       "claimed peer (federation) and outcome code",
                                       labels=["method", "route", "peer", "code"])
        for key, count in list(self.metrics._received.items()):
            received.add_metric(list(key), count)
        yield received
        seconds = HistogramMetricFamily("scaiwave_request_duration_seconds", "Time to answer an HTTP request",
                                        labels=["method", "route"])
        for (method, route), hist in list(self.metrics._received_seconds.items()):
            hist = list(hist)  # a copy: the event loop may count meanwhile (a scrape runs on it too)
            buckets, total = [], 0.0
            for bound, n in zip((*_LATENCY, float("inf")), hist):
                total += n
                buckets.append((floatToGoString(bound), total))
            seconds.add_metric([method, route], buckets, hist[-1])
        yield seconds


class _StateCollector(Collector):
    """The metrics read from the daemon's state at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        service = m.service
        now = service.now()
        snap = m._snapshot
        yield from self._outbox(snap["outbox"], now)
        yield from self._backfills(service)
        yield from self._key(service, now)
        yield from self._peers(snap["peers"])

    def _outbox(self, rows, now):
        depth = GaugeMetricFamily("scaiwave_outbox_depth", "Transactions queued for a peer", labels=["peer"])
        age = GaugeMetricFamily("scaiwave_outbox_oldest_age_seconds", "Age of the oldest transaction queued for a "
                                "peer", labels=["peer"])
        by_label: dict[str, tuple[int, int]] = {}
        for peer, count, oldest in rows:
            label = self.metrics.peer(peer)
            queued, first = by_label.get(label, (0, oldest))
            by_label[label] = (queued + count, min(first, oldest))
        for label, (queued, oldest) in sorted(by_label.items()):
            depth.add_metric([label], queued)
            age.add_metric([label], max(0, now - oldest) / 1000)
        yield depth
        yield age

    def _backfills(self, service):
        jobs = GaugeMetricFamily("scaiwave_backfill_jobs", "Backfill jobs since the daemon started, by kind and "
                                 "state", labels=["kind", "state"])
        stored = CounterMetricFamily("scaiwave_backfill_events_stored", "Verified events stored by backfill jobs",
                                     labels=["kind"])
        counts: dict[tuple[str, str], int] = {(k, s): 0 for k in ("admin", "catch_up")
                                              for s in ("running", "done", "failed")}
        events = {"admin": 0, "catch_up": 0}
        for job in list(service.jobs.values()):
            kind = "catch_up" if job.until is not None else "admin"
            counts[(kind, job.state)] = counts.get((kind, job.state), 0) + 1
            events[kind] += job.stored
        for (kind, state), n in sorted(counts.items()):
            jobs.add_metric([kind, state], n)
        for kind, n in sorted(events.items()):
            stored.add_metric([kind], n)
        yield jobs
        yield stored

    def _key(self, service, now):
        ring = service.node.keyring
        present = GaugeMetricFamily("scaiwave_federation_key_present", "1 when this server has a federation key")
        present.add_metric([], 1 if ring.current else 0)
        yield present
        old = GaugeMetricFamily("scaiwave_federation_old_keys", "Rotated-out keys still published")
        old.add_metric([], len(ring.old))
        yield old
        if ring.current is not None:
            age = GaugeMetricFamily("scaiwave_federation_key_age_seconds", "Age of the current federation key")
            age.add_metric([], max(0, now - ring.current.created_at) / 1000)
            yield age
            due = ring.rotation_due_at()
            left = GaugeMetricFamily("scaiwave_federation_key_rotation_due_seconds", "Time until the current key "
                                     "rotates by itself (negative: overdue)")
            left.add_metric([], ((due or now) - now) / 1000)
            yield left

    def _peers(self, rows):
        state = GaugeMetricFamily("scaiwave_peers", "Peers by handshake state (1 per labelled peer; a count for "
                                  "peer=\"other\")", labels=["peer", "state"])
        seen = GaugeMetricFamily("scaiwave_peer_last_seen_timestamp_seconds", "When a peer last answered or "
                                 "sent a request that verified", labels=["peer"])
        failures = GaugeMetricFamily("scaiwave_peer_failures", "Consecutive failures talking to a peer",
                                     labels=["peer"])
        counts: dict[tuple[str, str], int] = {}
        for row in rows:
            label = self.metrics.peer(row["server_name"])
            key = (label, row.get("state") or "known")
            counts[key] = counts.get(key, 0) + 1
            if label != OTHER:
                if row.get("last_seen"):
                    seen.add_metric([label], row["last_seen"] / 1000)
                failures.add_metric([label], row.get("failures") or 0)
        for (label, st), n in sorted(counts.items()):
            state.add_metric([label, st], n)
        yield state
        yield seen
        yield failures
