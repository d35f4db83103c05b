"""HTTP retrieval service over an FCT-compatible gallery.

- ``state``: the served pair (aliased backbone + gallery index) and its atomic hot swap.
- ``images``: decoding uploaded PNG/JPEG queries like the gallery's images.
- ``schemas``: pydantic request and response bodies.
- ``app``: the FastAPI app factory :func:`~fct_registry.serving.app.create_app`.
- ``server``: :func:`~fct_registry.serving.server.serve` (uvicorn) and the ``fct-registry serve`` command.

Nothing heavy is imported here, so the CLI can import the command without loading the web stack.
"""

DEFAULT_MAX_K = 1000
"""Largest ``k`` a ``/search`` request may ask for (also bounded by the gallery size)."""
DEFAULT_MAX_UPLOAD_BYTES = 8 * 1024 * 1024
"""Largest ``/search`` request body (image upload or JSON), bytes."""
