"""Running the search service with uvicorn."""

from __future__ import annotations

import os

from fct_registry.registry.model_registry import ModelRegistry
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
