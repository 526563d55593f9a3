"""``scaiwave replay --plot FILE.png``: a timeline of the decisions, two rows per peer.

One row for what the peer asked us (``inbound``), one for what we started
(``ours``: handshakes and backfills).

- accepted or peered decisions: grey dots (a transaction's dot grows with
  its events);
- refusals: one colour per code, named in the legend;
- a backfill: a bar from its start to its end, and a tick per page;
- a decision the what-if changed: ringed in black.

matplotlib is an optional extra (``pip install scaiwave-federation[research]``);
without it :func:`plot` raises :class:`PlotUnavailable` with that hint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from scaiwave_federation.core import Decision

from .export import peer_key

__all__ = ["PlotUnavailable", "plot"]

#: Fixed colours per code (the rest cycle through the palette), so pictures compare.
_PALETTE = ("#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#1f77b4")


class PlotUnavailable(Exception):
    """matplotlib is not installed."""


def _row(d: Decision) -> str:
    """One row per peer and direction: what it asked us, what we asked it."""
    return f"{peer_key(d.peer) or '?'} {'inbound' if d.kind == 'inbound' else 'ours'}"


def plot(decisions: Sequence[Decision], path: Path | str, *, title: str, start: int | None = None) -> Path:
    """Draw ``decisions`` to the PNG ``path``; returns it. Raises :class:`PlotUnavailable`
    without matplotlib, ``OSError`` if the file cannot be written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError as exc:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'scaiwave-federation[research]'") from exc
    timed = [d for d in decisions if d.now is not None]
    origin = start if start is not None else min((d.now for d in timed if d.now is not None), default=0)
    peers = sorted({_row(d) for d in timed})
    row = {p: i for i, p in enumerate(peers)}
    codes = sorted({d.replay.code for d in timed if d.replay.code})
    colour = {c: _PALETTE[i % len(_PALETTE)] for i, c in enumerate(codes)}
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.7 * max(1, len(peers))), dpi=110)
    for d in timed:
        assert d.now is not None  # (timed)
        x, y = (d.now - origin) / 1000, row[_row(d)]
        if d.kind == "backfill":
            pages = [p for p in d.timings if type(p.get("now")) is int]
            end = max([p["now"] for p in pages], default=d.now)
            ax.barh(y, max((end - d.now) / 1000, 0.02), left=x, height=0.35, color="#9ecae1", edgecolor="#3182bd")
            for p in pages:
                ax.vlines((p["now"] - origin) / 1000, y - 0.2, y + 0.2, color="#08519c", linewidth=1)
        size = 30 + 3 * min(len(d.replay.events), 100)
        face = colour[d.replay.code] if d.replay.code else "#7f7f7f"
        ax.scatter([x], [y], s=size, color=face, zorder=3,
                   edgecolors="black" if not d.same else "none", linewidths=1.5)
    ax.set_yticks(range(len(peers)), peers)
    ax.set_ylim(-0.8, len(peers) - 0.2)
    ax.set_xlabel("seconds since the recording started")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    handles = [Line2D([], [], marker="o", linestyle="", color="#7f7f7f", label="accepted / peered / done")]
    handles += [Line2D([], [], marker="o", linestyle="", color=colour[c], label=f"refused {c}") for c in codes]
    handles.append(Line2D([], [], color="#3182bd", linewidth=6, label="backfill (ticks: pages)"))
    if any(not d.same for d in timed):
        handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="white", markeredgecolor="black",
                              label="differs from live"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
