"""``fct-registry upgrade``: bring a stored set to a newer backbone through the registered chain."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fct_registry.cli.common import Project, console, row, table
from fct_registry.engines.chain import ChainStep
from fct_registry.registry.versions import RegisteredVersion
from fct_registry.usecases import project as project_files
from fct_registry.usecases import upgrade as usecase
from fct_registry.vectors.embedding_set import EmbeddingSet

app = typer.Typer()
MIB = 2**20


class Engine(str, Enum):
    """Upgrade engines: threads of this process, or one Ray task per output shard (clusters)."""

    local = "local"
    ray = "ray"


def _plan_table(source: EmbeddingSet, target: RegisteredVersion, dest: Path, steps: list[ChainStep]) -> Table:
    plan = table(f"plan: {source.path} ({source.manifest.model}) -> {target.ref} into {dest}",
                   "step", "transformation", "from", "to", "side-info")
    for i, step in enumerate(steps, start=1):
        row(plan, i, step.name, step.source, step.target, step.side_info or "-")
    return plan


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
    batch_rows: Annotated[int, typer.Option(min=1, help="Rows per batch through ONNX Runtime.")] = usecase.BATCH_ROWS,
    workers: Annotated[int | None, typer.Option(min=1, help="Compute threads that split each shard's "
                                                            "batches (local engine, default 2) or Ray tasks at once "
                                                            "(default: as many as the cluster's CPUs allow).")] = None,
    worker_cpus: Annotated[float | None, typer.Option(help="CPUs per Ray task (--engine ray; default 1, fractions "
                                                           "allowed).")] = None,
    worker_memory_mib: Annotated[int | None, typer.Option(min=1, help="Memory per Ray task in MiB, reserved from the "
                                                               "nodes' memory (--engine ray).")] = None,
) -> None:
    """Upgrade a stored set to a newer backbone through the chain of registered transformations."""
    project: Project = ctx.obj
    registry = project.registry()
    source = project_files.find_set(set_name, project.root, project.sets_root)
    target = project_files.resolve_backbone(registry, to, project.settings().registry.champion_alias)
    dest = project.root / out if out is not None else usecase.default_output(project.sets_root, source, target)
    out = console()
    with Progress(TextColumn("upgrading"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=out, disable=dry_run) as bar:
        task = bar.add_task("upgrade", total=source.manifest.count)
        result = usecase.run_upgrade(
            registry, source, target, dest, engine=engine.value, address=address, dry_run=dry_run,
            batch_rows=batch_rows, workers=workers, worker_cpus=worker_cpus,
            worker_memory=None if worker_memory_mib is None else worker_memory_mib * MIB,
            progress=lambda done, _total: bar.update(task, completed=done),
            on_plan=lambda steps: out.print(_plan_table(source, target, dest, steps)))
    output = result.output
    if output is None:
        out.print(f"dry run: the chain is valid; nothing was written ({result.note})", markup=False)
    elif result.state == "completed":
        out.print(f"{output.path} already holds this upgrade ({output.manifest.count} items at "
                  f"{output.manifest.model}, verified); its MLflow run is recorded", markup=False)
    else:
        out.print(f"wrote {output.path}: {output.manifest.count} items at {output.manifest.model}; "
                  "recorded as an MLflow run of experiment fct-registry", markup=False)
