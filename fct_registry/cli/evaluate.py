"""``fct-registry evaluate`` and ``search``: retrieval quality of a query model, nearest items of query images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fct_registry.cli.common import Project, console, row, table
from fct_registry.usecases import evaluate as usecase
from fct_registry.usecases import project as project_files

app = typer.Typer()


@app.command()
def evaluate(
    ctx: typer.Context,
    query_model: Annotated[str, typer.Option(help="Backbone that embeds the queries: number, label or @alias.")],
    gallery: Annotated[str, typer.Option(help="Gallery embedding set: a name under --sets-root or a path.")],
    data: Annotated[Path, typer.Option(help="Prepared data folder, relative to --root.")] = Path("data/prepared"),
    split: Annotated[str, typer.Option(help="Split whose images are the queries.")] = "test",
) -> None:
    """Retrieval table (CMC top-k, mAP) of a query model against a gallery set; own items excluded."""
    project: Project = ctx.obj
    gallery_set = project_files.find_set(gallery, project.root, project.sets_root, verify=True)
    result = usecase.evaluate_gallery(project.registry(), query_model, gallery_set, project.root / data, split,
                                        project.settings().evaluation.top_k)
    scores = table(f"retrieval ({gallery_set.manifest.metric})", "case", "query model", "gallery model",
                   "n_query", "n_gallery", *result.metrics)
    case = f"{result.query.ref.label}_vs_{gallery_set.path.name}"
    row(scores, case, result.query.ref, gallery_set.manifest.model, result.n_query, gallery_set.manifest.count,
         *(f"{value:.4f}" for value in result.metrics.values()))
    console().print(scores)


@app.command()
def search(
    ctx: typer.Context,
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE...", help="PNG or JPEG files.")],
    k: Annotated[int, typer.Option(help="Neighbours per image.")] = 10,
    gallery: Annotated[str | None, typer.Option(help="Gallery set (default: the first set under --sets-root at "
                                                     "the query model).")] = None,
    model: Annotated[str | None, typer.Option(help="Backbone that embeds the images: number, label or @alias "
                                                   "(default: @champion).")] = None,
) -> None:
    """Find the k nearest gallery items of each image, embedded by a backbone (the champion by default)."""
    project: Project = ctx.obj
    gallery_set = None if gallery is None else project_files.find_set(gallery, project.root, project.sets_root)
    query_model = model if model is not None else f"@{project.settings().registry.champion_alias}"
    found = usecase.search_images(project.registry(), images, k, query_model, project.sets_root, gallery_set)
    out = console()
    for image, ids, scores in zip(images, found.result.ids, found.result.scores, strict=True):
        out.print(f"{image}: {found.model.ref} in {found.gallery.path}", markup=False)
        ranked = table("", "rank", "item_id", "score")
        for rank, (item, score) in enumerate(zip(ids, scores, strict=True), start=1):
            row(ranked, rank, item, f"{score:.4f}")
        out.print(ranked)
