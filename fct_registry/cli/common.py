"""What every command of the CLI shares: the global options (:class:`Project`), one-line errors, rich tables, progress
of long steps."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup
from typer.exceptions import TyperException

from fct_registry.core.errors import ConfigError, FctError
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import RegisteredVersion
from fct_registry.usecases import project as project_files


class Commands(TyperGroup):
    """Runs a command; any error becomes one ``error: ...`` line on stderr and exit code 1.

    A domain error (:class:`~fct_registry.core.errors.FctError`) prints its message; any other exception (raised
    inside MLflow, SQLAlchemy, ONNX Runtime, Ray, ...) prints its type and the first line of its message. With
    ``--debug`` (or ``FCT_REGISTRY_DEBUG=1``) the traceback is shown instead. Usage errors, ``--help`` and Ctrl-C
    keep click's own handling.
    """

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (TyperException, typer.Exit, typer.Abort):
            raise
        except BrokenPipeError:  # the reader went away (e.g. `| head`): nothing more to say to it
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(1) from None
        except Exception as exc:
            if _debugging(ctx):
                raise
            typer.echo(f"error: {one_line(exc)}", err=True)
            raise typer.Exit(1) from None


def one_line(exc: BaseException) -> str:
    """A domain error's message, or ``<Type>: <first line>`` for any other exception (one line either way)."""
    text = " ".join(str(exc).split()) if isinstance(exc, FctError) else ""
    if not text:
        lines = str(exc).strip().splitlines()
        text = f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__
    return text


def _debugging(ctx: typer.Context) -> bool:
    project = ctx.obj
    return bool(getattr(project, "debug", False)) or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


DEBUG_VARIABLE = "FCT_REGISTRY_DEBUG"


@dataclass(frozen=True)
class Project:
    """The global options: project root, the folder of embedding sets, and whether to show tracebacks."""

    root: Path
    sets_root: Path
    debug: bool = False

    def registry(self) -> ModelRegistry:
        """The project's registry (tracking URI from params.yaml, ``MLFLOW_TRACKING_URI`` or the default)."""
        return project_files.open_registry(self.root)

    def settings(self) -> project_files.Settings:
        """The ``registry:`` and ``evaluation:`` params (defaults without params.yaml)."""
        return project_files.load_settings(self.root)


def use_project(ctx: typer.Context, root: Path, sets_root: Path, debug: bool = False) -> None:
    """Store the global options in ``ctx.obj`` for every command.

    Raises:
        ConfigError: ``root`` is not an existing folder (nothing is created for a mistyped path).
    """
    if not root.is_dir():
        raise ConfigError(f"--root {str(root)!r} is not an existing folder; expected the project directory "
                          "(create it first)")
    # This CLI draws its own progress bars and reports its own outcome: MLflow's artifact-download bars and INFO
    # lines (e.g. its store migrations) would clutter stderr.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    ctx.obj = Project(root, root / sets_root, debug)


def console() -> Console:
    """A console for results (stdout), without syntax highlighting.

    In a terminal, tables fit its width; piped into a file or another program, lines are as long as their content
    (rich would otherwise cut them at 80 columns).
    """
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(highlight=False, width=PIPED_WIDTH if piped else None)


PIPED_WIDTH = 100_000


def table(title: str, *columns: str) -> Table:
    """A left-titled table with the given column headers; a cell too wide for the terminal folds onto more
    lines, it is never cut (identifiers stay whole)."""
    result = Table(title=title, title_justify="left")
    for column in columns:
        result.add_column(column, overflow="fold")
    return result


def row(result: Table, *cells: object) -> None:
    """Add a row of plain-text cells (no rich markup interpreted)."""
    result.add_row(*(Text(str(cell)) for cell in cells))


AsJson = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")]


def print_json(value: Any) -> None:
    """Write ``value`` as indented JSON on stdout (pydantic models, e.g. model refs, as objects; paths as strings)."""
    def encode(item: Any) -> Any:
        return item.model_dump(mode="json") if hasattr(item, "model_dump") else str(item)

    typer.echo(json.dumps(value, indent=2, default=encode))


def version_json(version: RegisteredVersion) -> dict[str, Any]:
    """A registered version for ``--json`` output: name, number, role, label, full sha256, aliases, tags."""
    return {"name": version.name, "version": version.version, "role": version.role, "label": version.ref.label,
            "sha256": version.ref.sha256, "aliases": list(version.aliases), "tags": dict(version.tags)}


def named(version: RegisteredVersion | None) -> str:
    """``fct-backbone/3 @champion``, or ``not registered``."""
    if version is None:
        return "not registered"
    return " ".join([f"{version.name}/{version.version}", *(f"@{alias}" for alias in version.aliases)])


class RateColumn(ProgressColumn):
    """Items per second of a task, in the unit of its ``unit`` field (default ``items``); blank until measured."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "items")
        return Text("" if speed is None else f"{speed:,.1f} {unit}/s", style="progress.data.speed")


def progress_bars(out: Console) -> Progress:
    """rich bars for long steps: description, bar, done/total, rate, time remaining, elapsed, and the task's
    ``note`` field (give ``note=""`` to ``add_task``). Draws only on a terminal; see :func:`progress` for logs."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TimeRemainingColumn(), TimeElapsedColumn(), TextColumn("{task.fields[note]}"), console=out)


LOG_EVERY_S = 30.0
"""Off a terminal, a long step prints a progress line this often (seconds)."""


@contextmanager
def progress(what: str, unit: str = "items", out: Console | None = None, log_every_s: float = LOG_EVERY_S
             ) -> Iterator[Callable[[int, int | None], None]]:
    """The ``progress(done, total)`` callback of one long step, for a use case's ``progress`` parameter.

    In a terminal: a rich bar with done/total, the rate (``unit``/s), the time remaining and the time elapsed.
    Elsewhere (a log file, CI, a pipe), where rich draws nothing: ``<what>: <done>/<total> <unit>, <rate> <unit>/s,
    ~<n> s left`` every ``log_every_s`` seconds while the step runs, and ``<what>: <done> <unit> in <s> s, <rate>
    <unit>/s`` once it has ended without an error.
    """
    out = out or console()
    if out.is_terminal:
        with progress_bars(out) as bars:
            task = bars.add_task(what, total=None, note="", unit=unit)
            yield lambda done, total: bars.update(task, completed=done, total=total)
        return
    start = time.monotonic()
    state: dict[str, Any] = {"done": 0, "logged": start}

    def update(done: int, total: int | None) -> None:
        state["done"], now = done, time.monotonic()
        if now - state["logged"] >= log_every_s:
            state["logged"] = now
            rate = done / max(now - start, 1e-9)
            left = f", ~{(total - done) / rate:.0f} s left" if total and rate > 0 else ""
            out.print(f"{what}: {done}/{total if total is not None else '?'} {unit}, {rate:,.1f} {unit}/s{left}",
                      markup=False)

    yield update
    seconds = time.monotonic() - start
    out.print(f"{what}: {state['done']} {unit} in {seconds:.1f} s, {state['done'] / max(seconds, 1e-9):,.1f} "
              f"{unit}/s", markup=False)
