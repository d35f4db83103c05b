"""The ``fct-registry`` command line: parse the arguments, call a use case, print the result.

One module per command group (:mod:`fct_registry.cli.models`, ``sets``, ``promote``, ``upgrade``, ``backfill``,
``evaluate``, ``ui``), each a Typer app over the matching :mod:`fct_registry.usecases` module, assembled here.
Paths of the project (``SET``, ``--out``, ``--data``, ``--sets-root``) are relative to ``--root``; image files (and
``backfill --images``) are ordinary paths.
Model versions are an MLflow version number (``3``), a label (``v3``) or an alias (``@champion``). Any error raised
by a command prints one ``error: ...`` line on stderr and exits with code 1 (``--debug`` shows the traceback); a
failed command writes nothing, and a command that only reads creates nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fct_registry.cli import backfill, evaluate, fit, models, promote, sets, ui, upgrade
from fct_registry.cli.common import Commands, use_project

WORKFLOW = """Forward compatible training registry: upgrade stored gallery embeddings to a new backbone through
registered ONNX transformations, without reading an image again.

The workflow: 1. models add (your backbone and side-info model) -> 2. sets import / sets embed (store a gallery's
vectors) -> 3. fit (learn h: old [+ side-info] -> new, when a new backbone arrives) -> 4. promote (move the
champion alias) -> 5. upgrade (bring every stored set to the champion) -> 6. backfill (re-embed the most
uncertain items with the new backbone, a fraction at a time) -> 7. search / serve. lineage and ui show
what is registered."""

app = typer.Typer(cls=Commands, no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help=WORKFLOW)
app.add_typer(models.app, name="models")
app.add_typer(sets.app, name="sets")
for group in (fit.app, promote.app, upgrade.app, backfill.app, evaluate.app, ui.app, models.lineage_app):
    app.add_typer(group)


@app.callback()
def main(
    ctx: typer.Context,
    root: Annotated[Path, typer.Option(help="Project directory (params.yaml, registry/, data/).")] = Path("."),
    sets_root: Annotated[Path, typer.Option(help="Folder of embedding sets, relative to --root.")] = Path(
        "embeddings"),
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error instead of one line.")
                     ] = False,
) -> None:
    """Forward compatible training registry."""
    use_project(ctx, root, sets_root, debug)
