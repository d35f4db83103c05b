"""Request and response bodies of the search service (pydantic)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from fct_registry.serving.query_model import exact_names
from fct_registry.serving.state import ServedPair

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
MODEL_NAME_MAX_LENGTH = 256
"""Longest ``model`` an embedding query may state."""
QueryModelCheck = Literal["embedded", "matched", "unchecked"]
"""How a query's model version was established (see :class:`SearchResponse`)."""


class EmbeddingQuery(BaseModel):
    """``POST /search`` JSON body: one query vector already embedded by the served backbone.

    Attributes:
        embedding: (d,) finite numbers, d = the gallery's dim.
        k: Neighbours to return; overrides the ``k`` query parameter when given.
        model: The backbone version that embedded the query (see :mod:`fct_registry.serving.query_model` for the
            names); a version other than the served one is refused (409). None: not checked.
    """

    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types as the schema says: no true for 1.0
    embedding: list[FiniteFloat] = Field(
        min_length=1, description="The query vector, d finite numbers (d = the served backbone's embedding_dim)")
    k: int | None = Field(default=None, description="Neighbours to return; wins over the k query parameter")
    model: str | None = Field(
        default=None, min_length=1, max_length=MODEL_NAME_MAX_LENGTH, examples=["fct-backbone/3", "v3@3f2a9c0d1e4b"],
        description="The backbone version that embedded the query: fct-backbone/<version>, <version>, "
                    "<label>@<sha256 prefix>, <label> (its newest version) or @<alias>. Another version than the "
                    "served one is refused with 409; omitted: only the dimension is checked")


class FormK(BaseModel):
    """The optional ``k`` field of a multipart image query."""

    k: int | None = None


class ErrorResponse(BaseModel):
    """Every error answer (4xx, and 503): one line saying what was wrong and what was expected."""

    detail: str


class SearchResponse(BaseModel):
    """Top-k gallery items for one query, best first.

    Attributes:
        ids: (k,) gallery item ids.
        scores: (k,) scores, larger is better: -Euclidean distance (``l2``) or cosine similarity (``cosine``).
        metric: The gallery's metric.
        model: The served backbone, ``"<label>@<sha256 prefix>"``; queries and gallery share it.
        query_model: How the query's model version was established: ``"embedded"`` (an image, embedded here by
            the served backbone), ``"matched"`` (an embedding whose stated ``model`` is the served version) or
            ``"unchecked"`` (an embedding sent without ``model``: only its dimension was checked).
    """

    ids: list[int]
    scores: list[float]
    metric: Literal["l2", "cosine"]
    model: str
    query_model: QueryModelCheck = Field(
        description="embedded: an image embedded here; matched: the embedding's stated model is the served one; "
                    "unchecked: an embedding without model, only its dimension was checked")


class HealthResponse(BaseModel):
    """``GET /health``."""

    status: Literal["ok"] = "ok"


class BackboneInfo(BaseModel):
    """The served query model."""

    alias: str
    name: str
    version: int
    label: str
    sha256: str
    input_shape: list[int] = Field(description="(C, H, W) of the image input")
    embedding_dim: int
    providers: list[str] = Field(description="ONNX Runtime execution providers in use, in priority order")
    model_names: list[str] = Field(
        description="Names an embedding query's model may give for this exact version (a label or @alias also "
                    "works while it resolves to this version)")


class GalleryInfo(BaseModel):
    """The served gallery embedding set."""

    path: str
    model: str
    count: int
    dim: int
    metric: Literal["l2", "cosine"]
    lineage: list[str]


class InfoResponse(BaseModel):
    """``GET /info`` and ``POST /reload``: the pair being served."""

    backbone: BackboneInfo
    gallery: GalleryInfo

    @classmethod
    def of(cls, pair: ServedPair) -> InfoResponse:
        """Describe ``pair``."""
        version, manifest = pair.version, pair.gallery.manifest
        return cls(
            backbone=BackboneInfo(
                alias=pair.alias, name=version.name, version=version.version, label=version.ref.label,
                sha256=version.ref.sha256, input_shape=list(pair.contract.input_shape),
                embedding_dim=pair.backbone.output_dim, providers=list(pair.backbone.providers),
                model_names=exact_names(version),
            ),
            gallery=GalleryInfo(
                path=str(pair.gallery.path), model=str(manifest.model), count=manifest.count, dim=manifest.dim,
                metric=manifest.metric, lineage=list(manifest.lineage),
            ),
        )
