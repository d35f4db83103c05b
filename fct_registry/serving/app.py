"""The HTTP search service: gallery retrieval with queries embedded by the aliased (``champion``) backbone.

Endpoints:

- ``GET /health`` -> ``{"status": "ok"}``.
- ``GET /info`` -> the served pair (:class:`~fct_registry.serving.schemas.InfoResponse`).
- ``POST /search`` -> top-k ids and scores (:class:`~fct_registry.serving.schemas.SearchResponse`); see
  :func:`create_app` for the two bodies and what is checked.
- ``POST /reload`` (admin) -> re-resolves the alias and swaps in the new pair atomically (see
  :class:`~fct_registry.serving.state.ServingState`); 409 and the old pair keeps serving when it cannot. With an
  admin token it needs ``Authorization: Bearer <token>`` (401 otherwise; :mod:`fct_registry.serving.admin`).
- ``GET /openapi.json``, ``/docs``: the OpenAPI schema of the pair served now (:mod:`fct_registry.serving.openapi`).

Every bad request is answered 4xx with ``{"detail": "<one-line reason>"}`` (400 malformed multipart, 401 admin
token, 409 another model version, 413 body too large, 415 neither JSON nor multipart, 422 anything else) and the
service keeps serving. Blocking work runs off the event loop: decoding uploads, registry lookups and reloads in the
thread pool; embedding images (ONNX Runtime) and every faiss search in the search worker
(:mod:`fct_registry.serving.batcher`: queries that arrive together are embedded and searched in one call each), so
the event loop keeps answering while a search or a reload runs.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive

from fct_registry.core.config import ServingParams
from fct_registry.core.errors import (
    DataError,
    FctError,
    RegistryError,
    RuntimeInputError,
    SearchError,
    VersionMismatchError,
)
from fct_registry.onnx_boundary.images import decode_image
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.serving import DEFAULT_MAX_K, DEFAULT_MAX_UPLOAD_BYTES
from fct_registry.serving.admin import admin_guard
from fct_registry.serving.batcher import SearchBatcher
from fct_registry.serving.openapi import error_responses, openapi_schema
from fct_registry.serving.query_model import UnknownQueryModel, check_query_model
from fct_registry.serving.schemas import (
    EmbeddingQuery,
    FormK,
    HealthResponse,
    InfoResponse,
    QueryModelCheck,
    SearchResponse,
)
from fct_registry.serving.state import EXACT, ServedPair, ServingState
from fct_registry.usecases.gallery_index import Notify

DEFAULT_K = 10
FLOAT32_MAX = float(np.finfo(np.float32).max)
L2_LIMIT = FLOAT32_MAX**0.5 / 2
"""Largest L2 distance answered: beyond, float32 squared distances are about to overflow, and faiss then leaves
result slots unfilled (score -sqrt(FLT_MAX), position -1) instead of raising."""
FORM_FIELDS = ("image", "k")
_QUERY_ERRORS = (DataError, RuntimeInputError, SearchError, VersionMismatchError)


@dataclass(frozen=True)
class _Query:
    """One parsed ``/search`` request: an image or an embedding (with its stated model, if any), and k."""

    k: int
    image: bytes | None = None
    embedding: list[float] | None = None
    model: str | None = None


def create_app(registry: ModelRegistry, sets_root: str | os.PathLike, alias: str = "champion",
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_k: int = DEFAULT_MAX_K,
               providers: list[str] | None = None, admin_token: str | None = None,
               serving: ServingParams | None = None, notify: Notify | None = None) -> FastAPI:
    """Build the service over the pair ``alias`` selects; the pair is loaded now, before any request.

    ``POST /search`` takes one of two bodies:

    - ``multipart/form-data`` with a PNG/JPEG file field ``image`` (and optionally a field ``k``; no other field):
      the image is embedded here by the served backbone, so its model is right by construction
      (``"query_model": "embedded"`` in the answer).
    - ``application/json`` ``{"embedding": [d floats], "k": 10, "model": "fct-backbone/3"}``: a vector embedded
      by the client. ``model`` (optional) names the version that embedded it (the forms of
      :mod:`fct_registry.serving.query_model`: ``fct-backbone/<version>``, ``<version>``, ``<label>@<sha256
      prefix>``, ``<label>``, ``@<alias>``). The served version is answered with ``"query_model": "matched"``;
      another registered version is refused with 409 and a detail naming both versions; a name of no registered
      backbone with 422. When ``model`` is omitted the query is accepted as before (backward compatible) but only
      its length (= the backbone's dim), its finiteness and its float32 range are checked, and the answer says
      ``"query_model": "unchecked"``: a vector of another version with the same dim gets meaningless neighbours.

    ``k`` may also be a query parameter; a ``k`` in the body wins; the default is 10; at most
    ``min(max_k, gallery size)``.

    Args:
        registry: The model registry holding the backbones.
        sets_root: Folder searched (any depth) for the gallery embedding set made by the aliased backbone.
        alias: The backbone alias to serve, re-resolved by ``POST /reload``.
        max_upload_bytes: Largest accepted ``/search`` request body (image upload or JSON), bytes.
        max_k: Largest ``k`` accepted (also bounded by the gallery size).
        providers: ONNX Runtime providers; None: CUDA first when available, else CPU.
        admin_token: The token ``POST /reload`` requires as ``Authorization: Bearer <token>``; None leaves it open
            (only safe on loopback: :func:`~fct_registry.serving.server.serve` refuses other hosts then).
        serving: The search index and its knobs (``serving:`` of params.yaml); None: exact. An approximate index is
            loaded from beside the gallery set, or built and stored there first (at start and on ``/reload``).
        notify: Told when an index is built (a line before and after); None: nothing is said.

    Returns:
        The FastAPI app; its serving state is ``app.state.serving``.

    Raises:
        VersionMismatchError: No gallery set under ``sets_root`` was made by the aliased backbone (the service
            refuses to start); other errors of :func:`~fct_registry.serving.state.load_pair` likewise.
    """
    state = ServingState(registry, sets_root, alias, providers, serving or EXACT, notify)
    batcher = SearchBatcher()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.close()

    app = FastAPI(title="fct-registry search", summary="Retrieval over an FCT-compatible gallery", lifespan=lifespan)
    app.state.serving = state
    app.state.batcher = batcher
    app.add_exception_handler(RequestValidationError, _one_line_validation_error)
    app.add_exception_handler(StarletteHTTPException, _one_line_http_error)
    app.openapi = lambda: openapi_schema(app, state.pair, max_k)  # type: ignore[method-assign]
    require_admin = admin_guard(admin_token)

    @app.get("/health")
    def health() -> HealthResponse:
        return HealthResponse()

    @app.get("/info")
    def info() -> InfoResponse:
        return InfoResponse.of(state.pair, batcher.stats)

    @app.post("/search", responses=error_responses(400, 409, 413, 415, 422, 503))
    async def search(request: Request, k: Annotated[int | None, Query()] = None) -> SearchResponse:
        """Top-k gallery items for an uploaded image or a JSON embedding (see the request body's two forms).

        An embedding may state its ``model``: another version than the served one is refused with 409; without
        ``model`` only its dimension is checked and the answer says ``"query_model": "unchecked"``.
        """
        pair = state.pair  # this request's pair, even if a reload swaps another in meanwhile
        body = Request(request.scope, _limited(request.receive, max_upload_bytes))
        query = await _read_query(body, k, max_k, len(pair.index))
        try:
            if query.image is not None:  # decoded in the thread pool, embedded and searched by the search worker
                image = await run_in_threadpool(decode_image, query.image, pair.contract)
                result = await batcher.search_image(pair.index, image, pair.backbone, pair.contract, query.k)
                checked: QueryModelCheck = "embedded"
            else:
                if query.model is None:  # a vector alone: checked here in microseconds
                    queries, checked = _embedding_matrix(query.embedding, pair), "unchecked"
                else:  # the registry may be asked about the model's name: in the thread pool
                    queries, checked = await run_in_threadpool(_stated_vector, pair, state.registry, query)
                result = await batcher.search(pair.index, queries, query.k)
        except _QUERY_ERRORS as exc:
            raise HTTPException(422, str(exc)) from None
        _require_usable_scores(result.scores, pair.index.metric)
        return SearchResponse(ids=result.ids[0].tolist(), scores=result.scores[0].tolist(), metric=pair.index.metric,
                              model=str(pair.version.ref), query_model=checked)

    @app.post("/reload", responses=error_responses(401, 409), dependencies=[Depends(require_admin)])
    def reload() -> InfoResponse:
        """Re-resolve the alias and serve its backbone and gallery (admin: needs the admin token when set)."""
        old = state.pair
        try:
            return InfoResponse.of(state.reload(), batcher.stats)
        except FctError as exc:
            raise HTTPException(409, f"reload refused, still serving {old.version}: {exc}") from None

    return app


async def _read_query(body: Request, k: int | None, max_k: int, n_gallery: int) -> _Query:
    """Parse a ``/search`` body by its content type (415 for any other); ``k`` is the query parameter."""
    media = body.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "application/json":
        parsed = _validated(EmbeddingQuery, await body.body())
        return _Query(_checked_k(parsed.k, k, max_k, n_gallery), embedding=parsed.embedding, model=parsed.model)
    if media == "multipart/form-data":
        image, form_k = await _read_image_form(body)
        return _Query(_checked_k(form_k, k, max_k, n_gallery), image=image)
    raise HTTPException(415, f"content type {media or 'none'!r} is neither application/json (an embedding) "
                             "nor multipart/form-data (an image upload)")


def _stated_vector(pair: ServedPair, registry: ModelRegistry, query: _Query) -> tuple[np.ndarray, QueryModelCheck]:
    """An embedding query whose ``model`` is stated: that model checked, then the (1, d) float32 vector."""
    _check_model(query.model, pair, registry)
    return _embedding_matrix(query.embedding, pair), "matched"


def _check_model(model: str, pair: ServedPair, registry: ModelRegistry) -> None:
    """:func:`check_query_model` with its errors as HTTP answers: 409 mismatch, 422 unknown, 503 no registry."""
    try:
        check_query_model(model, pair.version, registry)
    except VersionMismatchError as exc:
        raise HTTPException(409, str(exc)) from None
    except UnknownQueryModel as exc:
        raise HTTPException(422, str(exc)) from None
    except RegistryError as exc:
        raise HTTPException(503, f"cannot check the query's model {model!r}: {exc}") from None


def _embedding_matrix(embedding: list[float] | None, pair: ServedPair) -> np.ndarray:
    """The embedding as a (1, d) float32 query; its length must be the backbone's dim and it must fit float32."""
    dim = pair.backbone.output_dim
    if embedding is None or len(embedding) != dim:
        raise HTTPException(422, f"embedding has {len(embedding or [])} values; expected {dim}, the embedding dim "
                                 f"of the served {pair.version}")
    with np.errstate(over="ignore"):
        vector = np.asarray(embedding, dtype=np.float32)[None]
    if not np.isfinite(vector).all():
        index = int(np.flatnonzero(~np.isfinite(vector[0]))[0])
        raise HTTPException(422, f"embedding.{index}: {embedding[index]!r} overflows float32; expected a finite "
                                 "float32 value")
    squared_norm = float(np.dot(vector[0].astype(np.float64), vector[0].astype(np.float64)))
    if squared_norm > FLOAT32_MAX or (pair.index.metric == "cosine" and np.float32(squared_norm) == 0
                                      and vector.any()):
        raise HTTPException(422, f"embedding's squared norm {squared_norm:.3g} is out of float32's range; expected "
                                 f"an embedding of the served backbone's scale")
    return vector


def _require_usable_scores(scores: np.ndarray, metric: str) -> None:
    """422 unless every score is finite and (l2) every distance is below :data:`L2_LIMIT`."""
    if not np.isfinite(scores).all() or (metric == "l2" and (scores <= -L2_LIMIT).any()):
        raise HTTPException(422, f"the query's {metric} scores are out of float32's range (distance beyond "
                                 f"{L2_LIMIT:.3g}, NaN or inf); expected an embedding of the served backbone's scale")


async def _read_image_form(body: Request) -> tuple[bytes, int | None]:
    """The ``image`` file's bytes and the optional ``k`` field of a multipart body (no other field)."""
    async with body.form(max_files=1, max_fields=1) as form:
        unknown = [name for name in form if name not in FORM_FIELDS]
        if unknown:
            raise HTTPException(422, f"multipart field {unknown[0]!r} is not accepted; expected 'image' (a PNG or "
                                     "JPEG file) and optionally 'k'")
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "multipart field 'image' must be a PNG or JPEG file upload")
        return await upload.read(), _validated(FormK, {"k": form.get("k")}).k


def _checked_k(body_k: int | None, param_k: int | None, max_k: int, n_gallery: int) -> int:
    """The body's ``k``, else the query parameter's, else :data:`DEFAULT_K`; 422 when either given ``k`` (also one
    the other overrides) is outside ``[1, min(max_k, n_gallery)]``."""
    top = min(max_k, n_gallery)
    for k in (body_k, param_k):
        if k is not None and not 1 <= k <= top:
            raise HTTPException(422, f"k must be in [1, {top}] (max_k {max_k}, gallery size {n_gallery}), got {k}")
    return next((k for k in (body_k, param_k) if k is not None), DEFAULT_K)


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
    return f"{where}: {first['msg']}" if where else str(first["msg"])


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) as one space: an answer's ``detail`` line."""
    return " ".join(text.split())


async def _one_line_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": one_line(_first_error(exc.errors()))})


async def _one_line_http_error(_: Request, exc: StarletteHTTPException) -> Response:
    """Every HTTP error (ours, Starlette's 400/404/405) as ``{"detail": "<one line>"}`` with its headers."""
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return JSONResponse({"detail": one_line(str(exc.detail))}, status_code=exc.status_code, headers=exc.headers)


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
