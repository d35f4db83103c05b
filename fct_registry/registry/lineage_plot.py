"""The lineage graph as a picture: backbone versions as boxes, registered transformations as labelled arrows.

Drawn with matplotlib's object API on the Agg canvas (no display, no global pyplot state), so it is safe in any
process. Boxes stand in columns by their hop distance from a version no transformation leads to (v1 -> v2 -> v3 reads
left to right); a version no transformation reads or writes (e.g. a BCT baseline) stands in the first column below
the others. Several transformations between the same two versions, and hops that skip a column, are drawn as arcs so
their labels do not overlap. The registry logs the PNG with every change (:mod:`fct_registry.registry.pages`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BOX_FILL, CHAMPION_FILL, ARROW_COLOR = "#e8eef7", "#d9f2d9", "#1f4e8c"


@dataclass(frozen=True)
class LineageNode:
    """One backbone version.

    Attributes:
        key: Its MLflow version number (unique among the nodes).
        lines: Text of its box, first line in bold (e.g. ``["v3", "fct-backbone/3", "@champion"]``).
        highlight: Drawn in green (it carries an alias).
    """

    key: int
    lines: tuple[str, ...]
    highlight: bool = False


@dataclass(frozen=True)
class LineageArrow:
    """One registered transformation from ``source`` to ``target`` (node keys), with the text beside it."""

    source: int
    target: int
    label: str


def columns(nodes: Sequence[LineageNode], arrows: Sequence[LineageArrow]) -> dict[int, tuple[int, int]]:
    """Node key -> (column, row).

    The column is the longest chain of arrows leading to the node (so v1 -> v2 -> v3 stays in three columns even when
    a direct v1 -> v3 arrow exists; capped at the node count, so a cycle ends); rows count down within a column, nodes
    no arrow touches last, in column 0.
    """
    keys = [n.key for n in nodes]
    linked = {a.source for a in arrows} | {a.target for a in arrows}
    depth = dict.fromkeys(keys, 0)
    for _ in keys:  # Bellman-Ford style relaxation: longest path in a DAG, bounded in a cycle
        for arrow in arrows:
            if arrow.source in depth and arrow.target in depth and arrow.source != arrow.target:
                depth[arrow.target] = min(max(depth[arrow.target], depth[arrow.source] + 1), len(keys) - 1)
    order = sorted(keys, key=lambda k: (k not in linked, keys.index(k)))
    placed: dict[int, tuple[int, int]] = {}
    for key in order:
        column = depth[key] if key in linked else 0
        placed[key] = (column, sum(1 for c, _ in placed.values() if c == column))
    return placed


BOX_W, BOX_H = 0.44, 0.46
"""Box size in data units (columns and rows are 1 apart)."""
COLUMN_IN, ROW_IN, TITLE_IN, MIN_WIDTH_IN = 2.5, 1.6, 0.6, 6.0
"""Inches per column, per row and for the title; the narrowest figure."""
ARC_RAD = 0.2
"""Bend of an arc (matplotlib's ``arc3``): its middle lies ARC_RAD / 2 chord lengths off the chord."""
LABEL_PT = 8.5
LABEL_LINE_PT = LABEL_PT * 1.35 * 1.17
"""Size of an arrow's label and the height of one of its lines (font size x line spacing x matplotlib's ascent
and descent), in points."""


def draw_lineage(nodes: Sequence[LineageNode], arrows: Sequence[LineageArrow], path: Path, title: str,
                 subtitle: str = "") -> Path:
    """Draw the graph into the PNG ``path`` (250 px per column, 160 px per row at 100 dpi: three columns fit the width
    of a description in the MLflow UI); returns ``path``.

    The arrows between the same two versions are drawn as one, its label listing each transformation; an arrow that
    skips a column arcs over the boxes between.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    placed = columns(nodes, arrows)
    n_columns = 1 + max((c for c, _ in placed.values()), default=0)
    n_rows = 1 + max((r for _, r in placed.values()), default=0)
    pairs: dict[tuple[int, int], list[str]] = {}
    for arrow in arrows:
        if arrow.source in placed and arrow.target in placed:
            pairs.setdefault((arrow.source, arrow.target), []).append(arrow.label)
    reach = {pair: _label_reach(placed[pair[1]][0] - placed[pair[0]][0], labels) for pair, labels in pairs.items()}
    top = max([0.5, *(r for (s, t), r in reach.items() if placed[t][0] - placed[s][0] > 1)])
    bottom = max([0.5, *(r for (s, t), r in reach.items()
                         if placed[t][0] - placed[s][0] <= 1 and placed[s][1] == n_rows - 1)])
    height = ROW_IN * (n_rows - 1 + bottom + top)
    width = max(MIN_WIDTH_IN, COLUMN_IN * n_columns)
    figure = Figure(figsize=(width, height + TITLE_IN), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0.0, 0.0, 1.0, height / (height + TITLE_IN)))
    spare = (width / COLUMN_IN - n_columns) / 2  # columns keep their width in a figure widened for the title
    ax.set_xlim(-0.5 - spare, n_columns - 0.5 + spare)
    ax.set_ylim(-(n_rows - 1) - bottom, top)
    ax.axis("off")
    figure.text(0.01, 1 - 0.12 / (height + TITLE_IN), title, fontsize=11, va="top", ha="left")
    figure.text(0.01, 1 - 0.34 / (height + TITLE_IN), subtitle, fontsize=8.5, va="top", ha="left", color="#555555")

    def xy(key: int) -> tuple[float, float]:
        column, row = placed[key]
        return float(column), -float(row)

    for node in nodes:
        x, y = xy(node.key)
        ax.add_patch(FancyBboxPatch((x - BOX_W / 2, y - BOX_H / 2), BOX_W, BOX_H,
                                    boxstyle="round,pad=0,rounding_size=0.03", linewidth=1.3, edgecolor=ARROW_COLOR,
                                    facecolor=CHAMPION_FILL if node.highlight else BOX_FILL, mutation_aspect=0.5))
        head, *rest = node.lines
        block = 15.0 + 13.5 * len(rest)  # points: the bold first line, then 9 pt lines at 1.5 spacing
        ax.annotate(head, (x, y), xytext=(0, block / 2 - 7.5), textcoords="offset points", ha="center",
                    va="center", fontsize=12, fontweight="bold")
        if rest:
            ax.annotate("\n".join(rest), (x, y), xytext=(0, -block / 2 + 6.75 * len(rest)),
                        textcoords="offset points", ha="center", va="center", fontsize=9, linespacing=1.5)
    for (source, target), labels in pairs.items():
        (x1, y1), (x2, y2) = xy(source), xy(target)
        forward = placed[target][0] - placed[source][0]
        if forward == 1:  # right edge to left edge, the label below the middle
            start, end, rad = (x1 + BOX_W / 2, y1), (x2 - BOX_W / 2, y2), 0.0
        elif forward > 1:  # an arc over the boxes between, from top to top, the label above it
            start, end, rad = (x1, y1 + BOX_H / 2), (x2, y2 + BOX_H / 2), -ARC_RAD
        else:  # backwards or within a column: an arc below, from bottom to bottom
            start, end, rad = (x1, y1 - BOX_H / 2), (x2, y2 - BOX_H / 2), -ARC_RAD
        ax.add_patch(FancyArrowPatch(posA=start, posB=end, arrowstyle="-|>", mutation_scale=18, linewidth=1.6,
                                     color=ARROW_COLOR, connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=1))
        # arc3 bends in display space: its quadratic Bezier passes half-way between the chord's middle and the
        # control point (middle + rad * the chord turned by -90 degrees)
        (ax1, ay1), (ax2, ay2) = ax.transData.transform([start, end])
        middle = ((ax1 + ax2) / 2 + 0.5 * rad * (ay2 - ay1), (ay1 + ay2) / 2 - 0.5 * rad * (ax2 - ax1))
        mx, my = ax.transData.inverted().transform(middle)
        above = forward > 1
        ax.annotate("\n\n".join(labels), (mx, my), xytext=(0, 5 if above else -5), textcoords="offset points",
                    ha="center", va="bottom" if above else "top", fontsize=LABEL_PT, color=ARROW_COLOR,
                    linespacing=1.35,
                    bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.85})
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, facecolor="white", metadata={"Software": None})
    return path


def _label_reach(forward: int, labels: Sequence[str]) -> float:
    """How far from its row's centre (data units) the label of an arrow reaches: a straight arrow's label hangs below
    the arrow, an arc's stands on (or, backwards, hangs below) the arc, which bulges ARC_RAD / 2 chord lengths."""
    lines = sum(label.count("\n") + 1 for label in labels) + len(labels) - 1
    text_in = (lines * LABEL_LINE_PT + 12) / 72
    base_in = ROW_IN * BOX_H / 2 + ARC_RAD / 2 * max(abs(forward), 1) * COLUMN_IN if forward != 1 else 0.0
    return (base_in + text_in) / ROW_IN
