"""Figure helpers shared by the figures: layout, footnotes, colours, axes."""
from __future__ import annotations

import textwrap

import numpy as np
from matplotlib.figure import Figure

from .runs import DPI


def new_figure(width: float, height: float):
    """A constrained-layout figure; returns the SubFigure to draw in (notes go in a strip below it)."""
    root = Figure(figsize=(width, height), layout="constrained", dpi=DPI)
    body, foot = root.subfigures(2, 1, height_ratios=[height, 1e-3])
    body.root, body.foot, body.height = root, foot, height
    return body


def footnote(fig, lines: list):
    """Notes in a strip under the figure, sized to fit them."""
    if not lines:
        return
    root = fig.root
    width_chars = max(int(root.get_figwidth() * 15), 40)
    text = "\n".join(textwrap.fill(f"\u2022 {ln}", width_chars, subsequent_indent="  ") for ln in lines)
    h = 0.13 * (text.count("\n") + 1) + 0.12
    root.set_size_inches(root.get_figwidth(), fig.height + h)
    fig._subplotspec.get_gridspec().set_height_ratios([fig.height, h])
    fig.foot.text(0.01, 1.0, text, ha="left", va="top", fontsize=7.5, color="0.25")


def empty_message(ax, msg: str):
    ax.text(0.5, 0.5, textwrap.fill(msg, 40), ha="center", va="center", transform=ax.transAxes,
            fontsize=9, color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])


PHASE_COLORS = {"data": "#8c564b", "noise": "#e377c2", "forward": "#2ca02c", "backward": "#d62728",
                "optimizer": "#9467bd", "send": "#1f77b4", "recv": "#17becf", "wait": "#ff7f0e",
                "sample": "#bcbd22", "metrics": "#7f7f7f", "checkpoint": "#393b79", "io": "#e7ba52"}
OTHER_COLOR = "#d9d9d9"


def phase_colors(phases) -> dict:
    extra = ["#637939", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354"]
    return {p: PHASE_COLORS.get(p, extra[i % len(extra)]) for i, p in enumerate(phases)}


def time_unit(seconds_max: float) -> tuple[str, float]:
    return ("ms", 1e3) if seconds_max < 1.0 else ("s", 1.0)


def cut_axis(ax):
    ax.set_xlabel("cut ratio c = k/T (client's share of the chain)")
    ax.set_xlim(-0.06, 1.06)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.grid(True, alpha=0.3)


def _jitter(i: int, n: int, width: float = 0.012) -> float:
    return 0.0 if n <= 1 else (i - (n - 1) / 2) * width
