"""What every command of the CLI shares: the global options (:class:`Project`), one-line errors, rich tables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from fct_registry.core.errors import FctError
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import RegisteredVersion
from fct_registry.usecases import project as project_files


class Commands(TyperGroup):
    """Runs a command; a domain error becomes one ``error: ...`` line on stderr and exit code 1."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FctError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None


@dataclass(frozen=True)
class Project:
    """The global options: project root and the folder of embedding sets."""

    root: Path
    sets_root: Path

    def registry(self) -> ModelRegistry:
        """The project's registry (tracking URI from params.yaml, ``MLFLOW_TRACKING_URI`` or the default)."""
        return project_files.open_registry(self.root)

    def settings(self) -> project_files.Settings:
        """The ``registry:`` and ``evaluation:`` params (defaults without params.yaml)."""
        return project_files.load_settings(self.root)


def use_project(ctx: typer.Context, root: Path, sets_root: Path) -> None:
    """Store the global options in ``ctx.obj`` for every command."""
    # This CLI draws its own progress bars; MLflow's artifact-download bars would clutter stderr.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    ctx.obj = Project(root, root / sets_root)


def console() -> Console:
    """A console for results (stdout), without syntax highlighting."""
    return Console(highlight=False)


def table(title: str, *columns: str) -> Table:
    """A left-titled table with the given column headers."""
    result = Table(title=title, title_justify="left")
    for column in columns:
        result.add_column(column)
    return result


def row(result: Table, *cells: object) -> None:
    """Add a row of plain-text cells (no rich markup interpreted)."""
    result.add_row(*(Text(str(cell)) for cell in cells))


def named(version: RegisteredVersion | None) -> str:
    """``fct-backbone/3 @champion``, or ``not registered``."""
    if version is None:
        return "not registered"
    return " ".join([f"{version.name}/{version.version}", *(f"@{alias}" for alias in version.aliases)])
