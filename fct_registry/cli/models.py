"""``fct-registry models ...`` and ``fct-registry lineage``: what is registered, how versions connect."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from fct_registry.cli.common import console, named, row, table
from fct_registry.registry.versions import RegisteredVersion
from fct_registry.usecases import models as usecase

app = typer.Typer(no_args_is_help=True, help="Registered models (backbones, side-info, transformations).")
lineage_app = typer.Typer()


class Role(str, Enum):
    """Model roles of the registry."""

    backbone = "backbone"
    side_info = "side-info"
    transformation = "transformation"


def _links(version: RegisteredVersion) -> str:
    tags = version.tags
    if "fct.source_label" not in tags:
        return ""
    side = f" + {tags['fct.side_info_label']}" if "fct.side_info_label" in tags else ""
    return f"{tags['fct.source_label']} -> {tags['fct.target_label']}{side}"


@app.command("list")
def models_list(
    ctx: typer.Context,
    role: Annotated[Role | None, typer.Option(help="Only this role.")] = None,
) -> None:
    """List registered model versions with their identity, dim, aliases and links."""
    roles = [role.value] if role is not None else [r.value for r in Role]
    versions = usecase.list_models(ctx.obj.registry(), roles)
    listing = table("registered models", "role", "version", "label", "sha256", "dim", "links", "mAP")
    for v in versions:
        row(listing, v.role, named(v), v.ref.label, v.ref.sha256[:12], v.tags.get("fct.embedding_dim", ""),
             _links(v), f"{float(v.tags['fct.map']):.3f}" if "fct.map" in v.tags else "")
    console().print(listing)


@lineage_app.command()
def lineage(ctx: typer.Context) -> None:
    """Show which backbone version came from which, through which transformation (a text tree)."""
    tree = usecase.lineage_text(ctx.obj.registry())
    console().print(tree or "no backbone registered", markup=False)
