"""The backfill curves' report: AUCs over seeds, FastFill's targets, a markdown table, a PNG and ``dvc plots`` rows.

Curves come from :func:`fct_registry.vectors.backfill_curve.backfill_curve`, one list of points per seed of h.
Names follow FastFill's README table (Jaeckle et al., ICLR 2023, arXiv 2303.04766): ``fct_random`` (h trained
with FCT's MSE, random order), ``fastfill_random``, ``fastfill_uncertainty`` (sigma descending) and
``distance_oracle`` (||phi_new - h|| descending, an upper bound), each with side-info or ``_noside``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from fct_registry.vectors.backfill_curve import curve_auc
from fct_registry.vectors.compatibility import gap_closed, mean_std
from fct_registry.vectors.plots import METRIC_NAMES, save_png

Curve = list[dict[str, float]]
METRICS = ("cmc_top1", "cmc_top5", "map", "negative_flips")


def summarise(curves: Mapping[str, Sequence[Curve]]) -> dict[str, dict]:
    """Per curve name: ``auc`` (each metric's AUC, mean over seeds, with ``_std`` and ``n_seeds``) and ``points``
    (the curve averaged over seeds point by point; ``fraction`` kept)."""
    out = {}
    for name, runs in curves.items():
        points = [mean_std([run[i] for run in runs]) for i in range(len(runs[0]))]
        out[name] = {"auc": mean_std([curve_auc(run) for run in runs]),
                     "points": [{k: v for k, v in p.items() if not k.endswith("_std") and k != "n_seeds"}
                                for p in points]}
    return out


def targets(summary: Mapping[str, dict], reference: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Issue 12's measured targets: FastFill + side-info's mAP AUC minus new/new mAP (>= 0 is met); the share of
    the distance from FCT-random's mAP AUC to new/new mAP closed by FastFill's uncertainty order without side-info
    (>= 0.75); the old->new gap closed at 0 % backfilled by FastFill's h with side-info, top-1 (>= 0.90) and mAP
    (>= 0.97); and FastFill + side-info's negative flip rate at 0 %.

    Args:
        summary: :func:`summarise`'s output.
        reference: ``old_vs_old`` and ``new_vs_new`` metrics of the same queries.
    """
    new_map, old = reference["new_vs_new"]["map"], reference["old_vs_old"]
    ff0, noside = summary["fastfill_uncertainty"]["points"][0], summary["fastfill_uncertainty_noside"]["auc"]["map"]
    fct_noside = summary["fct_random_noside"]["auc"]["map"]
    return {"fastfill_map_auc_minus_new_new_map": summary["fastfill_uncertainty"]["auc"]["map"] - new_map,
            "noside_uncertainty_share_of_fct_random_to_new_new": gap_closed(fct_noside, new_map, noside),
            "fastfill_top1_gap_closed_at_0": gap_closed(old["cmc_top1"], reference["new_vs_new"]["cmc_top1"],
                                                        ff0["cmc_top1"]),
            "fastfill_map_gap_closed_at_0": gap_closed(old["map"], new_map, ff0["map"]),
            "fct_top1_gap_closed_at_0": gap_closed(old["cmc_top1"], reference["new_vs_new"]["cmc_top1"],
                                                   summary["fct_random"]["points"][0]["cmc_top1"]),
            "fct_map_gap_closed_at_0": gap_closed(old["map"], new_map, summary["fct_random"]["points"][0]["map"]),
            "fastfill_negative_flips_at_0": ff0.get("negative_flips", float("nan"))}


def auc_table(summary: Mapping[str, dict], reference: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown: one row per curve with each metric's AUC (mean ± std over seeds), then old/old and new/new."""
    head = "| curve | seeds | " + " | ".join(f"{METRIC_NAMES.get(m, m)} AUC" for m in METRICS) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(METRICS)]
    for name, entry in summary.items():
        auc = entry["auc"]
        cells = [f"{auc[m]:.4f} ± {auc.get(f'{m}_std', 0.0):.4f}" if m in auc else "-" for m in METRICS]
        lines.append(f"| {name} | {int(auc['n_seeds'])} | " + " | ".join(cells) + " |")
    for case in ("old_vs_old", "new_vs_new"):
        cells = [f"{reference[case][m]:.4f}" if m in reference[case] else "-" for m in METRICS]
        lines.append(f"| {case} (reference) | - | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_backfill_reports(summary: Mapping[str, dict], reference: Mapping[str, Mapping[str, float]], title: str,
                           folder: str | os.PathLike) -> list[Path]:
    """Write ``backfill.md`` (the AUC table), ``backfill.png`` (mAP and top-1 over the fraction backfilled, with
    and without side-info) and ``backfill_plot.json`` (one row per fraction with each curve's mAP, for
    ``dvc plots``) into ``folder``."""
    from matplotlib.figure import Figure  # matplotlib, loaded only to draw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "backfill.md").write_text(f"# Backfill curves\n\n{title}\n\n" + auc_table(summary, reference))
    fig = Figure(figsize=(11, 8), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    for col, suffix in enumerate(("", "_noside")):
        for row, metric in enumerate(("map", "cmc_top1")):
            ax = axes[row, col]
            for name, entry in summary.items():
                if name.endswith("_noside") == bool(suffix):
                    xs = [p["fraction"] for p in entry["points"]]
                    ax.plot(xs, [p[metric] for p in entry["points"]], marker=".", label=name.removesuffix(suffix))
            for case, style in (("old_vs_old", "tab:red"), ("new_vs_new", "tab:green")):
                ax.axhline(reference[case][metric], color=style, linestyle="--", linewidth=1.2, label=case)
            ax.set_title(f"{METRIC_NAMES[metric]}, {'with' if not suffix else 'without'} side-info", fontsize=10)
            ax.set_xlabel("fraction of the gallery backfilled")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{title}\ncurves: mean over seeds of h", fontsize=10)
    save_png(fig, folder / "backfill.png")
    first = next(iter(summary.values()))["points"]
    rows = [{"fraction": point["fraction"], **{name: entry["points"][i]["map"] for name, entry in summary.items()}}
            for i, point in enumerate(first)]
    (folder / "backfill_plot.json").write_text(json.dumps(rows, indent=1) + "\n")
    return [folder / "backfill.md", folder / "backfill.png", folder / "backfill_plot.json"]
