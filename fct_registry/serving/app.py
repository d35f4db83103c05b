"""The HTTP search service: gallery retrieval with queries embedded by the aliased (``champion``) backbone.

Endpoints:

- ``GET /health`` -> ``{"status": "ok"}``.
- ``GET /info`` -> the served pair (:class:`~fct_registry.serving.schemas.InfoResponse`).
- ``POST /search`` -> top-k ids and scores (:class:`~fct_registry.serving.schemas.SearchResponse`). The body is
  either ``multipart/form-data`` with a PNG/JPEG file field ``image`` (and optionally a field ``k``), embedded with
  the served backbone, or ``application/json`` ``{"embedding": [d floats], "k": 10}``, a vector already embedded
  by the served backbone. ``k`` may also be a query parameter; a ``k`` in the body wins; the default is 10.
- ``POST /reload`` -> re-resolves the alias and swaps in the new pair atomically (see
  :class:`~fct_registry.serving.state.ServingState`); 409 and the old pair keeps serving when it cannot.

Every bad request is answered 4xx with ``{"detail": "<one-line reason>"}`` (413 body too large, 415 neither JSON
nor multipart, 422 anything else) and the service keeps serving. Blocking work (ONNX Runtime, faiss, MLflow)
runs in the thread pool, so the event loop keeps answering while a search or a reload runs.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.types import Message, Receive

from fct_registry.core.errors import DataError, FctError, RuntimeInputError, SearchError, VersionMismatchError
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.onnx_boundary.images import decode_image
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.serving import DEFAULT_MAX_K, DEFAULT_MAX_UPLOAD_BYTES
from fct_registry.serving.schemas import EmbeddingQuery, FormK, HealthResponse, InfoResponse, SearchResponse
from fct_registry.serving.state import ServedPair, ServingState
from fct_registry.vectors.search import search_set

DEFAULT_K = 10
_QUERY_ERRORS = (DataError, RuntimeInputError, SearchError, VersionMismatchError)


def create_app(registry: ModelRegistry, sets_root: str | os.PathLike, alias: str = "champion",
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_k: int = DEFAULT_MAX_K,
               providers: list[str] | None = None) -> FastAPI:
    """Build the service over the pair ``alias`` selects; the pair is loaded now, before any request.

    Args:
        registry: The model registry holding the backbones.
        sets_root: Folder searched (any depth) for the gallery embedding set made by the aliased backbone.
        alias: The backbone alias to serve, re-resolved by ``POST /reload``.
        max_upload_bytes: Largest accepted ``/search`` request body (image upload or JSON), bytes.
        max_k: Largest ``k`` accepted (also bounded by the gallery size).
        providers: ONNX Runtime providers; None: CUDA first when available, else CPU.

    Returns:
        The FastAPI app; its serving state is ``app.state.serving``.

    Raises:
        VersionMismatchError: No gallery set under ``sets_root`` was made by the aliased backbone (the service
            refuses to start); other errors of :func:`~fct_registry.serving.state.load_pair` likewise.
    """
    state = ServingState(registry, sets_root, alias, providers)
    app = FastAPI(title="fct-registry search", summary="Retrieval over an FCT-compatible gallery")
    app.state.serving = state
    app.add_exception_handler(RequestValidationError, _one_line_validation_error)

    @app.get("/health")
    def health() -> HealthResponse:
        return HealthResponse()

    @app.get("/info")
    def info() -> InfoResponse:
        return InfoResponse.of(state.pair)

    @app.post("/search")
    async def search(request: Request, k: Annotated[int | None, Query()] = None) -> SearchResponse:
        pair = state.pair  # this request's pair, even if a reload swaps another in meanwhile
        body = Request(request.scope, _limited(request.receive, max_upload_bytes))
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media == "application/json":
            query = _validated(EmbeddingQuery, await body.body())
            embedding, image, body_k = query.embedding, None, query.k
        elif media == "multipart/form-data":
            image, body_k = await _read_image_form(body)
            embedding = None
        else:
            raise HTTPException(415, f"content type {media or 'none'!r} is neither application/json (an embedding) "
                                     "nor multipart/form-data (an image upload)")
        k = _checked_k(next((x for x in (body_k, k) if x is not None), DEFAULT_K), max_k)
        return await run_in_threadpool(_run_query, pair, embedding, image, k)

    @app.post("/reload")
    def reload() -> InfoResponse:
        old = state.pair
        try:
            return InfoResponse.of(state.reload())
        except FctError as exc:
            raise HTTPException(409, f"reload refused, still serving {old.version}: {exc}") from None

    return app


def _run_query(pair: ServedPair, embedding: list[float] | None, image: bytes | None, k: int) -> SearchResponse:
    """Embed the image (if any) with the pair's backbone, then search its gallery; bad input -> 422."""
    try:
        queries = [embedding] if image is None else embed_images(pair.backbone, decode_image(image, pair.contract),
                                                                     pair.contract)
        result = search_set(pair.index, queries, pair.version.ref, k)
    except _QUERY_ERRORS as exc:
        raise HTTPException(422, str(exc)) from None
    return SearchResponse(ids=result.ids[0].tolist(), scores=result.scores[0].tolist(), metric=pair.index.metric,
                          model=str(pair.version.ref))


async def _read_image_form(body: Request) -> tuple[bytes, int | None]:
    """The ``image`` file's bytes and the optional ``k`` field of a multipart body."""
    async with body.form(max_files=1, max_fields=1) as form:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "multipart field 'image' must be a PNG or JPEG file upload")
        return await upload.read(), _validated(FormK, {"k": form.get("k")}).k


def _checked_k(k: int, max_k: int) -> int:
    if not 1 <= k <= max_k:
        raise HTTPException(422, f"k must be in [1, {max_k}] (max_k), got {k}")
    return k


def _validated(model: type[BaseModel], data: bytes | dict[str, Any]) -> Any:
    """``model`` validated from JSON bytes or a dict; a validation error -> 422 with its first error."""
    try:
        return model.model_validate_json(data) if isinstance(data, bytes) else model.model_validate(data)
    except ValidationError as exc:
        raise HTTPException(422, _first_error(exc.errors())) from None


def _first_error(errors: Any) -> str:
    """One line from a pydantic/FastAPI error list, e.g. ``"embedding.3: Input should be a finite number"``."""
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


async def _one_line_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": _first_error(exc.errors())})


def _limited(receive: Receive, limit: int) -> Receive:
    """Wrap an ASGI ``receive`` so that reading more than ``limit`` body bytes raises 413 (nothing more is read)."""
    seen = 0

    async def receive_limited() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise HTTPException(413, f"request body exceeds {limit} bytes (max_upload_bytes)")
        return message

    return receive_limited
