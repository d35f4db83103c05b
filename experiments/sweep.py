"""The FCT ablation as DVC experiments: old embedding dim x side-info dim (Ramanujan et al., CVPR 2022, Sec. 5).

Each combination is one ``dvc exp run`` (only stages whose params changed rerun); "none" is the ablation
without side-info that every run also trains. Writes ``reports/sweep.md``, ``reports/sweep.png`` (one line per
side-info size over the old embedding dim), ``reports/sweep_plot.json`` (its data, for ``dvc plots show``) and
``metrics/sweep.json``, after restoring the workspace (params, lock, metrics, reports, outputs) to HEAD's, and
records them as one run in the project's MLflow registry.

Usage: ``python experiments/sweep.py [--quick] [--replot]`` (``--quick``: the README's quick profile per run;
``--replot``: no experiment, redraw the report and chart from the existing ``metrics/sweep.json``).
"""

import json
import subprocess
from pathlib import Path

import typer

from fct_registry.core.config import load_params
from fct_registry.usecases.project import open_registry
from fct_registry.vectors.plots import protocol_title, save_png, sweep_chart, sweep_rows

OLD_DIMS, SIDE_DIMS = (8, 16, 128), (32, 128)
QUICK = ["data.train_limit=6000", "data.test_limit=2000", "old.epochs=1", "side_info.epochs=1", "new.epochs=1",
         "v3.epochs=1", "bct.backbone.epochs=1", "transformation.epochs=5"]
CASES = ("old_vs_old", "new_vs_new", "new_vs_upgraded_noside", "new_vs_upgraded")


def run(old_dim: int, side_dim: int, quick: bool) -> dict:
    sets = [f"old.embedding_dim={old_dim}", f"bct.backbone.embedding_dim={old_dim}",
            f"side_info.embedding_dim={side_dim}"] + (QUICK if quick else [])
    args = ["dvc", "exp", "run", "--name", f"sweep-old{old_dim}-side{side_dim}" + ("-quick" if quick else "")]
    subprocess.run(args + [a for s in sets for a in ("-S", s)], check=True)
    return json.loads(Path("metrics/retrieval.json").read_text())["cases"]


def table(rows: list[dict]) -> str:
    lines = ["| old dim | side-info | old/old top-1 | new/new top-1 | new/h(old) top-1 | mAP |",
             "|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        for side, case in ((None, "new_vs_upgraded_noside"), (row["side_dim"], "new_vs_upgraded")):
            if side is None and row["side_dim"] != SIDE_DIMS[0]:
                continue
            lines.append(f"| {row['old_dim']} | {side or 'none'} | {row['old_vs_old']['cmc_top1']:.3f} | "
                         f"{row['new_vs_new']['cmc_top1']:.3f} | {row[case]['cmc_top1']:.3f} | "
                         f"{row[case]['map']:.3f} |")
    return "\n".join(lines) + "\n"


def main(quick: bool = False, replot: bool = False) -> None:
    if replot:
        saved = json.loads(Path("metrics/sweep.json").read_text())
        quick, rows = saved["quick"], saved["runs"]
    else:
        rows = []
        for old_dim in OLD_DIMS:
            for side_dim in SIDE_DIMS:
                result = run(old_dim, side_dim, quick)
                rows.append({"old_dim": old_dim, "side_dim": side_dim, **{k: result[k] for k in CASES}})
        # The last experiment's params, lock and uncached metrics/reports stay in the workspace: restore HEAD's.
        subprocess.run(["git", "checkout", "params.yaml", "dvc.lock", "metrics", "reports"], check=True)
        subprocess.run(["dvc", "checkout"], check=False)
        Path("metrics/sweep.json").write_text(json.dumps({"quick": quick, "runs": rows}, indent=2) + "\n")
    Path("reports/sweep.md").write_text(table(rows))
    plot_rows = sweep_rows(rows)
    Path("reports/sweep_plot.json").write_text(json.dumps(plot_rows, indent=2) + "\n")
    params = load_params()
    title = (f"FCT ablation (old embedding dim x side-info dim{', quick profile' if quick else ''}), "
             + protocol_title(params.data.source, params.protocol.name, params.evaluation.metric))
    save_png(sweep_chart(rows, title), "reports/sweep.png")
    open_registry(".").log_run(
        f"sweep: old embedding dim x side-info dim{' (quick)' if quick else ''}{' (redrawn)' if replot else ''}",
        params={"old_dims": list(OLD_DIMS), "side_dims": list(SIDE_DIMS), "quick": quick}, tags={"kind": "sweep"},
        artifacts=["reports/sweep.md", "reports/sweep.png", "reports/sweep_plot.json", "metrics/sweep.json"],
        metrics={f"old{row['old_dim']}_{key}": value for row in plot_rows for key, value in row.items()
                 if key != "old_dim"})
    print(table(rows), end="")


if __name__ == "__main__":
    typer.run(main)
