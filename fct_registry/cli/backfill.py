"""``fct-registry backfill``: re-embed the most uncertain part of an upgraded set with its backbone (FastFill)."""

from __future__ import annotations

from contextlib import nullcontext
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from fct_registry.cli.common import Project, console, progress
from fct_registry.usecases import backfill as usecase
from fct_registry.usecases import project as project_files

app = typer.Typer()


class Order(str, Enum):
    """Backfill orders: the upgrade's predicted uncertainty (descending), or a seeded random permutation."""

    uncertainty = "uncertainty"
    random = "random"


@app.command()
def backfill(
    ctx: typer.Context,
    set_name: Annotated[str, typer.Argument(metavar="SET", help="An upgraded embedding set: a name under "
                                                                "--sets-root or a path.")],
    fraction: Annotated[float, typer.Option(help="Share of the set's items that carry the backbone's own vectors "
                                                 "once done, in (0, 1]: round(F x count) items. A larger one than "
                                                 "last time continues where that run stopped.")],
    to: Annotated[str | None, typer.Option(help="The set's backbone, which re-embeds the images: number, label or "
                                                "@alias (default: @champion); must be the model the set was "
                                                "upgraded to.")] = None,
    order: Annotated[Order, typer.Option(help="uncertainty: most uncertain first (the sigma a FastFill "
                                              "transformation stored with the upgrade); random: a seeded "
                                              "permutation.")] = Order.uncertainty,
    images: Annotated[Path | None, typer.Option(help="Where the set's images are now, if they moved: the image "
                                                     "folder, or the prepared data folder (default: the place "
                                                     "recorded in the set's sources.json). They must be unchanged.")]
    = None,
    out: Annotated[Path | None, typer.Option(help="Write the new version here (relative to --root) instead of "
                                                  "replacing the set in place.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the random order (default: the one recorded by the "
                                                  "set's last backfill, else 0).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images decoded and embedded at a time.")] = 256,
    eval_queries: Annotated[int, typer.Option(min=0, help="Labelled items re-embedded as queries to score the "
                                                          "mixed gallery in the MLflow run (0: none).")] = 1000,
) -> None:
    """Re-embed part of an upgraded set with its backbone: FastFill's partial backfill, most uncertain items first.

    After `upgrade` (vectors only, no image read), backfill reads the chosen items' images again (through the set's
    sources.json, checked against the recorded data version) and writes a new version of the set where they carry
    the backbone's own vectors; each item records whether its vector is transformed or backfilled. Run it again
    with a larger --fraction to continue. Atomic: an error or a kill leaves the set as it was. Recorded as an
    MLflow run (with the mixed gallery's CMC and mAP when the set has labels) and in the set's backfill.json.
    """
    project: Project = ctx.obj
    registry = project.registry()
    source = project_files.find_set(set_name, project.root, project.sets_root)
    backbone = project_files.resolve_backbone(registry, to, project.settings().registry.champion_alias)
    plan = usecase.plan_backfill(source, backbone, fraction, order.value, project.root,
                                 dest=None if out is None else project.root / out, seed=seed, images=images)
    out_console = console()
    with progress(f"backfilling {source.path.name}", "images", out_console) if plan.embeds else nullcontext() as step:
        result = usecase.run_backfill(registry, plan, image_batch=batch_size, eval_queries=eval_queries,
                                      top_k=project.settings().evaluation.top_k, progress=step)
    m = result.output.manifest
    recorded = "; recorded the missing MLflow run of its last backfill" if result.recorded else ""
    if result.state == "unchanged":
        out_console.print(f"nothing to do: {plan.already} of {m.count} items of {result.output.path} are already "
                          f"backfilled, at least round({fraction} x {m.count}) = {plan.goal}; pass a larger "
                          f"--fraction to backfill more{recorded}", markup=False)
        return
    if result.state == "completed":
        out_console.print(f"{result.output.path} already holds this backfill ({m.backfilled} of {m.count} items, "
                          f"verified){recorded}", markup=False)
        return
    scores = ", ".join(f"{key} {result.metrics[key]:.3f} (was {result.metrics['input_' + key]:.3f})"
                       for key in result.metrics if not key.startswith("input_"))
    out_console.print(f"wrote {result.output.path}: {m.backfilled} of {m.count} items backfilled with "
                      f"{plan.backbone.ref} ({len(plan.chosen)} re-embedded now, {plan.order} order) from "
                      f"{plan.where}; recorded as an MLflow run of experiment fct-registry", markup=False)
    if scores:
        out_console.print(f"new-backbone queries ({min(eval_queries, int((plan.labels >= 0).sum()))} labelled items) "
                          f"against the mixed gallery: {scores}", markup=False)
