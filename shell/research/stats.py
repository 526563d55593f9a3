"""``scaiwave replay --stats``: counts per peer and code, percentiles of the live
processing times, and the replay's speed next to the live core's.

Percentiles are nearest-rank (the smallest value with at least p % of the
values at or below it), so every figure printed is one that was measured.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Mapping, Sequence

from scaiwave_federation.core import Decision, ReplayResult

from .export import TIMING_KEYS, count_of, peer_key

__all__ = ["percentile", "timing_samples", "render_stats", "live_core_us", "events_of"]

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[int], p: float) -> int:
    """Nearest-rank percentile of ``values`` (non-empty)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _total(t: Mapping[str, Any]) -> int:
    if type(t.get("total_us")) is int:
        return count_of(t["total_us"])
    return sum(count_of(t.get(k)) for k in TIMING_KEYS[:3])


def timing_samples(decisions: Sequence[Decision]) -> dict[str, dict[str, list[int]]]:
    """``{"transaction": {...}, "backfill page": {...}}``: per measure (``decode_us``...) the samples.

    A transaction is an inbound ``send`` that reached the core's decision
    (its decode time is recorded); a backfill page is one ``backfill_page``.
    """
    out: dict[str, dict[str, list[int]]] = {"transaction": {}, "backfill page": {}}
    for d in decisions:
        if d.kind == "inbound" and "/send/" in d.target:
            group, samples = out["transaction"], [t for t in d.timings if t.get("decode_us")]
        elif d.kind == "backfill":
            group, samples = out["backfill page"], list(d.timings)
        else:
            continue
        for t in samples:
            for key in TIMING_KEYS[:3]:
                if type(t.get(key)) is int:
                    group.setdefault(key, []).append(count_of(t[key]))
            group.setdefault("total_us", []).append(_total(t))
    return out


def events_of(d: Decision) -> int:
    """Events the core checked for this decision, live: a transaction's results, a pull's stored + refused."""
    if d.kind == "inbound":
        return len(d.live.events)
    if d.kind == "backfill":
        return sum(count_of(t.get("stored")) + count_of(t.get("refused")) for t in d.timings)
    return 0


def live_core_us(decisions: Sequence[Decision]) -> tuple[int, int]:
    """``(events, µs)``: events the live core decoded and verified, and the time it took
    (decode + verify of transactions and backfill pages; storage not counted)."""
    events = us = 0
    for d in decisions:
        timed = [t for t in d.timings if t.get("decode_us") or t.get("verify_us")]
        if not timed or d.kind not in ("inbound", "backfill"):
            continue
        events += events_of(d)
        us += sum(count_of(t.get("decode_us")) + count_of(t.get("verify_us")) for t in timed)
    return events, us


def _fmt_us(us: int) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us} us"


def render_stats(result: ReplayResult, decisions: Sequence[Decision], replay_seconds: float) -> str:
    """The ``--stats`` block for ``decisions`` (the filtered ones of ``result``)."""
    lines = ["stats:"]
    per_peer: dict[str, Counter[str]] = {}
    for d in decisions:
        label = d.live.verdict if d.live.code is None else d.live.code
        if not d.comparable:
            label = f"{d.replay.verdict if d.replay.code is None else d.replay.code} (replay)"
        per_peer.setdefault(peer_key(d.peer) or "?", Counter())[label] += 1
    lines.append("  decisions per peer and outcome (live; a refusal by its code):")
    for peer in sorted(per_peer):
        counts = per_peer[peer]
        lines.append(f"    {peer}: " + ", ".join(f"{k} {counts[k]}" for k in sorted(counts)))
    events = Counter[str]()
    for d in decisions:
        for key, value in d.live.counts().items():
            if value is not None and d.comparable:
                events[key] += value
    lines.append(f"  events (live): stored {events['stored']}, echoed {events['echoed']}, "
                 f"refused {events['refused']}  (stored: newly written; echoed: accepted, already held; "
                 "refused: refused with a code)")
    samples = timing_samples(decisions)
    for group, measures in samples.items():
        if not measures.get("total_us"):
            lines.append(f"  {group} times: none recorded")
            continue
        n = len(measures["total_us"])
        lines.append(f"  {group} times ({n}), " + ", ".join(f"p{p}" for p in PERCENTILES) + ", max:")
        for key in TIMING_KEYS:
            values = measures.get(key)
            if values:
                figures = [_fmt_us(percentile(values, p)) for p in PERCENTILES] + [_fmt_us(max(values))]
                lines.append(f"    {key[:-3]:<7} " + " / ".join(figures))
    live_events, live_us = live_core_us(decisions)
    replayed = sum(events_of(d) for d in result.decisions if d.kind in ("inbound", "backfill"))
    if live_events and live_us:
        live_rate = live_events / (live_us / 1e6)
        line = f"  speed: live core {live_events} events in {_fmt_us(live_us)} (decode + verify) = {live_rate:,.0f} events/s"
        if replay_seconds > 0 and replayed:
            rate = replayed / replay_seconds
            line += (f"; replay {replayed} events in {replay_seconds * 1000:.2f} ms (whole recording) = "
                     f"{rate:,.0f} events/s, {rate / live_rate:.2f}x live")
        lines.append(line)
    else:
        lines.append("  speed: the recording holds no live processing times (recorded before they were added)")
    return "\n".join(lines) + "\n"
