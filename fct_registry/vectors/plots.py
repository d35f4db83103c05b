"""Charts of FCT's results (PNG, matplotlib's Agg canvas, no pyplot state) and the flat rows ``dvc plots`` draws.

Two charts: the compatibility chart (every ``<query>_vs_<gallery>`` case as a point, one panel per metric) and the
sweep chart (the ablation of Ramanujan et al., CVPR 2022, Sec. 5: one line per side-info size over the old
embedding dim). Both fit the y range to the data, draw old/old and new/new as reference lines, write the share of
the old->new gap closed by FCT on the chart and show the spread over seeds of h as error bars (± 1 sample std,
from the ``<metric>_std`` keys of :func:`~fct_registry.vectors.compatibility.mean_std`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fct_registry.core.errors import SearchError
from fct_registry.vectors.compatibility import compatibility_table, gap_closed

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Cases = Mapping[str, Mapping[str, float]]
METRIC_NAMES = {"cmc_top1": "CMC top-1", "cmc_top5": "CMC top-5", "map": "mAP"}
DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "image_folder": "ImageFolder"}
OLD, NEW, FCT, NOSIDE = "old_vs_old", "new_vs_new", "new_vs_upgraded", "new_vs_upgraded_noside"
DPI = 120
_OLD_STYLE = {"color": "tab:red", "linestyle": "--", "linewidth": 1.2}
_NEW_STYLE = {"color": "tab:green", "linestyle": "--", "linewidth": 1.2}
_SIDE_COLORS = ("tab:purple", "tab:blue", "tab:cyan", "tab:brown", "tab:pink")  # "none" is tab:orange


def protocol_title(dataset: str, protocol: str, metric: str, n_items: int | None = None) -> str:
    """The evaluation protocol in one line, e.g. ``Fashion-MNIST class_subset: query = gallery (test split,
    10,000 images), own item excluded, L2``; ``dataset`` is ``data.source`` (``fashion_mnist``, ...) or a name."""
    split = "test split" + (f", {n_items:,} images" if n_items else "")
    name = DATASET_NAMES.get(dataset, dataset)
    return f"{name} {protocol}: query = gallery ({split}), own item excluded, {metric.upper()}"


def fitted_limits(values: Sequence[float], errors: Sequence[float] = (), margin: float = 0.08,
                  min_span: float = 0.02) -> tuple[float, float]:
    """y limits around ``values ± errors``: the data range plus ``margin`` of it on each side (at least
    ``min_span`` wide), clipped below at 0 for fractions.

    Raises:
        SearchError: no finite value.
    """
    errors = list(errors) + [0.0] * (len(values) - len(errors))
    pairs = [(v, e) for v, e in zip(values, errors, strict=True) if v == v]  # drops NaN
    if not pairs:
        raise SearchError("nothing to plot: every value is missing")
    low, high = min(v - e for v, e in pairs), max(v + e for v, e in pairs)
    span = max(high - low, min_span)
    middle = (low + high) / 2
    bottom, top = middle - span * (0.5 + margin), middle + span * (0.5 + margin)
    return (max(0.0, bottom) if low >= 0 else bottom), top


def compatibility_chart(cases: Cases, title: str, metrics: Sequence[str] = ("cmc_top1", "map")) -> Figure:
    """One panel per metric, every case a point (value written beside it), old/old and new/new as dashed lines.

    Each panel's title gives the share of the old->new gap that FCT (``new_vs_upgraded``) closes, and without
    side-info (``new_vs_upgraded_noside``), when those cases exist. Cases with ``<metric>_std`` get error bars.

    Args:
        cases: ``{case name: {metric key: fraction, optional <metric>_std, n_seeds}}`` (``metrics/retrieval.json``).
        title: the figure's title, e.g. :func:`protocol_title`.
        metrics: metric keys, one panel each (a metric no case has is left out).

    Returns:
        The Figure (save it with :func:`save_png`); ``fig.axes[i]`` is the panel of the i-th metric drawn.

    Raises:
        SearchError: ``cases`` is empty or no case has any of ``metrics``.
    """
    from matplotlib.figure import Figure

    if not cases:
        raise SearchError("cases is empty: expected at least one {case: {metric: value}} entry")
    names, metrics = list(cases), [m for m in metrics if any(m in values for values in cases.values())]
    if not metrics:
        raise SearchError(f"no case has a metric to plot; cases: {', '.join(names)}")
    fig = Figure(figsize=(max(8.0, 1.05 * len(names) + 1.5), 3.2 * len(metrics) + 1.0), layout="constrained")
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics, strict=True):
        values = [cases[n].get(metric, float("nan")) for n in names]
        errors = [cases[n].get(f"{metric}_std", 0.0) for n in names]
        refs, shares = _references(ax, cases, metric), _gap_shares(cases, metric)
        colors = ["tab:blue" if n == FCT else "tab:orange" if n == NOSIDE else "0.35" for n in names]
        for x, (v, e, c) in enumerate(zip(values, errors, colors, strict=True)):
            ax.errorbar(x, v, yerr=e if e else None, fmt="o", color=c, capsize=4, markersize=7 if c != "0.35" else 5)
            if v == v:
                ax.annotate(f"{v:.3f}", (x, v), xytext=(6, 2), textcoords="offset points", va="bottom", fontsize=8)
            if names[x] in shares:
                ax.annotate(f"{shares[names[x]]:.1%} of the gap", (x, v - e), xytext=(0, -6), ha="center", va="top",
                            textcoords="offset points", fontsize=8, color=c, fontweight="bold")
        ax.set_ylim(*fitted_limits(values + refs, errors + [0.0] * len(refs)))
        ax.set_xlim(-0.6, len(names) - 0.1)
        ax.set_ylabel(METRIC_NAMES.get(metric, metric))
        ax.set_title(_gap_text(METRIC_NAMES.get(metric, metric), shares), fontsize=10, loc="left")
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(names)), [n.replace("_vs_", " vs\n", 1) for n in names], fontsize=8)
    n_seeds = max((int(c.get("n_seeds", 1)) for c in cases.values()), default=1)
    note = f"error bars: ± 1 sample std over {n_seeds} seeds of h" if n_seeds > 1 else "one run per case"
    fig.suptitle(f"{title}\n{note}", fontsize=10)
    return fig


def sweep_chart(runs: Sequence[Mapping[str, Any]], title: str, metrics: Sequence[str] = ("cmc_top1", "map")) -> Figure:
    """The ablation over the old embedding dim: top row the metric, bottom row the share of the gap closed.

    One line per side-info size (``none``: h without side-info), mean ± std over seeds of h; the top row also
    draws old/old (it moves with the old dim) and new/new, the bottom row new/new as 100 %.

    Args:
        runs: rows of ``metrics/sweep.json``: ``old_dim``, ``side_dim`` and the cases ``old_vs_old``,
            ``new_vs_new``, ``new_vs_upgraded_noside``, ``new_vs_upgraded`` (``{metric: value}`` each).
        title: the figure's title.
        metrics: metric keys, one column each.

    Returns:
        The Figure; ``fig.axes`` are row-major (metric panels of the top row first).

    Raises:
        SearchError: ``runs`` is empty.
    """
    from matplotlib.figure import Figure

    if not runs:
        raise SearchError("runs is empty: expected rows with old_dim, side_dim and their cases")
    lines, references = _sweep_lines(runs)
    fig = Figure(figsize=(5.2 * len(metrics), 7.5), layout="constrained")
    axes = fig.subplots(2, len(metrics), sharex=True, squeeze=False)
    for col, metric in enumerate(metrics):
        _sweep_column(axes[0, col], axes[1, col], lines, references, metric)
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend(fontsize=8)
    fig.suptitle(f"{title}\nerror bars: ± 1 sample std over seeds of h", fontsize=10)
    return fig


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = DPI) -> Path:
    """Write ``fig`` as a PNG of ``figsize * dpi`` pixels (parent dirs created); returns ``path`` as a Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def case_rows(cases: Cases, metrics: Sequence[str] = ("cmc_top1", "cmc_top5", "map")) -> list[dict[str, Any]]:
    """One flat row per case for ``dvc plots``: ``case``, each metric and its ``_std`` (0 for a single run)."""
    return [{"case": name, **{k: values[k] for m in metrics for k in (m, f"{m}_std") if k in values},
             **{f"{m}_std": 0.0 for m in metrics if m in values and f"{m}_std" not in values}}
            for name, values in cases.items()]


def sweep_rows(runs: Sequence[Mapping[str, Any]], metrics: Sequence[str] = ("cmc_top1", "map")) -> list[dict]:
    """One flat row per old embedding dim for ``dvc plots``: ``<metric>_<series>`` for the series ``old_vs_old``,
    ``new_vs_new``, ``none`` (no side-info) and ``side<d>`` (side-info of d dims)."""
    lines, references = _sweep_lines(runs)
    rows = []
    for dim in sorted(references):
        row: dict[str, Any] = {"old_dim": dim}
        for metric in metrics:
            row |= {f"{metric}_{case}": references[dim][case][metric] for case in (OLD, NEW)}
            row |= {f"{metric}_{_series(side)}": points[dim][metric] for side, points in lines.items() if dim in points}
        rows.append(row)
    return rows


def write_compatibility_reports(cases: Cases, title: str, folder: str | os.PathLike) -> list[Path]:
    """``<folder>/retrieval.md`` (the table), ``retrieval.png`` (:func:`compatibility_chart`) and
    ``retrieval_plot.json`` (:func:`case_rows`); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "retrieval.md").write_text(compatibility_table(cases))
    (folder / "retrieval_plot.json").write_text(json.dumps(case_rows(cases), indent=2) + "\n")
    png = save_png(compatibility_chart(cases, title), folder / "retrieval.png")
    return [folder / "retrieval.md", png, folder / "retrieval_plot.json"]


def _references(ax: Axes, cases: Cases, metric: str) -> list[float]:
    """Draw old/old and new/new as horizontal lines with their value; returns the values drawn."""
    drawn = []
    for case, style, label in ((OLD, _OLD_STYLE, "old/old"), (NEW, _NEW_STYLE, "new/new")):
        if metric in cases.get(case, {}):
            value = cases[case][metric]
            ax.axhline(value, **style)
            ax.annotate(f"{label}\n{value:.3f}", (1.0, value), xycoords=("axes fraction", "data"), xytext=(4, 0),
                        textcoords="offset points", ha="left", va="center", fontsize=8, color=style["color"])
            drawn.append(value)
    if len(drawn) == 2:
        ax.axhspan(min(drawn), max(drawn), color="tab:green", alpha=0.06, linewidth=0)
    return drawn


def _gap_shares(cases: Cases, metric: str) -> dict[str, float]:
    """``{case: share of the old->new gap it closes}`` for FCT and no side-info, where computable."""
    shares = {}
    for case in (FCT, NOSIDE):
        try:
            shares[case] = gap_closed(cases[OLD][metric], cases[NEW][metric], cases[case][metric])
        except (KeyError, SearchError):
            continue
    return shares


def _gap_text(name: str, shares: Mapping[str, float]) -> str:
    if FCT not in shares:
        return name
    text = f"{name}: FCT (h with side-info) closes {shares[FCT]:.1%} of the old->new gap"
    return text + (f", h without side-info {shares[NOSIDE]:.1%}" if NOSIDE in shares else "")


def _sweep_column(top: Axes, bottom: Axes, lines: Mapping[str, Mapping[int, Mapping]],
                  references: Mapping[int, Mapping], metric: str) -> None:
    """One metric of the sweep: its values (top) and the share of the old->new gap they close (bottom)."""
    from matplotlib.ticker import PercentFormatter

    dims, name = sorted(references), METRIC_NAMES.get(metric, metric)
    old = [references[d][OLD][metric] for d in dims]
    new = [references[d][NEW][metric] for d in dims]
    top.plot(dims, old, label="old/old", marker="s", **_OLD_STYLE)
    top.plot(dims, new, label="new/new (backfill)", **_NEW_STYLE)
    bottom.axhline(1.0, label="new/new (backfill) = 100 %", **_NEW_STYLE)
    values, errors, shares, share_errors = old + new, [0.0] * 2 * len(dims), [1.0], [0.0]
    for i, (side, points) in enumerate(lines.items()):
        xs, color = sorted(points), "tab:orange" if side == "none" else _SIDE_COLORS[(i - 1) % len(_SIDE_COLORS)]
        ys, es = [points[d][metric] for d in xs], [points[d].get(f"{metric}_std", 0.0) for d in xs]
        ends = [(references[d][OLD][metric], references[d][NEW][metric]) for d in xs]
        gs = [gap_closed(o, n, y) for (o, n), y in zip(ends, ys, strict=True)]
        gaps = [n - o for o, n in ends]
        ges = [e / abs(g) for e, g in zip(es, gaps, strict=True)]
        label = "h(old), no side-info" if side == "none" else f"h(old, side-info {side}-d)"
        top.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label, color=color)
        bottom.errorbar(xs, gs, yerr=ges, marker="o", capsize=3, label=label, color=color)
        values, errors, shares, share_errors = values + ys, errors + es, shares + gs, share_errors + ges
    top.set_ylim(*fitted_limits(values, errors))
    bottom.set_ylim(*fitted_limits(shares, share_errors))
    top.set_title(f"{name}: new queries vs upgraded gallery", fontsize=10)
    bottom.set_title(f"share of the old->new {name} gap closed", fontsize=10)
    bottom.yaxis.set_major_formatter(PercentFormatter(1.0))
    bottom.set_xscale("log", base=2)
    bottom.set_xticks(dims, [str(d) for d in dims])
    bottom.set_xlabel("old embedding dim")
    top.grid(alpha=0.3)
    bottom.grid(alpha=0.3)


def _sweep_lines(runs: Sequence[Mapping[str, Any]]) -> tuple[dict[str, dict[int, Mapping]], dict[int, Mapping]]:
    """``({side: {old_dim: metrics}}, {old_dim: {case: metrics}})``; ``none`` taken from each dim's first run."""
    lines: dict[str, dict[int, Mapping]] = {"none": {}}
    references: dict[int, Mapping] = {}
    for run in runs:
        dim = int(run["old_dim"])
        references.setdefault(dim, {OLD: run[OLD], NEW: run[NEW]})
        lines["none"].setdefault(dim, run[NOSIDE])
        lines.setdefault(str(run["side_dim"]), {})[dim] = run[FCT]
    return lines, references


def _series(side: str) -> str:
    return side if side == "none" else f"side{side}"
