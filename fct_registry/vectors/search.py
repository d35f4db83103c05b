"""Exact nearest-neighbour search over gallery embeddings with faiss (the only module that imports faiss).

Metrics (always explicit, never defaulted):

- ``"l2"``: Euclidean distance on the unnormalised features, as in FCT's evaluation (Ramanujan et al., CVPR 2022,
  arXiv 2112.02805, Sec. 5; reference code apple/ml-fct). faiss ``IndexFlatL2``.
- ``"cosine"``: both sides divided by their Euclidean (L2) norm, then the inner product (faiss ``IndexFlatIP``).
  The reference code normalises with the L1 norm, which mis-ranks e.g. query [2, 1] against [2, 1] and [1, 0];
  we do not.

Score convention (one for both metrics): **larger is better**. For ``l2`` a score is minus the Euclidean
distance (not squared), for ``cosine`` it is the cosine similarity in [-1, 1]. Results are sorted by
descending score; equal scores are ordered by gallery position (lower first).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Literal

import faiss
import numpy as np

from fct_registry.core.errors import SearchError
from fct_registry.core.refs import ModelRef
from fct_registry.vectors.batch import as_float32_matrix
from fct_registry.vectors.embedding_set import EmbeddingSet, require_same_model

Metric = Literal["l2", "cosine"]
METRICS: tuple[str, ...] = ("l2", "cosine")


@dataclass(frozen=True)
class SearchResult:
    """Top-k neighbours of each query.

    Attributes:
        scores: (n_query, k) float32, larger is better: -Euclidean distance (``l2``) or cosine similarity
            (``cosine``); each row descending.
        ids: (n_query, k) int64 gallery item ids (the index's ``ids``), in the order of ``scores``.
    """

    scores: np.ndarray
    ids: np.ndarray


class GalleryIndex:
    """Exact (brute-force) faiss index over a gallery, with item ids and optionally the model that made it.

    Args:
        embeddings: (n_gallery, d) real numbers (lists, any float dtype, memmaps, views); copied as float32.
        metric: ``"l2"`` or ``"cosine"`` (required; see the module docstring).
        ids: (n_gallery,) unique integer item ids; default ``0 .. n_gallery-1`` (gallery positions).
        model: the model version that produced ``embeddings``; set by :func:`index_for_set`, checked by
            :func:`search_set`.

    Raises:
        SearchError: unknown metric; embeddings not (n_gallery >= 1, d >= 1), non-finite, or (cosine) a zero
            vector; ids of the wrong shape, non-integer or duplicated.
    """

    def __init__(self, embeddings: object, metric: Metric, ids: object = None, model: ModelRef | None = None):
        if metric not in METRICS:
            raise SearchError(f"metric must be one of {METRICS}, got {metric!r}")
        self.metric: Metric = metric
        self.model = model
        vectors = self._prepare(embeddings, "gallery embeddings")
        self.ids = _gallery_ids(ids, len(vectors))
        self._index = faiss.IndexFlatL2(vectors.shape[1]) if metric == "l2" else faiss.IndexFlatIP(vectors.shape[1])
        self._index.add(vectors)

    @property
    def dim(self) -> int:
        """d, the embedding dimension."""
        return self._index.d

    def __len__(self) -> int:
        """n_gallery, the number of indexed items."""
        return self._index.ntotal

    def search(self, queries: object, k: int, exclude_self: bool = False, query_ids: object = None) -> SearchResult:
        """Exact top-``k`` gallery items for each query (faiss IndexFlatL2 / IndexFlatIP).

        Within the returned k, equal scores are ordered by gallery position; which of several items tied at
        the k-th place is returned is faiss' choice.

        Args:
            queries: (n_query, d) real numbers; a single query must be passed as (1, d).
            k: neighbours per query, 1 <= k <= n_gallery (k <= n_gallery - 1 with ``exclude_self``).
            exclude_self: drop each query's own item (gallery id == its query id) from its results; faiss is
                asked for k + 1 neighbours and the extra one is discarded when the query's own id is absent.
            query_ids: (n_query,) integer ids, required iff ``exclude_self``.

        Returns:
            SearchResult with scores (n_query, k) float32 and ids (n_query, k) int64.

        Raises:
            SearchError: bad k, query dim != index dim, non-finite or (cosine) zero queries, query_ids given
                without ``exclude_self`` or missing / of the wrong shape with it.
        """
        vectors = self._queries(queries)
        self._check_k(k, exclude_self)
        own_ids = _query_ids(query_ids, len(vectors), exclude_self)
        raw, positions = self._index.search(vectors, k + int(exclude_self))
        scores, positions = _order_ties(self._to_scores(raw), positions)
        ids = self.ids[positions]
        if exclude_self:
            scores, ids = _drop_own(scores, ids, own_ids, k)
        return SearchResult(scores=scores, ids=ids)

    def score_all(self, queries: object) -> np.ndarray:
        """Score of every gallery item for each query, in gallery order (for full rankings, e.g. mAP).

        Each query row is computed on its own with faiss' per-pair kernels (``fvec_L2sqr_ny`` /
        ``fvec_inner_products_ny``), so a row is bit-identical whatever other queries share the call
        (faiss' index search switches to a BLAS kernel at 20 queries, which rounds differently).

        Args:
            queries: (n_query, d) real numbers.

        Returns:
            (n_query, n_gallery) float32 scores, larger is better (-Euclidean distance or cosine similarity).

        Raises:
            SearchError: query dim != index dim, non-finite or (cosine) zero queries.
        """
        vectors = self._queries(queries)
        out = np.empty((len(vectors), len(self)), dtype=np.float32)
        kernel = faiss.fvec_L2sqr_ny if self.metric == "l2" else faiss.fvec_inner_products_ny
        gallery = self._index.get_xb()
        for row, vector in zip(out, vectors, strict=False):
            kernel(faiss.swig_ptr(row), faiss.swig_ptr(vector), gallery, self.dim, len(self))
        return self._to_scores(out)

    def _prepare(self, x: object, name: str) -> np.ndarray:
        vectors = as_float32_matrix(x, name, SearchError)
        if vectors.shape[0] == 0 or vectors.shape[1] == 0:
            raise SearchError(f"{name} must have at least one row and one column, got shape {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise SearchError(f"{name} row {int(np.argwhere(~np.isfinite(vectors))[0, 0])} contains NaN or inf")
        if self.metric == "cosine":
            zero = np.flatnonzero(~vectors.any(axis=1))
            if zero.size:
                raise SearchError(f"{name} row {int(zero[0])} is a zero vector; cosine needs a non-zero norm")
            faiss.normalize_L2(vectors)
        return vectors

    def _queries(self, queries: object) -> np.ndarray:
        vectors = self._prepare(queries, "queries")
        if vectors.shape[1] != self.dim:
            raise SearchError(f"queries have dim {vectors.shape[1]} but the gallery index has dim {self.dim}")
        return vectors

    def _check_k(self, k: int, exclude_self: bool) -> None:
        limit = len(self) - int(exclude_self)
        if not isinstance(k, Integral) or isinstance(k, bool) or not 1 <= k <= limit:
            raise SearchError(f"k must be an integer in [1, {limit}] (n_gallery={len(self)}, "
                              f"exclude_self={exclude_self}), got {k!r}")

    def _to_scores(self, raw: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            return raw
        np.maximum(raw, 0.0, out=raw)  # BLAS rounding can make a squared L2 slightly negative
        np.sqrt(raw, out=raw)
        return np.negative(raw, out=raw)


def _integer_vector(x: object, n: int, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.shape != (n,) or arr.dtype.kind not in "iu":
        raise SearchError(f"{name} must be an integer array of shape ({n},), got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def _gallery_ids(ids: object, n_gallery: int) -> np.ndarray:
    if ids is None:
        return np.arange(n_gallery, dtype=np.int64)
    arr = _integer_vector(ids, n_gallery, "gallery ids")
    unique, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise SearchError(f"gallery ids must be unique, id {int(unique[counts > 1][0])} repeats")
    return arr


def _query_ids(query_ids: object, n_query: int, exclude_self: bool) -> np.ndarray | None:
    if exclude_self != (query_ids is not None):
        raise SearchError(f"query_ids are needed iff exclude_self=True; got exclude_self={exclude_self} "
                          f"and query_ids={'None' if query_ids is None else 'given'}")
    return None if query_ids is None else _integer_vector(query_ids, n_query, "query_ids")


def _order_ties(scores: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by descending score, equal scores by ascending gallery position."""
    order = np.lexsort((positions, -scores), axis=-1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(positions, order, axis=1)


def _drop_own(scores: np.ndarray, ids: np.ndarray, own_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first k results of each row whose id differs from the row's query id."""
    order = np.argsort(ids == own_ids[:, None], axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def index_for_set(embedding_set: EmbeddingSet) -> GalleryIndex:
    """Load a whole embedding set into a :class:`GalleryIndex` (metric from its manifest, ids = item ids).

    The index keeps the set's ``ModelRef`` as ``.model`` so :func:`search_set` can refuse queries embedded by
    another model version.

    Raises:
        EmbeddingSetError: the set's shards cannot be read.
        SearchError: the stored vectors are unusable for the metric (e.g. a zero vector under cosine).
    """
    batch = embedding_set.read()
    manifest = embedding_set.manifest
    return GalleryIndex(batch.embeddings, manifest.metric, ids=batch.ids, model=manifest.model)


def search_set(index: GalleryIndex, queries: object, query_model: ModelRef, k: int) -> SearchResult:
    """Search an index built by :func:`index_for_set` with queries embedded by ``query_model``.

    Args:
        index: a GalleryIndex whose ``model`` is set.
        queries: (n_query, d) embeddings produced by ``query_model``.
        query_model: the model version of the queries; must equal ``index.model``.
        k: neighbours per query, 1 <= k <= n_gallery.

    Returns:
        SearchResult with scores (n_query, k) float32 (larger is better) and ids (n_query, k) int64.

    Raises:
        VersionMismatchError: ``query_model != index.model`` (e.g. new-model queries against an old gallery).
        SearchError: ``index.model`` is None, or bad queries / k (see :meth:`GalleryIndex.search`).
    """
    if index.model is None:
        raise SearchError("index has no model (index.model is None); build it with index_for_set")
    require_same_model(query_model, index.model)
    return index.search(queries, k)
