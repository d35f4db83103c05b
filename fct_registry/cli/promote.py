"""``fct-registry promote``: move the champion alias through the compatibility gate."""

from __future__ import annotations

from typing import Annotated

import typer

from fct_registry.cli.common import Project, console, row, table
from fct_registry.usecases import promote as usecase

app = typer.Typer()


@app.command()
def promote(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="Backbone version: number, label or @alias.")],
    alias: Annotated[str | None, typer.Option(
        help="Alias to set (default: registry.champion_alias of params.yaml, champion).")] = None,
    map_floor: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="Minimum registered link mAP of every set's chain (default: "
                               "registry.promote_map_floor of params.yaml, else 0).")] = None,
    force: Annotated[bool, typer.Option(help="Set the alias even when a stored set cannot follow.")] = False,
    max_negative_flips: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="Largest registered negative flip rate (fct.negative_flips) of any link of a set's "
                               "chain (default: registry.promote_negative_flip_ceiling of params.yaml, else "
                               "off).")] = None,
) -> None:
    """Point the champion alias at a backbone once every stored set can be upgraded to it."""
    project: Project = ctx.obj
    settings = project.settings().registry
    ceiling = settings.promote_negative_flip_ceiling if max_negative_flips is None else max_negative_flips
    result = usecase.promote(project.registry(), version, project.sets_root, alias or settings.champion_alias,
                               settings.promote_map_floor if map_floor is None else map_floor, force,
                               negative_flip_ceiling=ceiling)
    checks = table(f"stored sets -> {result.version.ref}", "set", "model", "chain", "min link mAP",
                   "max link neg. flips", "status")
    for check in result.checks:
        chain = ", ".join(edge.transformation for edge in check.chain) or "(already there)"
        min_map = "" if check.min_map is None else f"{check.min_map:.3f}"
        flips = "" if check.max_negative_flips is None else f"{check.max_negative_flips:.3f}"
        row(checks, check.embedding_set.path, check.embedding_set.manifest.model, chain, min_map, flips,
             check.problem or "ok")
    out = console()
    out.print(checks)
    note = " (forced past failed checks)" if result.forced else ""
    out.print(f"@{result.alias} -> {result.version}{note}", markup=False)
