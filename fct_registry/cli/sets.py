"""``fct-registry sets ...``: the stored embedding sets: list, import stored vectors, export, embed an image folder,
index for serving."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from fct_registry.cli import index_options as opt
from fct_registry.cli.common import AsJson, Project, console, named, print_json, progress, row, table
from fct_registry.core.errors import ConfigError
from fct_registry.usecases import gallery_index
from fct_registry.usecases import project as project_files
from fct_registry.usecases import sets as usecase
from fct_registry.vectors.ann_store import StoredIndex
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.importing import Columns

app = typer.Typer(no_args_is_help=True, help="Stored embedding sets.")


@app.command("list")
def sets_list(ctx: typer.Context, as_json: AsJson = False) -> None:
    """List the embedding sets under --sets-root with the backbone version of their vectors (and any invalid set
    or unfinished write)."""
    project: Project = ctx.obj
    found = usecase.list_sets(project.registry(), project.sets_root)
    if as_json:
        print_json({"sets": [{"path": e.embedding_set.path, "registered_as": named(e.backbone),
                              **e.embedding_set.manifest.model_dump(mode="json", exclude={"shards", "lineage"}),
                              "indexes": [_index_json(i) for i in e.indexes]}
                             for e in found.entries],
                    "invalid": [{"path": path, "reason": reason} for path, reason in found.invalid],
                    "unfinished": found.unfinished})
        return
    listing = table(f"embedding sets under {project.sets_root}", "set", "model", "registered as", "side-info",
                   "dim", "count", "metric", "search index")
    for entry in found.entries:
        m = entry.embedding_set.manifest
        row(listing, entry.embedding_set.path.relative_to(project.sets_root), m.model, named(entry.backbone),
             m.side_info_model or "-", m.dim, m.count, m.metric, _indexes_cell(entry.indexes))
    out = console()
    out.print(listing)
    for path, reason in found.invalid:
        out.print(f"invalid set {path.relative_to(project.sets_root)}: {reason}", markup=False)
    for path in found.unfinished:
        out.print(f"unfinished write {path.relative_to(project.sets_root)} (interrupted, or still running); "
                  "`fct-registry sets clean` removes it", markup=False)


def _index_json(stored: StoredIndex) -> dict:
    record = None if stored.record is None else stored.record.model_dump(mode="json")
    return {"path": stored.path, "stale": stored.stale, "problem": stored.problem, **(record or {})}


def _indexes_cell(indexes: tuple[StoredIndex, ...]) -> str:
    """One line per stored index: ``ivf nlist=1024 nprobe=16: recall@10 0.996 (...)``, or why it is unusable."""
    lines = [gallery_index.describe(i.record) if i.problem is None else f"{i.path.name}: {i.problem}"
             for i in indexes]
    return "\n".join(lines) or "-"


@app.command("index")
def sets_index(
    ctx: typer.Context,
    set_name: Annotated[str, typer.Argument(metavar="SET", help="Embedding set: a name under --sets-root or a "
                                                                "path.")],
    index: opt.IndexKind = None,
    nlist: opt.Nlist = None,
    nprobe: opt.Nprobe = None,
    pq_m: opt.PqM = None,
    pq_nbits: opt.PqNbits = None,
    hnsw_m: opt.HnswM = None,
    ef_construction: opt.EfConstruction = None,
    ef_search: opt.EfSearch = None,
    train_size: opt.TrainSize = None,
    recall_queries: opt.RecallQueries = None,
    rebuild: Annotated[bool, typer.Option(help="Build again even when the index is stored.")] = False,
) -> None:
    """Build the approximate search index `serve` uses for a set and store it inside the set (ann/), with its
    recall@10 against exact search on held-out items of the set.

    The index is tied to the set's manifest (sha256): after the set changes it is stale and never used; building
    removes the set's stale indexes. Compatibility metrics (evaluate, promote) always search exactly.
    """
    project: Project = ctx.obj
    serving = gallery_index.serving_params(project.root, **opt.overrides(
        index, nlist=nlist, nprobe=nprobe, pq_m=pq_m, pq_nbits=pq_nbits, hnsw_m=hnsw_m,
        ef_construction=ef_construction, ef_search=ef_search, train_size=train_size, recall_queries=recall_queries))
    if serving.index == "exact":
        raise ConfigError("serving.index is 'exact': an exact index is never stored; pick --index ivf, ivfpq or hnsw")
    source = project_files.find_set(set_name, project.root, project.sets_root, verify=True)
    with progress(f"indexing {source.path.name}", "vectors") as step:
        served = gallery_index.open_serving_index(source, serving, progress=step, rebuild=rebuild)
    what = "built" if served.built else "already stored (pass --rebuild to build it again)"
    console().print(f"{served.path or source.path}: {gallery_index.describe(served.record)}; {what}", markup=False)


@app.command("clean")
def sets_clean(
    ctx: typer.Context,
    min_age: Annotated[float, typer.Option(help="Remove only leftovers not modified for this many minutes (a "
                                                "younger one may be a write still running).")] = 10.0,
) -> None:
    """Remove the hidden .tmp-* folders that interrupted writes left under --sets-root."""
    project: Project = ctx.obj
    removed = usecase.clean_unfinished(project.sets_root, min_age * 60)
    for path in removed:
        console().print(f"removed {path.relative_to(project.sets_root)}", markup=False)
    console().print(f"removed {len(removed)} unfinished write(s)", markup=False)


class Format(str, Enum):
    """Export layouts: one Parquet file, or a folder of .npy files."""

    parquet = "parquet"
    npy = "npy"


def _wrote(new: EmbeddingSet, project: Project) -> None:
    m = new.manifest
    side = f", side-info {m.side_info_model} ({m.side_info_dim}-d)" if m.side_info_model is not None else ""
    console().print(f"wrote {new.path}: {m.count} items of {m.model} ({m.dim}-d{side}), metric {m.metric}",
                    markup=False)


ModelOption = Annotated[str, typer.Option("--model", help="Backbone that made the vectors: number, label or @alias.")]
SideInfoOption = Annotated[str | None, typer.Option("--side-info", help="Side-info model of the vectors' side-info: "
                                                                        "number, label or @alias.")]
NameOption = Annotated[str, typer.Option("--name", help="Name of the new set under --sets-root.")]
OverwriteOption = Annotated[bool, typer.Option(help="Replace an existing output (once the new one is complete).")]


@app.command("import")
def sets_import(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="A .parquet file (one row per item) or a folder of .npy files "
                                                "(one file per column: <column>.npy).")],
    model: ModelOption,
    name: NameOption,
    side_info: SideInfoOption = None,
    id_column: Annotated[str, typer.Option(help="Column of integer item ids (npy: file stem; ids.npy is "
                                                "accepted for the default).")] = "item_id",
    vector_column: Annotated[str, typer.Option(help="Column of the backbone's vectors (list or fixed_size_list; npy: "
                                                    "(n, d) file; embeddings.npy is accepted for the default).")]
    = "embedding",
    side_info_column: Annotated[str, typer.Option(help="Column of the side-info vectors (read with --side-info "
                                                       "only).")] = "side_info",
    label_column: Annotated[str | None, typer.Option(help="Column of integer labels (default: label or labels when "
                                                          "present, else every label is -1).")] = None,
    batch_rows: Annotated[int, typer.Option(min=1, help="Rows read per batch (bounds memory).")] = 65536,
    overwrite: OverwriteOption = False,
) -> None:
    """Import stored gallery vectors (Parquet or .npy) of a registered backbone as a new embedding set.

    Dims are checked against the models' fct.embedding_dim tags; a bad row (null, NaN/inf, other width), a
    duplicate id or a missing column stops the import with one error line and nothing written.
    """
    project: Project = ctx.obj
    models = usecase.set_models(project.registry(), model, side_info)
    columns = Columns(id_column, vector_column, side_info_column if side_info is not None else None, label_column)
    vectors = usecase.open_vectors(source, models, columns)
    with progress(f"importing {vectors.path.name}", "vectors") as step:
        step(0, vectors.count)
        new = usecase.import_set(vectors, models, project.sets_root / name, batch_rows=batch_rows,
                                 overwrite=overwrite, progress=step)
    _wrote(new, project)


@app.command("export")
def sets_export(
    ctx: typer.Context,
    set_name: Annotated[str, typer.Argument(metavar="SET", help="Embedding set: a name under --sets-root or a "
                                                                "path.")],
    out: Annotated[Path, typer.Option(help="Parquet file or npy folder to write (relative to --root).")],
    format: Annotated[Format, typer.Option("--format", help="parquet: columns item_id, label, embedding "
                                                            "[, side_info]; npy: ids.npy, labels.npy, "
                                                            "embeddings.npy [, side_info.npy].")] = Format.parquet,
    batch_rows: Annotated[int, typer.Option(min=1, help="Rows per batch (bounds memory).")] = 65536,
    overwrite: OverwriteOption = False,
) -> None:
    """Export a set (e.g. an upgraded gallery) for a vector database: written to a temp path, then renamed."""
    project: Project = ctx.obj
    source = project_files.find_set(set_name, project.root, project.sets_root)
    with progress(f"exporting {source.path.name}", "vectors") as step:
        result = usecase.export(source, project.root / out, format.value, batch_rows=batch_rows,
                                overwrite=overwrite, progress=step)
    console().print(f"wrote {result.path} ({result.format}: {', '.join(result.files)}): {result.count} items of "
                    f"{source.manifest.model}", markup=False)


@app.command("embed")
def sets_embed(
    ctx: typer.Context,
    image_dir: Annotated[Path, typer.Argument(help="Folder of PNG/JPEG images: DIR/<class>/<image> (labels from "
                                                   "the sorted class folders) or DIR/<image> (labels -1).")],
    model: ModelOption,
    name: NameOption,
    side_info: SideInfoOption = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images decoded and embedded at a time.")] = 256,
    overwrite: OverwriteOption = False,
) -> None:
    """Embed a folder of images with a registered backbone (and side-info model) into a new set.

    Item ids are the images' positions in the sorted file list; the set's sources.json maps each to its file.
    """
    project: Project = ctx.obj
    registry = project.registry()
    models = usecase.set_models(registry, model, side_info)
    with progress(f"embedding {image_dir.name or image_dir}", "images") as step:
        new = usecase.embed_folder(registry, image_dir, models, project.sets_root / name, batch_size=batch_size,
                                   overwrite=overwrite, progress=step)
    _wrote(new, project)
