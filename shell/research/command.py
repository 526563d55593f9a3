"""``scaiwave replay`` options for research, and ``scaiwave replay diff``.

``scaiwave replay RECORDING`` prints the decisions (:mod:`..replay`); with
``--export jsonl|csv`` it prints rows instead (:mod:`.export`), with
``--stats`` a statistics block after the summary (:mod:`.stats`), with
``--plot FILE.png`` it also draws the timeline (:mod:`.plot`). The filters
(``--peer``, ``--room``, ``--kind``, ``--code``, ``--since``, ``--until``)
apply to all of them. ``scaiwave replay diff LEFT [RIGHT]`` compares two
replays (:mod:`.diff`).

Exit status: 0; 1 when a plain replay disagrees with live (without
``--export``), or when ``diff`` finds differences; 2 when a file or an
option cannot be used (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError, parse_duration_ms
from ..recorder import RecordingError
from .replay import Recording, load_policy, open_recording, render, replay
from .export import DECISION_COLUMNS, RECORD_COLUMNS, Filter, decision_rows, parse_time, record_rows, write_csv, write_jsonl

__all__ = ["add_replay_options", "run"]

_KINDS = ("inbound", "handshake", "backfill", "policy", "settings", "own_keys", "descriptor", "nonces", "outbound",
          "handshake_start", "handshake_end", "backfill_start", "backfill_end", "backfill_page")


def add_replay_options(rp: argparse.ArgumentParser) -> None:
    """The ``scaiwave replay`` arguments (RECORDING, or ``diff LEFT [RIGHT]``)."""
    rp.add_argument("recording", help="the recording, or `diff` followed by LEFT [RIGHT]")
    rp.add_argument("more", nargs="*", metavar="RIGHT", help=argparse.SUPPRESS)
    rp.add_argument("--policy", type=Path, help="JSON/TOML policy file: replay under this policy (what-if)")
    rp.add_argument("--clock-offset", default="0", help="shift every clock reading (e.g. 31d): what-if")
    rp.add_argument("--key-clock-offset", default="0",
                    help="judge key validity (30-day grace, event-time rule) this far ahead, request "
                         "freshness at the recorded clock (e.g. 31d): what-if")
    rp.add_argument("--export", choices=("jsonl", "csv"), help="print rows instead of the decisions' text")
    rp.add_argument("--rows", choices=("decisions", "records"), default="decisions",
                    help="--export one row per decision (default) or per record")
    rp.add_argument("--stats", action="store_true", help="counts per peer and code, timing percentiles, speed")
    rp.add_argument("--plot", type=Path, metavar="FILE.png", help="draw a timeline of the decisions (needs matplotlib)")
    for name, what in (("peer", "a server name"), ("room", "a room id"), ("kind", "decision or record kind"),
                       ("code", "a refusal code")):
        rp.add_argument(f"--{name}", action="append", default=[], metavar=name.upper(),
                        help=f"keep only rows of {what} (repeatable)")
    rp.add_argument("--since", help="keep rows at or after: epoch ms, ISO 8601, or +DURATION from the start")
    rp.add_argument("--until", help="keep rows before: epoch ms, ISO 8601, or +DURATION from the start")
    for name in ("policy", "clock-offset", "key-clock-offset"):
        rp.add_argument(f"--right-{name}", type=Path if name == "policy" else str,
                        default=None if name == "policy" else "0",
                        help=f"diff: --{name} for the right side")


class _Unusable(Exception):
    pass


def _settings(policy: Path | None, clock: str, key_clock: str) -> dict[str, Any]:
    try:
        return {"policy": load_policy(policy) if policy is not None else None,
                "clock_offset": parse_duration_ms(clock, "--clock-offset", allow_negative=True),
                "key_offset": parse_duration_ms(key_clock, "--key-clock-offset", allow_negative=True)}
    except (ConfigError, ValueError) as exc:
        raise _Unusable(str(exc)) from None


def _describe(path: Path, settings: dict[str, Any]) -> str:
    parts = [str(path)]
    if settings["policy"] is not None:
        parts.append("policy " + json.dumps(settings["policy"].as_dict(), sort_keys=True))
    if settings["clock_offset"]:
        parts.append(f"clock offset {settings['clock_offset']:+d} ms")
    if settings["key_offset"]:
        parts.append(f"key clock offset {settings['key_offset']:+d} ms")
    return "; ".join(parts)


def _filter(args: argparse.Namespace, rec: Recording) -> Filter:
    for kind in args.kind:
        if kind not in _KINDS:
            raise _Unusable(f"--kind {kind!r}: one of {', '.join(_KINDS)}")
    started = rec.header.get("started_at")
    start: int = started if isinstance(started, int) else 0
    try:
        since = parse_time(args.since, start) if args.since else None
        until = parse_time(args.until, start) if args.until else None
    except ValueError as exc:
        raise _Unusable(f"--since/--until: {exc}") from None
    return Filter.of(peers=args.peer, rooms=args.room, kinds=args.kind, codes=args.code, since=since, until=until)


def _open(path: Path) -> Recording:
    try:
        return open_recording(path)
    except (RecordingError, OSError) as exc:
        raise _Unusable(str(exc)) from None


def _run(args: argparse.Namespace) -> int:
    if args.recording == "diff":
        return _diff(args)
    if args.more:
        raise _Unusable(f"one recording at a time (did you mean `scaiwave replay diff {args.recording} ...`?)")
    settings = _settings(args.policy, args.clock_offset, args.key_clock_offset)
    if args.plot is not None and not args.plot.absolute().parent.is_dir():
        raise _Unusable(f"--plot {args.plot}: no such directory {args.plot.absolute().parent}")
    rec = _open(Path(args.recording))
    where = _filter(args, rec)
    started = time.perf_counter()
    result = replay(rec, policy=settings["policy"], clock_offset=settings["clock_offset"],
                    key_clock_offset=settings["key_offset"])
    seconds = time.perf_counter() - started
    decisions = where.decisions(result.decisions)
    out = sys.stdout
    if args.export:
        if args.rows == "records":
            rows, columns = record_rows(rec.records, where), RECORD_COLUMNS
        else:
            rows, columns = decision_rows(result, where), DECISION_COLUMNS
        write_jsonl(rows, out) if args.export == "jsonl" else write_csv(rows, out, columns)
    else:
        if result.what_if:
            out.write(f"what-if: {_describe(Path(args.recording), settings).split('; ', 1)[1]}\n")
        if not where.empty:
            out.write(f"filter: {len(decisions)} of {len(result.decisions)} decisions\n")
        out.write(render(result, decisions))
        if args.stats:
            from .stats import render_stats

            out.write(render_stats(result, decisions, seconds))
    if args.plot:
        from .plot import PlotUnavailable, plot

        try:
            plot(decisions, args.plot, title=f"{result.server_name}: {_describe(Path(args.recording), settings)}",
                 start=rec.header.get("started_at") if type(rec.header.get("started_at")) is int else None)
        except PlotUnavailable as exc:
            raise _Unusable(str(exc)) from None
        except OSError as exc:
            raise _Unusable(f"--plot {args.plot}: {exc}") from None
        print(f"plot: {args.plot}", file=sys.stderr)
    out.flush()
    return 1 if result.differing and not result.what_if and not args.export else 0


def _diff(args: argparse.Namespace) -> int:
    if not 1 <= len(args.more) <= 2:
        raise _Unusable("usage: scaiwave replay diff LEFT [RIGHT] (RIGHT defaults to LEFT)")
    for option in ("export", "stats", "plot"):
        if getattr(args, option):
            raise _Unusable(f"--{option} is not for diff")
    left_path = Path(args.more[0])
    right_path = Path(args.more[1]) if len(args.more) == 2 else left_path
    left_settings = _settings(args.policy, args.clock_offset, args.key_clock_offset)
    right_settings = _settings(args.right_policy, args.right_clock_offset, args.right_key_clock_offset)
    from .diff import render_diff

    left_rec = _open(left_path)
    right_rec = left_rec if right_path == left_path else _open(right_path)
    results = [replay(rec, policy=s["policy"], clock_offset=s["clock_offset"], key_clock_offset=s["key_offset"])
               for rec, s in ((left_rec, left_settings), (right_rec, right_settings))]
    text, differing = render_diff(
        results[0], results[1], _describe(left_path, left_settings), _describe(right_path, right_settings),
        _filter(args, left_rec).decisions(results[0].decisions),
        _filter(args, right_rec).decisions(results[1].decisions))
    sys.stdout.write(text)
    sys.stdout.flush()
    return 1 if differing else 0


def run(args: argparse.Namespace) -> int:
    """Run ``scaiwave replay`` from parsed arguments; returns the exit status."""
    try:
        return _run(args)
    except _Unusable as exc:
        print(f"scaiwave replay: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`| head`): not an error of ours. Point stdout
        # at devnull so the interpreter's final flush does not fail again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
