"""The report's figures, each drawn from plain data into a PNG file.

Figures are :class:`matplotlib.figure.Figure` objects saved with the Agg canvas: no pyplot, no global backend, no
display needed, safe to call from any thread.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

#: marker per stage role (see ``records.STAGE_ROLES``)
ROLE_MARKERS = {"teacher": "^", "student alone": "s", "distilled": "o"}
#: how a run's status shows on a timeline bar (whose fill is its node): edge colour, edge width, hatch
STATUS_STYLES = {"FINISHED": ("black", 0.5, ""), "FAILED": ("tab:red", 2.0, "xx"), "KILLED": ("dimgray", 2.0, ".."),
                 "RUNNING": ("tab:orange", 2.0, "")}
OTHER_STATUS = ("tab:purple", 2.0, "")
#: fill and legend entry of a stage run that recorded no node (it trained nothing on Ray Train, or was reused)
NO_NODE_COLOUR = "lightgray"
NO_NODE = "no node recorded"
REUSED_HATCH = "//"
DPI = 110


@dataclass(frozen=True)
class Point:
    """One stage's model on the accuracy-compression plane."""

    group: str  # legend entry (the stage name)
    role: str
    compression: float
    accuracy: float


@dataclass(frozen=True)
class Line:
    label: str
    points: list[tuple[int, float]]


@dataclass(frozen=True)
class Panel:
    title: str
    lines: list[Line]


@dataclass(frozen=True)
class Spread:
    """One group's value per seed (e.g. a variant's test accuracy), drawn as its mean ± sample std."""

    label: str
    values: dict[str, float]  # seed -> value


@dataclass(frozen=True)
class Bar:
    """One stage run on the timeline, in seconds since its pipeline run started."""

    row: str
    start_s: float
    end_s: float
    status: str
    reused: bool
    nodes: tuple[str, ...] = ()  # the node(s) it ran on (its Train workers'); () when none were recorded


@dataclass(frozen=True)
class Reliability:
    """One predictor's reliability diagram on one test split: per non-empty confidence bin, its mean confidence,
    accuracy and share of the inputs."""

    label: str
    bins: list[tuple[float, float, float]]  # (confidence, accuracy, fraction)


def save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path


def accuracy_vs_compression(points: list[Point], path: Path) -> Path:
    """Test accuracy against compression (best teacher's params / model's params, log scale), one marker per role."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for group in dict.fromkeys(p.group for p in points):
        mine = [p for p in points if p.group == group]
        ax.scatter([p.compression for p in mine], [p.accuracy * 100 for p in mine], marker=ROLE_MARKERS[mine[0].role],
                   s=60, alpha=0.8, label=f"{group} ({mine[0].role})")
    ax.set_xscale("log")
    ax.set_xlabel("compression: best teacher params / model params (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save(fig, path)


def series_panels(panels: list[Panel], path: Path, ylabel: str) -> Path:
    """One small plot per panel, a line per series, over epochs."""
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(max(6.0, 4.2 * cols), 3.2 * rows), layout="constrained")
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for line in panel.lines:
            ax.plot([s for s, _ in line.points], [v for _, v in line.points], marker=".", label=line.label)
        ax.set_title(panel.title, fontsize="medium")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    return save(fig, path)


def timeline(bars: list[Bar], path: Path) -> Path:
    """:func:`timeline_figure` saved to ``path``."""
    return save(timeline_figure(bars), path)


def node_colours(bars: list[Bar]) -> dict[str, str]:
    """One colour per node named by any bar, in name order (stable across reports of the same cluster)."""
    return {node: f"C{i % 10}" for i, node in enumerate(sorted({n for b in bars for n in b.nodes}))}


def timeline_figure(bars: list[Bar]) -> Figure:
    """Gantt-like bars, top to bottom in the given order. Fill = the node the stage ran on; a stage on several nodes
    is split lengthwise into one strip per node; grey = no node recorded. Status = the edge (thin black: finished;
    thick red and cross-hatched: failed; thick grey and dotted: killed; thick orange: still running). Hatched ``//``
    and faded = reused from an earlier run. The legend names every node, then the statuses and reuse shown."""
    fig = Figure(figsize=(9, 1.2 + 0.35 * len(bars)), layout="constrained")
    ax = fig.add_subplot()
    colours = node_colours(bars)
    for y, bar in enumerate(bars):
        edge, width, hatch = STATUS_STYLES.get(bar.status, OTHER_STATUS)
        strips = bar.nodes or (None,)
        height = 0.8 / len(strips)
        for i, node in enumerate(strips):
            ax.barh(y - 0.4 + height * (i + 0.5), max(bar.end_s - bar.start_s, 0.0), height=height, left=bar.start_s,
                    facecolor=colours.get(node, NO_NODE_COLOUR), edgecolor=edge, linewidth=width,
                    hatch=(hatch + (REUSED_HATCH if bar.reused else "")) or None, alpha=0.5 if bar.reused else 0.9)
    ax.set_yticks(range(len(bars)), [f"{b.row} (reused)" if b.reused else b.row for b in bars], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the pipeline run started")
    ax.grid(True, axis="x", alpha=0.3)
    handles = [Patch(facecolor=c, edgecolor="black", linewidth=0.5, label=n) for n, c in colours.items()]
    if any(not b.nodes for b in bars):
        handles.append(Patch(facecolor=NO_NODE_COLOUR, edgecolor="black", linewidth=0.5, label=NO_NODE))
    for status in dict.fromkeys(b.status for b in bars):
        edge, width, hatch = STATUS_STYLES.get(status, OTHER_STATUS)
        handles.append(Patch(facecolor="white", edgecolor=edge, linewidth=width, hatch=hatch or None,
                             label=status.lower()))
    if any(b.reused for b in bars):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch=REUSED_HATCH, label="reused"))
    ax.legend(handles=handles, fontsize="small", title="node · status", title_fontsize="small", loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    return fig


def spreads(groups: list[Spread], path: Path, ylabel: str, reference: float | None = None) -> Path:
    """Per group (left to right): each seed's value as a dot, one colour and offset per seed across groups (so equal
    values stay visible), and the mean ± sample std as a black error bar beside them; an optional dashed horizontal
    line at ``reference``."""
    fig = Figure(figsize=(max(5.0, 1.3 * len(groups) + 2.5), 4.2), layout="constrained")
    ax = fig.add_subplot()
    seeds = list(dict.fromkeys(s for g in groups for s in g.values))
    colours = {s: f"C{i % 10}" for i, s in enumerate(seeds)}
    offsets = {s: -0.3 + 0.3 * i / max(1, len(seeds) - 1) for i, s in enumerate(seeds)}
    for x, group in enumerate(groups):
        values = list(group.values.values())
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        ax.errorbar(x + 0.2, statistics.fmean(values), yerr=std, fmt="D", color="black", capsize=5, markersize=5)
        for seed, value in group.values.items():
            ax.scatter(x + offsets[seed], value, color=colours[seed], s=30, zorder=3)
    for seed, colour in colours.items():  # legend: one entry per seed
        ax.scatter([], [], color=colour, s=30, label=f"seed {seed}")
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(groups)), [g.label for g in groups], rotation=20, ha="right")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small", title="◆ mean ± std", title_fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save(fig, path)


def reliability(panels: list[tuple[str, list[Reliability]]], path: Path) -> Path:
    """One panel per predictor: accuracy against confidence per bin, a line per test split (clean, shifted), the
    bins' share of the inputs as the marker area, and the diagonal of perfect calibration."""
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(max(5.0, 4.2 * cols), 3.8 * rows), layout="constrained")
    for i, (title, curves) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
        for curve in curves:
            ax.plot([b[0] for b in curve.bins], [b[1] for b in curve.bins], linewidth=1, label=curve.label)
            ax.scatter([b[0] for b in curve.bins], [b[1] for b in curve.bins], s=[8 + 300 * b[2] for b in curve.bins],
                       alpha=0.6)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("confidence (top-label probability)")
        ax.set_ylabel("accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small", loc="upper left")
    return save(fig, path)
