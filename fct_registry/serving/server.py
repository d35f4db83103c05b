"""Running the search service with uvicorn."""

from __future__ import annotations

import gc
import os
import sys

from fct_registry.core.config import ServingParams
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.serving import DEFAULT_MAX_K, DEFAULT_MAX_UPLOAD_BYTES
from fct_registry.usecases.gallery_index import describe
from fct_registry.usecases.ui import require_token_off_loopback


def serve(registry: ModelRegistry, sets_root: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
          alias: str = "champion", max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
          max_k: int = DEFAULT_MAX_K, log_level: str = "info", admin_token: str | None = None,
          serving: ServingParams | None = None) -> None:
    """Load the served pair, then serve HTTP until interrupted (blocks).

    Args:
        registry: The model registry holding the backbones.
        sets_root: Folder holding the gallery embedding sets.
        host: Interface to bind; loopback by default (put a reverse proxy in front to expose it). Any other host
            needs ``admin_token``.
        port: TCP port.
        alias: Backbone alias to serve.
        max_upload_bytes: Largest ``/search`` request body, bytes.
        max_k: Largest ``k`` a query may ask for.
        log_level: uvicorn log level.
        admin_token: Token the admin endpoints (``POST /reload``) require as ``Authorization: Bearer <token>``;
            None leaves them open, which only a loopback ``host`` allows.
        serving: The search index and its knobs (``serving:`` of params.yaml); None: exact. A missing approximate
            index is built and stored beside the gallery set first (a line on stderr before and after).

    Raises:
        ConfigError: ``host`` is not loopback and there is no ``admin_token`` (checked first: nothing is loaded
            or bound).
        VersionMismatchError: No gallery set matches the aliased backbone (nothing is bound); other errors of
            :func:`~fct_registry.serving.state.load_pair` likewise.
    """
    require_token_off_loopback(host, admin_token)
    import uvicorn

    from fct_registry.serving.app import create_app

    app = create_app(registry, sets_root, alias, max_upload_bytes=max_upload_bytes, max_k=max_k,
                     admin_token=admin_token, serving=serving, notify=_say)
    # Move everything loaded so far (MLflow, the web stack, the pair: ~300,000 objects) out of the cyclic garbage
    # collector's reach: a full collection over them took 230 ms, a stall of every request in flight.
    gc.collect()
    gc.freeze()
    pair = app.state.serving.pair
    _say(f"searching {pair.gallery.path} ({pair.gallery.manifest.count} items) with "
         f"{describe(pair.served_index.record)}")
    uvicorn.run(app, host=host, port=port, log_level=log_level)  # uvloop and httptools when installed


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
