"""``scaiwave replay`` and the replay API for researchers.

The engine is pure and lives in the core (:mod:`scaiwave_federation.core.replay`);
this module reads recording files and policy files, renders the decisions as
text and runs the command::

    from scaiwave_federation.shell.research.replay import open_recording, replay, render

    recording = open_recording("rec.cbor")
    for record in recording.records:          # plain dicts, see shell/recorder.py
        print(record["kind"], record["now"])
    result = replay(recording, policy={"default_mode": "closed"}, clock_offset="31d")
    for decision in result.decisions:         # core.replay.Decision dataclasses
        if not decision.same:
            print(decision.index, decision.live.short(), "->", decision.replay.short())
    print(render(result), end="")

Output lines are stable: two replays of the same file with the same settings
print the same bytes.
"""

from __future__ import annotations

import json
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping


from scaiwave_federation.core import LocalProtocolError, Policy
from scaiwave_federation.core import SUBSTITUTE_SEED, Decision, Outcome, ReplayResult, replay_records

from ..config import ConfigError, parse_duration_ms
from ..recorder import RecordingError, read_recording

__all__ = [
    "Recording", "open_recording", "load_policy", "replay", "render", "replay_main",
    "Decision", "Outcome", "ReplayResult", "RecordingError",
]


@dataclass(frozen=True)
class Recording:
    """A recording read into memory.

    ``records`` are the dicts after the header, in file order (``#N`` in the
    output is an index into this list). ``torn`` is True when the file ended
    inside a record (a crash mid-write); everything before it is here.
    """

    path: Path | None
    header: dict[str, Any]
    records: list[dict[str, Any]]
    torn: bool = False

    @property
    def server_name(self) -> str:
        """The recording daemon's server name (from the header)."""
        return str(self.header.get("server_name", ""))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """The records of one kind (``inbound``, ``outbound``, ``descriptor``...)."""
        return [r for r in self.records if r.get("kind") == kind]


def open_recording(path: Path | str) -> Recording:
    """Read a recording file. Raises :class:`RecordingError` if it is not one
    (or of a newer version) and ``OSError`` if it cannot be read."""
    path = Path(path)
    header, records, torn = read_recording(path)
    return Recording(path, header, records, torn)


def load_policy(path: Path | str) -> Policy:
    """A policy file: JSON or TOML ``{default_mode, allowed_peers, blocked_peers}``
    (``.toml`` is TOML, anything else is tried as JSON, then TOML).
    Raises ``ValueError`` naming the file when it cannot be used."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--policy {path}: cannot read it ({exc})") from exc
    data: Any = None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError):
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"--policy {path}: neither JSON nor TOML ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"--policy {path}: expected {{default_mode, allowed_peers, blocked_peers}}")
    try:
        return Policy.from_dict(data)
    except LocalProtocolError as exc:
        raise ValueError(f"--policy {path}: {exc}") from exc


def replay(recording: Recording | Path | str, *, policy: Policy | Mapping[str, Any] | Path | None = None,
           clock_offset: int | str = 0, seed: bytes = SUBSTITUTE_SEED,
           key_clock_offset: int | str = 0) -> ReplayResult:
    """Drive a fresh core with ``recording`` and collect its decisions.

    ``policy``: a :class:`Policy`, its dict form or a policy file; replaces
    the recorded policies (what-if). ``clock_offset``: milliseconds or a
    duration like ``"31d"``/``"-2h"``, added to every clock reading (what-if).
    ``key_clock_offset``: the same forms; key validity (the 30-day grace of a
    rotated-out key, the event-time rule) is judged that far ahead while
    request freshness stays at the recorded clock (what-if, docs/replay.md).
    Returns a :class:`ReplayResult`; raises ``RecordingError``/``OSError`` for
    a file that cannot be read, ``ValueError``/``ConfigError`` for bad settings.
    """
    if not isinstance(recording, Recording):
        recording = open_recording(recording)
    if isinstance(policy, Path):
        policy = load_policy(policy)
    elif isinstance(policy, Mapping):
        policy = Policy.from_dict(policy)
    offset = parse_duration_ms(clock_offset, "--clock-offset", allow_negative=True)
    key_offset = parse_duration_ms(key_clock_offset, "--key-clock-offset", allow_negative=True)
    result = replay_records(recording.server_name, recording.records, policy=policy, clock_offset_ms=offset,
                            seed=seed, key_offset_ms=key_offset)
    if recording.torn:
        result.notes.append(f"the file ends inside a record: replayed the {len(recording.records)} complete records")
    return result


# -- text output ------------------------------------------------------------------------


def _line(d: Decision, what_if: bool) -> str:
    direction = "from" if d.kind == "inbound" else "to"
    text = f"#{d.index} {d.kind} {d.method} {d.target} {direction} {d.peer}: {d.replay.text()} | live {d.live.text()}"
    if not d.same:
        text += f" | {'CHANGED' if what_if else 'MISMATCH'} live={d.live.short()} replay={d.replay.short()}"
    return text


def _tally(outcomes: list[Outcome]) -> str:
    verdicts = Counter(o.verdict for o in outcomes)
    parts = []
    for verdict in sorted(verdicts):
        part = f"{verdict} {verdicts[verdict]}"
        codes = Counter(o.code for o in outcomes if o.verdict == verdict and o.code)
        if codes:
            part += " (" + ", ".join(f"{c} {codes[c]}" for c in sorted(codes)) + ")"
        parts.append(part)
    return ", ".join(parts) or "none"


_SKIPPED = {
    "outbound": "outbound requests (the peer decided those)",
    "descriptor": "descriptor fetches no replayed decision asked for",
}


def _events(outcomes: list[Outcome]) -> str | None:
    """Event counts, one meaning each (``Outcome.counts``); ``None`` when there are none."""
    totals = {"stored": 0, "echoed": 0, "refused": 0, "not told": 0}
    known = False
    for outcome in outcomes:
        counts = outcome.counts()
        if outcome.events and counts["stored"] is None:  # accepted, stored or echoed: not recorded
            counts["not told"] = len(outcome.events) - (counts["refused"] or 0)
        for key, value in counts.items():
            if value is not None and (value or outcome.events or outcome.count is not None):
                totals[key] += value
                known = True
    if not known:
        return None
    return ", ".join(f"{k} {v}" for k, v in totals.items() if v or k != "not told")


def render(result: ReplayResult, decisions: list[Decision] | None = None) -> str:
    """The replay as text: one line per decision, the notes, then a summary.

    ``decisions``: a subset of ``result.decisions`` to show and count (a filter).
    """
    shown = result.decisions if decisions is None else decisions
    lines = [_line(d, result.what_if) for d in shown]
    lines += [f"note: {n}" for n in result.notes]
    kinds = Counter(d.kind for d in shown)
    compared = [d for d in shown if d.comparable]
    differing = [d for d in shown if not d.same]
    lines.append(f"summary: {len(shown)} decisions of {result.server_name}"
                 + (" (" + ", ".join(f"{k} {kinds[k]}" for k in sorted(kinds)) + ")" if kinds else ""))
    lines.append(f"  replay: {_tally([d.replay for d in shown])}")
    lines.append(f"  live:   {_tally([d.live for d in compared])}")
    replayed, live = _events([d.replay for d in shown]), _events([d.live for d in compared])
    if replayed or live:
        lines.append(f"  events, replay: {replayed or 'none'}; live: {live or 'none'}")
        lines.append("    (stored: newly written; echoed: accepted, already held; refused: refused with a code)")
    label = "changed by the what-if" if result.what_if else "mismatches"
    lines.append(f"  same as live: {len(compared) - len(differing)}, {label}: {len(differing)}"
                 + (f", not comparable: {len(shown) - len(compared)}" if len(compared) < len(shown) else ""))
    if result.skipped:
        lines.append("  not replayed: " + ", ".join(
            f"{_SKIPPED.get(kind, kind + ' records')}: {n}" for kind, n in sorted(result.skipped.items())))
    return "\n".join(lines) + "\n"


def replay_main(recording: Path, *, policy_file: Path | None = None, clock_offset: str = "0") -> int:
    """``scaiwave replay RECORDING [--policy FILE] [--clock-offset 31d]``.

    Prints the decisions and a summary. Returns 0 (also when a what-if changes
    decisions), 1 when a plain replay disagrees with the live decisions, 2 when
    the file or a setting cannot be used.
    """
    try:
        offset = parse_duration_ms(clock_offset, "--clock-offset", allow_negative=True)
        policy = load_policy(policy_file) if policy_file is not None else None
        rec = open_recording(recording)
    except (ConfigError, ValueError, RecordingError, OSError) as exc:
        print(f"scaiwave replay: {exc}", file=sys.stderr)
        return 2
    result = replay(rec, policy=policy, clock_offset=offset)
    if result.what_if:
        settings = []
        if policy is not None:
            settings.append("policy " + json.dumps(policy.as_dict(), sort_keys=True))
        if offset:
            settings.append(f"clock offset {offset:+d} ms")
        sys.stdout.write(f"what-if: {'; '.join(settings)}\n")
    sys.stdout.write(render(result))
    sys.stdout.flush()
    return 1 if result.differing and not result.what_if else 0
