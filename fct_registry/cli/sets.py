"""``fct-registry sets ...``: the stored embedding sets."""

from __future__ import annotations

import typer

from fct_registry.cli.common import Project, console, named, row, table
from fct_registry.usecases import sets as usecase

app = typer.Typer(no_args_is_help=True, help="Stored embedding sets.")


@app.command("list")
def sets_list(ctx: typer.Context) -> None:
    """List the embedding sets under --sets-root with the backbone version of their vectors."""
    project: Project = ctx.obj
    listing = table(f"embedding sets under {project.sets_root}", "set", "model", "registered as", "side-info",
                   "dim", "count", "metric")
    for entry in usecase.list_sets(project.registry(), project.sets_root):
        m = entry.embedding_set.manifest
        row(listing, entry.embedding_set.path.relative_to(project.sets_root), m.model, named(entry.backbone),
             m.side_info_model or "-", m.dim, m.count, m.metric)
    console().print(listing)
