"""``fct-registry evaluate`` and ``search``: retrieval quality of a query model, nearest items of query images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fct_registry.cli.common import AsJson, Project, console, print_json, row, table
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
    baseline: Annotated[str | None, typer.Option(
        help="Set the gallery was upgraded from, for negative flips (old/old before, these queries after); "
             "default: the set under --sets-root that the gallery's upgrade.json names, if any.")] = None,
) -> None:
    """Retrieval table (CMC top-k, mAP) of a query model against a gallery set; own items excluded.

    For an upgraded gallery, also the negative flip rate of the update (queries right under the source set's
    model and set, wrong now) and the positive flip rate (the reverse)."""
    project: Project = ctx.obj
    gallery_set = project_files.find_set(gallery, project.root, project.sets_root, verify=True)
    before = (usecase.upgrade_source(gallery_set, project.sets_root) if baseline is None else
              project_files.find_set(baseline, project.root, project.sets_root, verify=True))
    result = usecase.evaluate_gallery(project.registry(), query_model, gallery_set, project.root / data, split,
                                        project.settings().evaluation.top_k, baseline=before)
    values = result.metrics | (result.flips.metrics() if result.flips is not None else {})
    scores = table(f"retrieval ({gallery_set.manifest.metric})", "case", "query model", "gallery model",
                   "n_query", "n_gallery", *values)
    case = f"{result.query.ref.label}_vs_{gallery_set.path.name}"
    row(scores, case, result.query.ref, gallery_set.manifest.model, result.n_query, gallery_set.manifest.count,
         *(f"{value:.4f}" for value in values.values()))
    out = console()
    out.print(scores)
    if result.flips is not None and result.baseline is not None:
        out.print(f"flips against {result.baseline.path} searched by {result.baseline.manifest.model}: "
                  f"{result.flips.negative} of {result.flips.n_query} queries right before and wrong now "
                  f"(negative), {result.flips.positive} the reverse (positive)", markup=False)


@app.command()
def search(
    ctx: typer.Context,
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE...", help="PNG or JPEG files.")],
    k: Annotated[int, typer.Option(help="Neighbours per image.")] = 10,
    gallery: Annotated[str | None, typer.Option(help="Gallery set (default: the first set under --sets-root at "
                                                     "the query model).")] = None,
    model: Annotated[str | None, typer.Option(help="Backbone that embeds the images: number, label or @alias "
                                                   "(default: @champion).")] = None,
    as_json: AsJson = False,
) -> None:
    """Find the k nearest gallery items of each image, embedded by a backbone (the champion by default).

    Each hit shows its stored label, and for a set embedded from an image folder (sets embed) its class name and
    image file."""
    project: Project = ctx.obj
    gallery_set = None if gallery is None else project_files.find_set(gallery, project.root, project.sets_root)
    query_model = model if model is not None else f"@{project.settings().registry.champion_alias}"
    found = usecase.search_images(project.registry(), images, k, query_model, project.sets_root, gallery_set)
    hits = [[_hit(found, rank, int(item), float(score), int(label))
             for rank, (item, score, label) in enumerate(zip(ids, scores, labels, strict=True), start=1)]
            for ids, scores, labels in zip(found.result.ids, found.result.scores, found.labels, strict=True)]
    if as_json:
        print_json({"model": found.model.ref, "model_version": found.model.version, "gallery": found.gallery.path,
                    "metric": found.gallery.manifest.metric,
                    "queries": [{"image": image, "hits": ranked} for image, ranked in zip(images, hits, strict=True)]})
        return
    named_classes, with_files = bool(found.class_names), bool(found.files)
    columns = ["rank", "item_id", "score", "label", *(["class"] if named_classes else []),
               *(["file"] if with_files else [])]
    out = console()
    for image, ranked in zip(images, hits, strict=True):
        under = f" (images under {found.folder})" if with_files else ""
        out.print(f"{image}: {found.model.ref} in {found.gallery.path}{under}", markup=False)
        listing = table("", *columns)
        for hit in ranked:
            cells = [hit["rank"], hit["item_id"], f"{hit['score']:.4f}", hit["label"]]
            if named_classes:
                cells.append(hit["class"] or "-")
            if with_files:
                cells.append(found.files.get(hit["item_id"], "-"))
            row(listing, *cells)
        out.print(listing)


def _hit(found: usecase.ImageSearch, rank: int, item: int, score: float, label: int) -> dict[str, object]:
    """One hit for ``--json`` and the table: rank, item_id, score, label; class and file when the set knows them."""
    hit: dict[str, object] = {"rank": rank, "item_id": item, "score": score, "label": label}
    if found.class_names:
        hit["class"] = found.class_name(label)
    if found.files and found.folder is not None and item in found.files:
        hit["file"] = str(found.folder / found.files[item])
    return hit
