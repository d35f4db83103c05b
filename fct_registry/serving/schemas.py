"""Request and response bodies of the search service (pydantic)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from fct_registry.serving.batcher import BatchStats
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


class IndexInfo(BaseModel):
    """The search index over the gallery: exact, or approximate with its knobs and its measured recall."""

    kind: Literal["exact", "ivf", "ivfpq", "hnsw"]
    knobs: dict[str, int] = Field(
        description="Build knobs as used (nlist, train_size, pq_m, pq_nbits, hnsw_m, ef_construction) and search "
                    "knobs (nprobe, ef_search); empty for exact")
    recall_at_10: float | None = Field(
        description="Mean |approximate top-10 ∩ exact top-10| / 10 over held-out items of the set (own item "
                    "excluded), with these knobs; 1.0 for exact; null for a 1-item gallery")
    recall_queries: int = Field(description="Held-out queries recall was measured on (0 for exact)")
    build_seconds: float | None = Field(description="Wall time of the build, s; null for exact")
    path: str | None = Field(description="The index's folder inside the set; null for exact or when not stored")
    built_at_load: bool = Field(description="Built when this pair was loaded (it was missing)")
    note: str | None = Field(default=None, description="Why the index was not stored, if it was not")

    @classmethod
    def of(cls, pair: ServedPair) -> IndexInfo:
        """Describe ``pair``'s index."""
        served = pair.served_index
        record = served.record
        if record is None:
            return cls(kind="exact", knobs={}, recall_at_10=1.0, recall_queries=0, build_seconds=None, path=None,
                       built_at_load=False)
        knobs = {name: value for name, value in (record.build | record.search).items() if name != "seed"}
        return cls(kind=record.kind, knobs=knobs, recall_at_10=record.recall_at_10,
                   recall_queries=record.recall_queries, build_seconds=record.build_seconds,
                   path=None if served.path is None else str(served.path), built_at_load=served.built,
                   note=served.note)


class BatchingInfo(BaseModel):
    """What the search worker has done since the service started (see :mod:`fct_registry.serving.batcher`)."""

    batches: int = Field(description="faiss calls")
    queries: int = Field(description="Queries searched")
    largest: int = Field(description="Most queries in one call")
    embed_batches: int = Field(description="ONNX Runtime calls embedding uploaded images")
    images: int = Field(description="Images embedded")


class InfoResponse(BaseModel):
    """``GET /info`` and ``POST /reload``: the pair being served."""

    backbone: BackboneInfo
    gallery: GalleryInfo
    index: IndexInfo
    batching: BatchingInfo

    @classmethod
    def of(cls, pair: ServedPair, stats: BatchStats) -> InfoResponse:
        """Describe ``pair`` (and the search worker's ``stats``)."""
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
            index=IndexInfo.of(pair),
            batching=BatchingInfo(batches=stats.batches, queries=stats.queries, largest=stats.largest,
                                  embed_batches=stats.embed_batches, images=stats.images),
        )
