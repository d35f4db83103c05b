"""Request and response bodies of the search service (pydantic)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from fct_registry.serving.state import ServedPair

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class EmbeddingQuery(BaseModel):
    """``POST /search`` JSON body: one query vector already embedded by the served backbone.

    Attributes:
        embedding: (d,) finite numbers, d = the gallery's dim.
        k: Neighbours to return; overrides the ``k`` query parameter when given.
    """

    model_config = ConfigDict(extra="forbid")
    embedding: list[FiniteFloat] = Field(min_length=1)
    k: int | None = None


class FormK(BaseModel):
    """The optional ``k`` field of a multipart image query."""

    k: int | None = None


class SearchResponse(BaseModel):
    """Top-k gallery items for one query, best first.

    Attributes:
        ids: (k,) gallery item ids.
        scores: (k,) scores, larger is better: -Euclidean distance (``l2``) or cosine similarity (``cosine``).
        metric: The gallery's metric.
        model: The served backbone, ``"<label>@<sha256 prefix>"``; queries and gallery share it.
    """

    ids: list[int]
    scores: list[float]
    metric: Literal["l2", "cosine"]
    model: str


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
            ),
            gallery=GalleryInfo(
                path=str(pair.gallery.path), model=str(manifest.model), count=manifest.count, dim=manifest.dim,
                metric=manifest.metric, lineage=list(manifest.lineage),
            ),
        )
