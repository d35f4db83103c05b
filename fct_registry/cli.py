"""The ``fct-registry`` command line: parse the arguments, call :mod:`fct_registry.workflows`, print the result.

Paths of the project (``SET``, ``--out``, ``--data``, ``--sets-root``) are relative to ``--root``; image files are
ordinary paths. Model versions are an MLflow version number (``3``), a label (``v3``) or an alias (``@champion``).
A domain error (:class:`~fct_registry.errors.FctError`) raised by any command prints one ``error: ...`` line on
stderr and exits with code 1; a failed command writes nothing.

Another module adds a command with one line, e.g. ``app.command("serve")(serve)`` (``fct_registry/serving``);
it gets the global options through ``ctx.obj`` (a :class:`Project`) and the error handling above.
"""

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from fct_registry import workflows
from fct_registry.embedding_set import EmbeddingSet
from fct_registry.errors import FctError
from fct_registry.model_registry import ModelRegistry, RegisteredVersion
from fct_registry.serving.server import serve_command
from fct_registry.upgrade import ChainStep


class _Commands(TyperGroup):
    """Runs a command; a domain error becomes one ``error: ...`` line on stderr and exit code 1."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FctError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(cls=_Commands, no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="Forward compatible training registry: upgrade stored gallery embeddings to a new backbone "
                       "through registered ONNX transformations, without reading an image again.")
models_app = typer.Typer(no_args_is_help=True, help="Registered models (backbones, side-info, transformations).")
sets_app = typer.Typer(no_args_is_help=True, help="Stored embedding sets.")
app.add_typer(models_app, name="models")
app.add_typer(sets_app, name="sets")


class Role(str, Enum):
    """Model roles of the registry."""

    backbone = "backbone"
    side_info = "side-info"
    transformation = "transformation"


class Engine(str, Enum):
    """Upgrade engines: ONNX Runtime in this process, or Ray Data actors (clusters)."""

    local = "local"
    ray = "ray"


@dataclass(frozen=True)
class Project:
    """The global options: project root and the folder of embedding sets."""

    root: Path
    sets_root: Path

    def registry(self) -> ModelRegistry:
        """The project's registry (tracking URI from params.yaml, ``MLFLOW_TRACKING_URI`` or the default)."""
        return workflows.open_registry(self.root)

    def settings(self) -> workflows.Settings:
        """The ``registry:`` and ``evaluation:`` params (defaults without params.yaml)."""
        return workflows.load_settings(self.root)


@app.callback()
def main(
    ctx: typer.Context,
    root: Annotated[Path, typer.Option(help="Project directory (params.yaml, registry/, data/).")] = Path("."),
    sets_root: Annotated[Path, typer.Option(help="Folder of embedding sets, relative to --root.")] = Path(
        "embeddings"),
) -> None:
    """Forward compatible training registry."""
    # This CLI draws its own progress bars; MLflow's artifact-download bars would clutter stderr.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    ctx.obj = Project(root, root / sets_root)


def _console() -> Console:
    return Console(highlight=False)


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    return table


def _row(table: Table, *cells: object) -> None:
    table.add_row(*(Text(str(cell)) for cell in cells))


def _named(version: RegisteredVersion | None) -> str:
    if version is None:
        return "not registered"
    return " ".join([f"{version.name}/{version.version}", *(f"@{alias}" for alias in version.aliases)])


def _links(version: RegisteredVersion) -> str:
    tags = version.tags
    if "fct.source_label" not in tags:
        return ""
    side = f" + {tags['fct.side_info_label']}" if "fct.side_info_label" in tags else ""
    return f"{tags['fct.source_label']} -> {tags['fct.target_label']}{side}"


@models_app.command("list")
def models_list(
    ctx: typer.Context,
    role: Annotated[Role | None, typer.Option(help="Only this role.")] = None,
) -> None:
    """List registered model versions with their identity, dim, aliases and links."""
    roles = [role.value] if role is not None else [r.value for r in Role]
    versions = workflows.list_models(ctx.obj.registry(), roles)
    table = _table("registered models", "role", "version", "label", "sha256", "dim", "links", "mAP")
    for v in versions:
        _row(table, v.role, _named(v), v.ref.label, v.ref.sha256[:12], v.tags.get("fct.embedding_dim", ""),
             _links(v), f"{float(v.tags['fct.map']):.3f}" if "fct.map" in v.tags else "")
    _console().print(table)


@app.command()
def lineage(ctx: typer.Context) -> None:
    """Show which backbone version came from which, through which transformation (a text tree)."""
    tree = workflows.lineage_text(ctx.obj.registry())
    _console().print(tree or "no backbone registered", markup=False)


@sets_app.command("list")
def sets_list(ctx: typer.Context) -> None:
    """List the embedding sets under --sets-root with the backbone version of their vectors."""
    project: Project = ctx.obj
    table = _table(f"embedding sets under {project.sets_root}", "set", "model", "registered as", "side-info",
                   "dim", "count", "metric")
    for entry in workflows.list_sets(project.registry(), project.sets_root):
        m = entry.embedding_set.manifest
        _row(table, entry.embedding_set.path.relative_to(project.sets_root), m.model, _named(entry.backbone),
             m.side_info_model or "-", m.dim, m.count, m.metric)
    _console().print(table)


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
) -> None:
    """Point the champion alias at a backbone once every stored set can be upgraded to it."""
    project: Project = ctx.obj
    settings = project.settings().registry
    result = workflows.promote(project.registry(), version, project.sets_root, alias or settings.champion_alias,
                               settings.promote_map_floor if map_floor is None else map_floor, force)
    table = _table(f"stored sets -> {result.version.ref}", "set", "model", "chain", "min link mAP", "status")
    for check in result.checks:
        chain = ", ".join(edge.transformation for edge in check.chain) or "(already there)"
        min_map = "" if check.min_map is None else f"{check.min_map:.3f}"
        _row(table, check.embedding_set.path, check.embedding_set.manifest.model, chain, min_map,
             check.problem or "ok")
    console = _console()
    console.print(table)
    note = " (forced past failed checks)" if result.forced else ""
    console.print(f"@{result.alias} -> {result.version}{note}", markup=False)


def _plan_table(source: EmbeddingSet, target: RegisteredVersion, dest: Path, steps: list[ChainStep]) -> Table:
    table = _table(f"plan: {source.path} ({source.manifest.model}) -> {target.ref} into {dest}",
                   "step", "transformation", "from", "to", "side-info")
    for i, step in enumerate(steps, start=1):
        _row(table, i, step.name, step.source, step.target, step.side_info or "-")
    return table


@app.command()
def upgrade(
    ctx: typer.Context,
    set_name: Annotated[str, typer.Argument(metavar="SET", help="Embedding set: a name under --sets-root or a "
                                                                "path.")],
    to: Annotated[str | None, typer.Option(help="Target backbone: number, label or @alias (default: "
                                                "@champion).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output set (default: <sets-root>/<set>@<target label>).")]
    = None,
    dry_run: Annotated[bool, typer.Option(help="Print the plan and validate it; write nothing.")] = False,
    engine: Annotated[Engine, typer.Option(help="Where the chain runs.")] = Engine.local,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (--engine ray); default: a local "
                                                     "Ray.")] = None,
    batch_rows: Annotated[int, typer.Option(min=1, help="Rows per batch through ONNX Runtime.")] = 65536,
) -> None:
    """Upgrade a stored set to a newer backbone through the chain of registered transformations."""
    project: Project = ctx.obj
    registry = project.registry()
    source = workflows.find_set(set_name, project.root, project.sets_root)
    target = workflows.resolve_backbone(registry, to, project.settings().registry.champion_alias)
    dest = project.root / out if out is not None else workflows.default_output(project.sets_root, source, target)
    console = _console()
    with Progress(TextColumn("upgrading"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=dry_run) as bar:
        task = bar.add_task("upgrade", total=source.manifest.count)
        _, output = workflows.run_upgrade(
            registry, source.path, target, dest, engine=engine.value, address=address, dry_run=dry_run,
            batch_rows=batch_rows, progress=lambda done, _total: bar.update(task, completed=done),
            on_plan=lambda steps: console.print(_plan_table(source, target, dest, steps)))
    if output is None:
        console.print(f"dry run: the chain is valid; nothing was written ({dest} would be created)", markup=False)
    else:
        console.print(f"wrote {output.path}: {output.manifest.count} items at {output.manifest.model}; "
                      "recorded as an MLflow run of experiment fct-registry", markup=False)


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
    gallery_set = workflows.find_set(gallery, project.root, project.sets_root, verify=True)
    result = workflows.evaluate_gallery(project.registry(), query_model, gallery_set, project.root / data, split,
                                        project.settings().evaluation.top_k)
    table = _table(f"retrieval ({gallery_set.manifest.metric})", "case", "query model", "gallery model",
                   "n_query", "n_gallery", *result.metrics)
    case = f"{result.query.ref.label}_vs_{gallery_set.path.name}"
    _row(table, case, result.query.ref, gallery_set.manifest.model, result.n_query, gallery_set.manifest.count,
         *(f"{value:.4f}" for value in result.metrics.values()))
    _console().print(table)


@app.command()
def search(
    ctx: typer.Context,
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE...", help="PNG or JPEG files.")],
    k: Annotated[int, typer.Option(help="Neighbours per image.")] = 10,
    gallery: Annotated[str | None, typer.Option(help="Gallery set (default: the first set under --sets-root at "
                                                     "the champion).")] = None,
) -> None:
    """Find the k nearest gallery items of each image, embedded by the champion backbone."""
    project: Project = ctx.obj
    gallery_set = None if gallery is None else workflows.find_set(gallery, project.root, project.sets_root)
    found = workflows.search_images(project.registry(), images, k,
                                    f"@{project.settings().registry.champion_alias}", project.sets_root, gallery_set)
    console = _console()
    for image, ids, scores in zip(images, found.result.ids, found.result.scores, strict=True):
        console.print(f"{image}: {found.model.ref} in {found.gallery.path}", markup=False)
        table = _table("", "rank", "item_id", "score")
        for rank, (item, score) in enumerate(zip(ids, scores, strict=True), start=1):
            _row(table, rank, item, f"{score:.4f}")
        console.print(table)


@app.command()
def ui(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
) -> None:
    """Run the MLflow UI over the registry (runs, models, tags, aliases) until Ctrl-C."""
    registry = ctx.obj.registry()
    _console().print(f"MLflow UI on http://{host}:{port} over {registry.tracking_uri} (Ctrl-C stops it)",
                     markup=False)
    raise typer.Exit(workflows.run_mlflow_ui(registry, host, port))


app.command("serve")(serve_command)
