"""What every ELMA figure carries: a title, axis labels with units, values on bars, the chosen point.

The plotting functions of the package and the notebooks' inline figures finish their axes here,
so the rules live in one place, and ``figure_problems`` checks them (``tests/test_plotting.py``):

- ``finish_axes(ax, title, xlabel, ylabel)``: all three are required; a quantity's label names its
  unit in brackets, e.g. ``"latency per question (ms)"``, ``"F1 (%)"``, ``"exit layer (layers)"``;
- ``label_bars(ax, bars, fmt)``: writes each bar's value (``ax.bar_label``), or given ``labels``;
- ``mark_operating_point(ax, x, y, label)``: a red star and an arrow with the chosen setting
  (E_T, configuration) on a trade-off curve, found again through ``OPERATING_POINT_GID``;
- ``tag_histogram(patches)``: a histogram's bins, which get no value labels.

Example::

    fig, ax = plt.subplots()
    bars = ax.bar(["float32", "int8"], [44.1, 11.3])
    label_bars(ax, bars, "{:.1f}")
    finish_axes(ax, "Bundle size per precision", "precision", "bundle size (MB)")
    assert figure_problems(fig) == []
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

OPERATING_POINT_GID = "elma-operating-point"
HISTOGRAM_GID = "elma-histogram-bin"
# "(ms)", "[MB]", "(%, official scoring)", "(×)": a bracketed part of the label names the unit.
UNIT = re.compile(r"\([^()]*\S[^()]*\)|\[[^\[\]]*\S[^\[\]]*\]")


def finish_axes(ax, title: str, xlabel: str, ylabel: str, *, fontsize: float | None = None):
    """Set the title and both axis labels (none may be empty); returns ``ax``."""
    for name, text in (("title", title), ("xlabel", xlabel), ("ylabel", ylabel)):
        if not str(text).strip():
            raise ValueError(f"finish_axes: empty {name} (every ELMA figure names what it shows)")
    ax.set_title(title, fontsize=fontsize)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax


def label_bars(ax, bars, fmt: str = "{:.1f}", labels: Sequence[str] | None = None, **kwargs: Any):
    """Write each bar's value on it (``fmt`` a ``str.format`` pattern), or ``labels`` when given.

    Stacked bars: pass the top container and the totals as ``labels``. Returns the text artists."""
    kwargs = {"fontsize": 7, "padding": 2, **kwargs}
    if labels is not None:
        return ax.bar_label(bars, labels=list(labels), **kwargs)
    return ax.bar_label(bars, fmt=fmt, **kwargs)


def mark_operating_point(ax, x: float, y: float, label: str, *, legend: bool = True, **kwargs: Any):
    """Star the chosen point at (x, y) and annotate it with ``label`` (e.g. ``"E_T = 0.42, 2.1×"``).

    The star goes into the legend as ``"chosen: <label>"`` unless ``legend=False``. Returns the marker."""
    style = {"marker": "*", "ms": 15, "color": "C3", "ls": "none", "zorder": 5, "markeredgecolor": "k",
             "markeredgewidth": 0.5, **kwargs}  # fmt: skip
    (marker,) = ax.plot([x], [y], label=f"chosen: {label}" if legend else "_nolegend_", **style)
    marker.set_gid(OPERATING_POINT_GID)
    right_half = x > (ax.dataLim.x0 + ax.dataLim.x1) / 2  # write the label towards the middle
    ax.annotate(label, (x, y), xytext=(-12 if right_half else 12, -16), textcoords="offset points",
                ha="right" if right_half else "left", fontsize=8, color=style["color"],
                arrowprops={"arrowstyle": "->", "color": style["color"], "lw": 0.8})  # fmt: skip
    return marker


def tag_histogram(patches) -> None:
    """Mark a histogram's bins (``ax.hist``'s third result, one dataset or several): no value labels."""
    from matplotlib.patches import Patch

    for item in [patches] if isinstance(patches, Patch) else patches:
        for rect in [item] if isinstance(item, Patch) else item:
            rect.set_gid(HISTOGRAM_GID)


def has_unit(label: str) -> bool:
    """True when the label names a unit in brackets: ``"latency (ms)"``, ``"size [MB]"``."""
    return bool(UNIT.search(label or ""))


def _categorical(axis) -> bool:
    from matplotlib.category import UnitData

    return isinstance(axis.get_units(), UnitData)


def figure_problems(fig, *, chosen: bool = False) -> list[str]:
    """What a figure lacks, one line per problem ([] when it is complete).

    Every plotting axes (colour bars aside) needs a title, both axis labels, a unit in brackets on
    each numeric axis (an axis of categories, e.g. precisions or modes, needs none), and text on
    its bars unless they are histogram bins; ``chosen=True``: some axes has the operating point."""
    from matplotlib.container import BarContainer

    problems: list[str] = []
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    if not axes:
        return ["no axes"]
    for i, ax in enumerate(axes):
        where = f"axes {i} ({ax.get_title() or 'untitled'})"
        if not ax.get_title().strip():
            problems.append(f"{where}: no title")
        for name, axis, label in (("x", ax.xaxis, ax.get_xlabel()), ("y", ax.yaxis, ax.get_ylabel())):
            if not label.strip():
                problems.append(f"{where}: no {name} label")
            elif not _categorical(axis) and not has_unit(label):
                problems.append(f"{where}: {name} label {label!r} names no unit in brackets")
        bars = [c for c in ax.containers if isinstance(c, BarContainer)
                and not all(p.get_gid() == HISTOGRAM_GID for p in c.patches)]  # fmt: skip
        written = sum(bool(t.get_text().strip()) for t in ax.texts)
        if bars and written < max(len(c) for c in bars):
            problems.append(f"{where}: bars without values written on them ({written} texts)")
    if chosen and not any(line.get_gid() == OPERATING_POINT_GID for ax in axes for line in ax.lines):
        problems.append("no operating point marked (plotting.mark_operating_point)")
    return problems
