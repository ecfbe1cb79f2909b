"""PNG plots of the quality report (matplotlib, Agg canvas; never touches pyplot's global state).

Importing this module raises ``ImportError`` when matplotlib is missing; the report catches it.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_DPI = 120
_MAX_BARS = 60
_BASE = "#4C72B0"
_WORST = "#C44E52"
_PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _short(name: str) -> str:
    """Drop the boilerplate ``model.`` prefix so labels stay readable."""
    return name[len("model."):] if name.startswith("model.") else name


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI, bbox_inches="tight", facecolor="white")
    return path


def plot_layer_errors(rows: list[dict], path: Path, n_worst: int = 3) -> Path:
    """Horizontal bars of SQNR per module (network order), the ``n_worst`` lowest in red."""
    finite = [r for r in rows if isinstance(r.get("sqnr_db"), (int, float)) and math.isfinite(r["sqnr_db"])]
    exact = len(rows) - len(finite)
    subtitle = []
    if len(finite) > _MAX_BARS:
        # Too many for one readable chart: show the worst offenders, worst on top.
        subtitle.append(f"the {_MAX_BARS} lowest of {len(finite)} modules, lowest first")
        finite = sorted(finite, key=lambda r: (r["sqnr_db"], _natural_key(r["module"])))[:_MAX_BARS]
    else:
        finite = sorted(finite, key=lambda r: _natural_key(r["module"]))  # network order
    if exact:
        subtitle.append(f"{exact} module(s) with identical outputs not shown")
    worst = {r["module"] for r in sorted(finite, key=lambda r: r["sqnr_db"])[: min(n_worst, max(1, len(finite) // 4))]}

    n = max(1, len(finite))
    fig = _new_figure(9.0, max(2.8, 0.26 * n + 1.4))
    ax = fig.add_subplot(1, 1, 1)
    if finite:
        values = [r["sqnr_db"] for r in finite]
        colors = [_WORST if r["module"] in worst else _BASE for r in finite]
        y = list(range(len(finite)))
        ax.barh(y, values, color=colors, height=0.7)
        ax.set_yticks(y)
        ax.set_yticklabels([_short(r["module"]) for r in finite], fontsize=8)
        ax.set_ylim(len(finite) - 0.5, -0.5)  # first row on top, no empty margins
        span = max(values) - min(0.0, min(values))
        for yi, v, r in zip(y, values, finite):
            if r["module"] in worst:
                ax.text(v + 0.01 * span, yi, f"{v:.1f} dB", va="center", fontsize=8, color=_WORST)
        ax.set_xlim(min(0.0, min(values)), max(values) + 0.12 * span if span else 1.0)
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=_WORST, label=f"lowest SQNR ({len(worst)})"), Patch(color=_BASE, label="other modules")],
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "all compared modules are exact (SQNR = inf)", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlabel("SQNR (dB), higher is better")
    title = "Per-module output SQNR, quantized vs float model (end to end: includes upstream error)"
    ax.set_title(title + (f"\n({'; '.join(subtitle)})" if subtitle else ""), fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    return _save(fig, path)


def plot_sensitivity(rows: list[dict], path: Path) -> Path:
    """Horizontal bars of the loss increase of the most sensitive modules (largest on top)."""
    rows = sorted(rows, key=lambda r: -r["loss_increase"])[:_MAX_BARS]
    n = max(1, len(rows))
    fig = _new_figure(9.0, max(2.6, 0.32 * n + 1.4))
    ax = fig.add_subplot(1, 1, 1)
    y = list(range(len(rows)))
    values = [r["loss_increase"] for r in rows]
    ax.barh(y, values, color=[_WORST if i == 0 else _BASE for i in y], height=0.7)
    ax.set_yticks(y)
    ax.set_yticklabels([_short(r["module"]) for r in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # largest on top
    span = (max(values) - min(0.0, min(values))) if values else 1.0
    for yi, v in zip(y, values):
        ax.text(v + 0.01 * span, yi, f"{v:+.4f}", va="center", fontsize=8)
    if values:
        ax.set_xlim(min(0.0, min(values)), max(values) + 0.18 * span if span else 1.0)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("loss increase attributed to the module's quantization (nats/token for NLL losses)")
    ax.set_title(f"Most sensitive modules (top {len(rows)})", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    return _save(fig, path)


def plot_size(size: dict, path: Path) -> Path:
    """Stacked bars of float vs quantized bytes (MiB) split by precision."""
    by = size["by_precision"]
    precisions = []
    for side in ("float", "quantized"):
        for prec, _ in sorted(by.get(side, {}).items(), key=lambda kv: -kv[1]):
            if prec not in precisions:
                precisions.append(prec)
    fig = _new_figure(6.5, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    labels = ["float", "quantized"]
    bottoms = [0.0, 0.0]
    mib = 2.0**20
    for i, prec in enumerate(precisions):
        heights = [by.get(side, {}).get(prec, 0) / mib for side in labels]
        ax.bar(labels, heights, bottom=bottoms, color=_PALETTE[i % len(_PALETTE)], label=prec, width=0.55,
               edgecolor="white", linewidth=0.6)
        for x, (b, h) in enumerate(zip(bottoms, heights)):
            if h > 0.06 * max(1e-9, size["float_bytes"] / mib, size["quantized_bytes"] / mib):
                ax.text(x, b + h / 2, f"{h:,.1f}", ha="center", va="center", fontsize=8, color="white")
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    totals = [size["float_bytes"] / mib, size["quantized_bytes"] / mib]
    top = max(totals) if max(totals) > 0 else 1.0
    for x, total in enumerate(totals):
        ax.text(x, total + 0.02 * top, f"{total:,.2f} MiB", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel("size in memory (MiB)")
    ratio = size.get("ratio")
    ax.set_title("Model size by precision" + (f" ({ratio:.2f}x smaller)" if ratio else ""), fontsize=11)
    ax.legend(title="precision", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _save(fig, path)
