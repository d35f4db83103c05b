"""HTTP retrieval service over an FCT-compatible gallery.

- ``state``: the served pair (aliased backbone + gallery index: exact or approximate) and its atomic hot swap.
- ``batcher``: the search worker: queries queued together are embedded and searched in one call each.
- ``query_model``: the model version an embedding query states, checked against the served backbone.
- ``admin``: the bearer token of the admin endpoints (``POST /reload``).
- ``schemas``: pydantic request and response bodies.
- ``openapi``: the OpenAPI schema, with ``/search``'s two bodies and the served pair's bounds.
- ``app``: the FastAPI app factory :func:`~fct_registry.serving.app.create_app`.
- ``server``: :func:`~fct_registry.serving.server.serve` (uvicorn), which the ``fct-registry serve`` command runs.

Uploaded images are decoded by :func:`fct_registry.onnx_boundary.images.decode_image`, like the gallery's.

Nothing heavy is imported here, so the CLI can import the command without loading the web stack.
"""

DEFAULT_MAX_K = 1000
"""Largest ``k`` a ``/search`` request may ask for (also bounded by the gallery size)."""
DEFAULT_MAX_UPLOAD_BYTES = 8 * 1024 * 1024
"""Largest ``/search`` request body (image upload or JSON), bytes."""
