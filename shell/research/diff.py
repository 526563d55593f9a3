"""``scaiwave replay diff``: two replays side by side, the decisions that differ, counts per code.

The two sides are two recordings, or one recording under two settings
(policies, clock offsets, key-clock offsets). Each side's *replayed*
decisions are compared (a side without a what-if replays its live decisions,
so a plain side stands for what happened).

Decisions are paired by their shape, not their bytes: the kind, the
endpoint and the method, in order (:class:`difflib.SequenceMatcher` over
those, so a run with one request more still lines up). Two runs of the same
scenario differ in room ids, transaction ids and ports; the shape does not.
Within one recording the pairs are simply the same records.
"""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from scaiwave_federation.core import Decision, ReplayResult

from .export import endpoint_of

__all__ = ["Pair", "pair_decisions", "render_diff"]


@dataclass(frozen=True)
class Pair:
    """Two decisions in the same place of each run (``None``: only one side has it)."""

    left: Decision | None
    right: Decision | None

    @property
    def differs(self) -> bool:
        if self.left is None or self.right is None:
            return True
        return not self.left.replay.matches(self.right.replay)


def _shape(d: Decision) -> tuple[str, str, str]:
    return d.kind, d.method, endpoint_of(d.target)


def pair_decisions(left: Sequence[Decision], right: Sequence[Decision]) -> list[Pair]:
    """Every decision of both sides, paired where their shapes line up, in order."""
    matcher = difflib.SequenceMatcher(a=[_shape(d) for d in left], b=[_shape(d) for d in right], autojunk=False)
    pairs: list[Pair] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
            pairs += [Pair(left[i], right[j]) for i, j in zip(range(i1, i2), range(j1, j2))]
            continue
        pairs += [Pair(left[i], None) for i in range(i1, i2)]
        pairs += [Pair(None, right[j]) for j in range(j1, j2)]
    return pairs


def _side(d: Decision | None) -> str:
    if d is None:
        return "-"
    return f"#{d.index} {d.replay.short()}"


def _what(d: Decision) -> str:
    direction = "from" if d.kind == "inbound" else "to"
    return f"{d.kind} {d.method} {endpoint_of(d.target)} {direction} {d.peer}"


def _codes(decisions: Sequence[Decision]) -> Counter[str]:
    """Decisions per outcome: the verdict, or the code of a refusal; per-event refusals too."""
    out: Counter[str] = Counter()
    for d in decisions:
        out[d.replay.code or d.replay.verdict] += 1
        for e in d.replay.events:
            if e != "ok":
                out[f"event {e}"] += 1
    return out


def render_diff(left: ReplayResult, right: ReplayResult, left_label: str, right_label: str,
                left_decisions: Sequence[Decision] | None = None,
                right_decisions: Sequence[Decision] | None = None) -> tuple[str, int]:
    """The diff as text, and how many pairs differ."""
    ld = list(left.decisions if left_decisions is None else left_decisions)
    rd = list(right.decisions if right_decisions is None else right_decisions)
    pairs = pair_decisions(ld, rd)
    differing = [p for p in pairs if p.differs]
    width = max([len(_side(p.left)) for p in differing] + [len("left")])
    right_width = max([len(_side(p.right)) for p in differing] + [len("right")])
    lines = [f"left:  {left_label}", f"right: {right_label}"]
    if differing:
        lines.append(f"{'left':<{width}} | {'right':<{right_width}} | decision")
    for p in differing:
        ref = p.left or p.right
        assert ref is not None
        lines.append(f"{_side(p.left):<{width}} | {_side(p.right):<{right_width}} | {_what(ref)}")
    lc, rc = _codes(ld), _codes(rd)
    lines.append(f"summary: {len(pairs)} decisions paired, {len(pairs) - len(differing)} the same, "
                 f"{len(differing)} differ ({sum(1 for p in pairs if p.left is None or p.right is None)} on one side only)")
    lines.append("  outcome            left  right")
    for code in sorted(set(lc) | set(rc)):
        mark = "" if lc[code] == rc[code] else "  *"
        lines.append(f"  {code:<18} {lc[code]:>4}  {rc[code]:>5}{mark}")
    return "\n".join(lines) + "\n", len(differing)
