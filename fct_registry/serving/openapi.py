"""The service's OpenAPI schema, completed with what FastAPI cannot infer from ``POST /search``'s signature.

``/search`` reads its body itself (JSON or multipart, chosen by the content type), so FastAPI sees no body. The
schema built here declares both bodies, each 4xx as a one-line ``{"detail": ...}``, and the bounds that hold for
the pair being served now: the embedding's length (the backbone's dim) and ``k`` (``1 .. min(max_k, gallery
size)``). It is rebuilt on each request for ``/openapi.json``, so after a reload it describes the new pair.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from fct_registry.serving.query_model import exact_names
from fct_registry.serving.schemas import EmbeddingQuery, ErrorResponse
from fct_registry.serving.state import ServedPair

ERROR_STATUSES = {
    400: "Malformed multipart body (e.g. more than one file or field)",
    401: "Admin endpoint called without the admin token, or with a wrong one",
    409: "The query's stated model is not the served version, or a reload was refused (the old pair keeps serving)",
    413: "Request body larger than max_upload_bytes",
    415: "Content type neither application/json nor multipart/form-data",
    422: "Invalid request (bad embedding, image, k or model name)",
    503: "The registry could not be read to check the query's model",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` entries: each status answered with :class:`ErrorResponse`."""
    return {status: {"model": ErrorResponse, "description": ERROR_STATUSES[status]} for status in statuses}


def search_request_body(pair: ServedPair, max_k: int) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of ``POST /search`` for ``pair``: a JSON embedding or a multipart image."""
    dim, top = pair.backbone.output_dim, min(max_k, len(pair.index))
    k = {"type": "integer", "minimum": 1, "maximum": top,
         "description": "Neighbours to return; wins over the k query parameter (default 10)"}
    embedding = EmbeddingQuery.model_json_schema()
    embedding.pop("description", None)
    embedding["properties"]["embedding"] |= {"minItems": dim, "maxItems": dim}
    embedding["properties"]["k"] = {"anyOf": [k, {"type": "null"}], "default": None}
    embedding["properties"]["model"]["examples"] = exact_names(pair.version)
    image = {"type": "object", "required": ["image"], "additionalProperties": False,
             "properties": {"image": {"type": "string", "format": "binary", "description": "A PNG or JPEG file"},
                            "k": k}}
    return {"required": True, "content": {
        "application/json": {"schema": embedding},
        "multipart/form-data": {"schema": image, "encoding": {"image": {"contentType": "image/png, image/jpeg"}}},
    }}


def openapi_schema(app: FastAPI, pair: ServedPair, max_k: int) -> dict[str, Any]:
    """The app's OpenAPI schema with ``/search``'s bodies and bounds for ``pair`` (see the module docstring)."""
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, description=app.description,
                         routes=app.routes)
    search = schema["paths"]["/search"]["post"]
    search["requestBody"] = search_request_body(pair, max_k)
    for parameter in search.get("parameters", []):
        if parameter["name"] == "k":
            parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": min(max_k, len(pair.index))}
    return schema
