"""The FCT ablation as DVC experiments: old embedding dim x side-info dim (Ramanujan et al., CVPR 2022, Sec. 5).

Each combination is one ``dvc exp run`` (only stages whose params changed rerun); "none" is the ablation
without side-info that every run also trains. Writes ``reports/sweep.md``, ``reports/sweep.png`` and
``metrics/sweep.json``, after restoring the workspace (params, lock, metrics, reports, outputs) to HEAD's.

Usage: ``python experiments/sweep.py [--quick]`` (``--quick``: the README's quick profile per run).
"""

import json
import subprocess
from pathlib import Path

import typer

from fct_registry.vectors.compatibility import plot_cases

OLD_DIMS, SIDE_DIMS = (8, 16, 128), (32, 128)
QUICK = ["data.train_limit=6000", "data.test_limit=2000", "old.epochs=1", "side_info.epochs=1", "new.epochs=1",
         "v3.epochs=1", "bct.backbone.epochs=1", "transformation.epochs=5"]


def run(old_dim: int, side_dim: int, quick: bool) -> dict:
    sets = [f"old.embedding_dim={old_dim}", f"bct.backbone.embedding_dim={old_dim}",
            f"side_info.embedding_dim={side_dim}"] + (QUICK if quick else [])
    args = ["dvc", "exp", "run", "--name", f"sweep-old{old_dim}-side{side_dim}" + ("-quick" if quick else "")]
    subprocess.run(args + [a for s in sets for a in ("-S", s)], check=True)
    return json.loads(Path("metrics/retrieval.json").read_text())["cases"]


def main(quick: bool = False) -> None:
    rows, cases = [], {}
    for old_dim in OLD_DIMS:
        for side_dim in SIDE_DIMS:
            result = run(old_dim, side_dim, quick)
            if side_dim == SIDE_DIMS[0]:
                cases[f"old{old_dim}_none"] = result["new_vs_upgraded_noside"]
            cases[f"old{old_dim}_side{side_dim}"] = result["new_vs_upgraded"]
            rows.append({"old_dim": old_dim, "side_dim": side_dim, **{k: result[k] for k in (
                "old_vs_old", "new_vs_new", "new_vs_upgraded_noside", "new_vs_upgraded")}})
    # The last experiment's params, lock and uncached metrics/reports stay in the workspace: restore HEAD's.
    subprocess.run(["git", "checkout", "params.yaml", "dvc.lock", "metrics", "reports"], check=True)
    subprocess.run(["dvc", "checkout"], check=False)
    lines = ["| old dim | side-info | old/old top-1 | new/new top-1 | new/h(old) top-1 | mAP |",
             "|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        for side, case in ((None, "new_vs_upgraded_noside"), (row["side_dim"], "new_vs_upgraded")):
            if side is None and row["side_dim"] != SIDE_DIMS[0]:
                continue
            lines.append(f"| {row['old_dim']} | {side or 'none'} | {row['old_vs_old']['cmc_top1']:.3f} | "
                         f"{row['new_vs_new']['cmc_top1']:.3f} | {row[case]['cmc_top1']:.3f} | "
                         f"{row[case]['map']:.3f} |")
    Path("reports/sweep.md").write_text("\n".join(lines) + "\n")
    Path("metrics/sweep.json").write_text(json.dumps({"quick": quick, "runs": rows}, indent=2) + "\n")
    plot_cases({k: {m: v[m] for m in ("cmc_top1", "map")} for k, v in cases.items()}, "reports/sweep.png")
    print("\n".join(lines))


if __name__ == "__main__":
    typer.run(main)
