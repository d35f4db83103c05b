"""Running the search service with uvicorn, and its ``fct-registry serve`` command."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from fct_registry.model_registry import ModelRegistry
from fct_registry.serving import DEFAULT_MAX_K, DEFAULT_MAX_UPLOAD_BYTES


def serve(registry: ModelRegistry, sets_root: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
          alias: str = "champion", max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
          max_k: int = DEFAULT_MAX_K, log_level: str = "info") -> None:
    """Load the served pair, then serve HTTP until interrupted (blocks).

    Args:
        registry: The model registry holding the backbones.
        sets_root: Folder holding the gallery embedding sets.
        host: Interface to bind; loopback by default (put a reverse proxy in front to expose it).
        port: TCP port.
        alias: Backbone alias to serve.
        max_upload_bytes: Largest ``/search`` request body, bytes.
        max_k: Largest ``k`` a query may ask for.
        log_level: uvicorn log level.

    Raises:
        VersionMismatchError: No gallery set matches the aliased backbone (nothing is bound); other errors of
            :func:`~fct_registry.serving.state.load_pair` likewise.
    """
    import uvicorn

    from fct_registry.serving.app import create_app

    app = create_app(registry, sets_root, alias, max_upload_bytes=max_upload_bytes, max_k=max_k)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def serve_command(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    max_upload_bytes: Annotated[int, typer.Option(help="Largest /search request body, bytes.")]
    = DEFAULT_MAX_UPLOAD_BYTES,
    max_k: Annotated[int, typer.Option(help="Largest k a query may ask for.")] = DEFAULT_MAX_K,
) -> None:
    """Serve gallery search over HTTP with the champion backbone until Ctrl-C.

    Refuses to start unless a set under --sets-root was made by the champion (upgrade the gallery first).
    POST /reload after a promote and upgrade swaps in the new champion and its gallery.
    """
    # ctx.obj is the CLI's Project; its FctError handling prints one "error: ..." line and exits 1.
    project = ctx.obj
    serve(project.registry(), project.sets_root, host, port, project.settings().registry.champion_alias,
          max_upload_bytes, max_k)
