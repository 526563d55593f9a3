"""Rows for analysis: one per decision or per record, plain dicts, filters, JSON Lines and CSV.

Every row has the same keys in the same order (:data:`DECISION_COLUMNS`,
:data:`RECORD_COLUMNS`), and every value is ``None``, a bool, an int or a
str, so ``pandas.DataFrame(rows)``, ``json.dumps`` and ``csv`` all take them
as they are. Bytes inside a record (the ``record`` column) are base64 (RFC
4648, with padding), marked ``{"$bytes": "..."}`` so they never pass for text.

The counts have one meaning each, in every row and in the summary:

- ``stored``: events newly written to storage by this decision;
- ``echoed``: events accepted without storing because they were already held
  (a host's echo of our own proposal, a repeated delivery);
- ``refused``: events refused with a code;
- a transaction's ``ok`` results are ``stored + echoed``.

``live_*`` columns are what the daemon did, ``replay_*`` what the fresh core
decided; durations (``*_us``, integer microseconds) are the live processing
times the recording holds (docs/replay.md, "Live timings").
"""

from __future__ import annotations

import base64
import csv
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence, TextIO
from urllib.parse import urlsplit

from scaiwave_federation.core import Decision, ReplayResult
from scaiwave_federation.core import parse_authorization
from scaiwave_federation.core import Refused

__all__ = [
    "DECISION_COLUMNS", "RECORD_COLUMNS", "Filter", "decision_rows", "record_rows", "plain",
    "write_jsonl", "write_csv", "TIMING_KEYS", "peer_key", "parse_time", "endpoint_of", "count_of",
]

TIMING_KEYS = ("decode_us", "verify_us", "store_us", "total_us")
_COUNTS = ("stored", "echoed", "refused")

DECISION_COLUMNS: tuple[str, ...] = (
    "index", "now", "peer", "room", "kind", "direction", "method", "endpoint", "target",
    "live_verdict", "live_code", "live_status", "replay_verdict", "replay_code", "same", "comparable",
    *(f"live_{c}" for c in _COUNTS), *(f"replay_{c}" for c in _COUNTS),
    "pages", *TIMING_KEYS,
)

RECORD_COLUMNS: tuple[str, ...] = (
    "index", "now", "peer", "room", "kind", "direction", "method", "endpoint", "target", "status", "code",
    *_COUNTS, *TIMING_KEYS, "record",
)

_DIRECTION = {
    "inbound": "in", "outbound": "out", "descriptor": "out", "handshake_start": "out", "handshake_end": "out",
    "backfill_start": "out", "backfill_end": "out", "backfill_page": "out", "handshake": "out", "backfill": "out",
}


def peer_key(name: str | None) -> str | None:
    """One spelling per server name: lower case, no ``:443`` (as the daemon stores them)."""
    if name is None:
        return None
    name = name.strip().lower()
    return name[:-4] if name.endswith(":443") else name


def parse_time(text: str, start: int) -> int:
    """A time-range bound: epoch ms (``1796027905031``), ISO 8601 (``2026-11-30T08:40:00Z``; no
    zone means UTC) or an offset from the recording's start (``+2s``, ``+1500``). Raises ``ValueError``."""
    text = text.strip()
    if text.startswith("+"):
        from ..config import ConfigError, parse_duration_ms

        try:
            return start + parse_duration_ms(text[1:], "time")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is neither epoch ms, ISO 8601 nor +DURATION") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True)
class Filter:
    """Which rows (and decisions) to keep. Empty sets keep everything.

    ``peers`` match any spelling of a server name; ``rooms`` exactly; ``kinds``
    a decision kind (``inbound``, ``handshake``, ``backfill``) or a record kind;
    ``codes`` a live or replayed code, or one per-event result code;
    ``since`` / ``until`` (ms, inclusive / exclusive) the row's clock reading.
    """

    peers: frozenset[str] = field(default_factory=frozenset)
    rooms: frozenset[str] = field(default_factory=frozenset)
    kinds: frozenset[str] = field(default_factory=frozenset)
    codes: frozenset[str] = field(default_factory=frozenset)
    since: int | None = None
    until: int | None = None

    @classmethod
    def of(cls, *, peers: Iterable[str] = (), rooms: Iterable[str] = (), kinds: Iterable[str] = (),
           codes: Iterable[str] = (), since: int | None = None, until: int | None = None) -> "Filter":
        return cls(frozenset(p for p in (peer_key(x) for x in peers) if p), frozenset(rooms), frozenset(kinds),
                   frozenset(codes), since, until)

    @property
    def empty(self) -> bool:
        return not (self.peers or self.rooms or self.kinds or self.codes) and self.since is None and self.until is None

    def keeps(self, row: Mapping[str, Any], codes: Iterable[str | None] = ()) -> bool:
        """True if ``row`` (a decision or record row) passes; ``codes``: every code it carries."""
        if self.peers and peer_key(row.get("peer")) not in self.peers:
            return False
        if self.rooms and not (row.get("room") and set(str(row["room"]).split()) & self.rooms):
            return False
        if self.kinds and row.get("kind") not in self.kinds:
            return False
        if self.codes and not self.codes & {c for c in codes if c}:
            return False
        now = row.get("now")
        if self.since is not None and (now is None or now < self.since):
            return False
        if self.until is not None and (now is None or now >= self.until):
            return False
        return True

    def decisions(self, decisions: Sequence[Decision]) -> list[Decision]:
        """The decisions whose rows pass."""
        return [d for d in decisions if self.keeps(_decision_row(d), _decision_codes(d))]


def endpoint_of(target: str) -> str:
    parts = urlsplit(target).path.split("/")
    if len(parts) > 4 and parts[1] == "_scaiwave":
        return "backfill" if parts[4] == "rooms" else parts[4]
    return parts[-1] if parts else ""


def count_of(value: Any) -> int:
    """A recorded count or duration if it is a non-negative int, else 0 (a recording is not trusted)."""
    return value if type(value) is int and value >= 0 else 0


def _timing_sums(timings: Sequence[Mapping[str, Any]]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for key in TIMING_KEYS:
        values = [count_of(t[key]) for t in timings if type(t.get(key)) is int]
        if key == "total_us" and not values:  # a backfill page: its parts are its total
            values = [sum(count_of(t.get(k)) for k in TIMING_KEYS[:3]) for t in timings] if timings else []
        out[key] = sum(values) if values else None
    return out


def _decision_codes(d: Decision) -> set[str | None]:
    return {d.live.code, d.replay.code, *d.live.events, *d.replay.events} - {"ok"}


def _decision_row(d: Decision) -> dict[str, Any]:
    row: dict[str, Any] = {
        "index": d.index, "now": d.now, "peer": d.peer, "room": d.room, "kind": d.kind,
        "direction": "in" if d.kind == "inbound" else "out", "method": d.method, "endpoint": endpoint_of(d.target),
        "target": d.target, "live_verdict": d.live.verdict, "live_code": d.live.code, "live_status": d.live.status,
        "replay_verdict": d.replay.verdict, "replay_code": d.replay.code, "same": d.same, "comparable": d.comparable,
    }
    live, replay = d.live.counts(), d.replay.counts()
    if not d.comparable:
        live = dict.fromkeys(_COUNTS)
    row.update({f"live_{c}": live[c] for c in _COUNTS})
    row.update({f"replay_{c}": replay[c] for c in _COUNTS})
    row["pages"] = len(d.timings) if d.kind == "backfill" else None
    row.update(_timing_sums(d.timings))
    return row


def decision_rows(result: ReplayResult, where: Filter | None = None) -> list[dict[str, Any]]:
    """One row per decision (keys: :data:`DECISION_COLUMNS`), filtered by ``where``."""
    where = where or Filter()
    return [row for d in result.decisions
            if where.keeps(row := _decision_row(d), _decision_codes(d))]


def plain(value: Any) -> Any:
    """``value`` with bytes as ``{"$bytes": base64}`` and every map key a string (JSON-ready)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _error_code(value: Any) -> str | None:
    return value.get("code") if isinstance(value, Mapping) and isinstance(value.get("code"), str) else None


def _response_code(status: Any, response: Any) -> str | None:
    if status == 200 or not isinstance(response, bytes) or len(response) > 65536:
        return None
    from scaiwave_federation.core import decode

    value = decode(response, max_size=65536)
    return _error_code(value.get("error")) if isinstance(value, dict) else None


def _record_row(index: int, rec: Mapping[str, Any]) -> dict[str, Any]:
    kind = rec.get("kind")
    target = rec.get("target") if isinstance(rec.get("target"), str) else None
    peer = rec.get("peer") if isinstance(rec.get("peer"), str) else rec.get("server")
    if kind == "inbound":
        header = rec.get("authorization")
        claimed = parse_authorization(header) if isinstance(header, str) else None
        peer = None if claimed is None or isinstance(claimed, Refused) else claimed.origin
    room = rec.get("room_id") if isinstance(rec.get("room_id"), str) else None
    if room is None and target:
        parts = urlsplit(target).path.split("/")
        room = parts[5] if len(parts) > 5 and parts[4] in ("invite", "rooms") else None
    code = _error_code(rec.get("error")) or _response_code(rec.get("status"), rec.get("response"))
    timings = rec.get("timings") if isinstance(rec.get("timings"), Mapping) else (
        rec if kind == "backfill_page" else None)
    counts = {c: rec.get(c) if type(rec.get(c)) is int else None for c in _COUNTS}
    if kind == "backfill_end":
        counts["refused"] = None  # the pull's refusals are in its pages
    now = rec.get("received_at") if kind == "inbound" else rec.get("now")
    row: dict[str, Any] = {
        "index": index, "now": now if type(now) is int else None, "peer": peer if isinstance(peer, str) else None,
        "room": room, "kind": kind if isinstance(kind, str) else None,
        "direction": _DIRECTION.get(str(kind), "local"), "method": rec.get("method") if target else None,
        "endpoint": endpoint_of(target) if target else None, "target": target,
        "status": rec.get("status") if type(rec.get("status")) is int else None, "code": code, **counts,
    }
    row.update(_timing_sums([timings]) if timings else dict.fromkeys(TIMING_KEYS))
    row["record"] = plain(rec)
    return row


def record_rows(records: Sequence[Mapping[str, Any]], where: Filter | None = None) -> list[dict[str, Any]]:
    """One row per record (keys: :data:`RECORD_COLUMNS`; ``record``: the whole record,
    :func:`plain`), filtered by ``where``."""
    where = where or Filter()
    out = []
    for index, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            continue
        row = _record_row(index, rec)
        if where.keeps(row, (row["code"],)):
            out.append(row)
    return out


def write_jsonl(rows: Iterable[Mapping[str, Any]], out: TextIO) -> None:
    """One JSON object per line, keys in column order."""
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")


def write_csv(rows: Sequence[Mapping[str, Any]], out: TextIO, columns: Sequence[str]) -> None:
    """CSV with a header row; empty cells for ``None``, nested values (``record``) as JSON."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else
                         json.dumps(row[c], separators=(",", ":")) if isinstance(row.get(c), (dict, list)) else
                         str(row[c]).lower() if isinstance(row.get(c), bool) else row[c] for c in columns])
