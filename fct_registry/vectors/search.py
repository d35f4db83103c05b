"""Exact nearest-neighbour search over gallery embeddings with faiss (with :mod:`fct_registry.vectors.ann_index`, the
only modules that import faiss; that one holds the approximate indexes used for serving).

Metrics (always explicit, never defaulted):

- ``"l2"``: Euclidean distance on the unnormalised features, as in FCT's evaluation (Ramanujan et al., CVPR 2022,
  arXiv 2112.02805, Sec. 5; reference code apple/ml-fct). faiss ``IndexFlatL2``.
- ``"cosine"``: both sides divided by their Euclidean (L2) norm, then the inner product (faiss ``IndexFlatIP``).
  The reference code normalises with the L1 norm, which mis-ranks e.g. query [2, 1] against [2, 1] and [1, 0];
  we do not.

Score convention (one for both metrics): **larger is better**. For ``l2`` a score is minus the Euclidean
distance (not squared), for ``cosine`` it is the cosine similarity, clipped to [-1, 1] (float32 rounding makes
the inner product of two unit vectors reach e.g. 1.0000006). Results are sorted by descending score; equal scores
are ordered by gallery position (lower first).

Error messages name rows by their position in the whole input (and their item id when ids are known), never by
their position inside an internal batch.
"""

from __future__ import annotations

import os
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
            vector (naming the row and its item id); ids of the wrong shape, non-integer or duplicated.
    """

    def __init__(self, embeddings: object, metric: Metric, ids: object = None, model: ModelRef | None = None):
        if metric not in METRICS:
            raise SearchError(f"metric must be one of {METRICS}, got {metric!r}")
        self.metric: Metric = metric
        self.model = model
        vectors = _matrix(embeddings, "gallery embeddings")
        self.ids = _gallery_ids(ids, len(vectors))
        self._check_values(vectors, "gallery embeddings", row_ids=None if ids is None else self.ids)
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
            k: neighbours per query, an integer (Python or numpy) with 1 <= k <= n_gallery (k <= n_gallery - 1
                with ``exclude_self``).
            exclude_self: drop each query's own item (gallery id == its query id) from its results; faiss is
                asked for k + 1 neighbours and the extra one is discarded when the query's own id is absent.
            query_ids: (n_query,) unique integer ids, required iff ``exclude_self``.

        Returns:
            SearchResult with scores (n_query, k) float32 and ids (n_query, k) int64.

        Raises:
            SearchError: bad k (not an integer, a bool, or out of range), query dim != index dim, no queries,
                non-finite or (cosine) zero queries, or values so large that float32 distances overflow (naming the
                row and its query id), query_ids given without
                ``exclude_self`` or missing / of the wrong shape / duplicated with it.
        """
        k = self._checked_k(k, exclude_self)
        vectors = _matrix(queries, "queries")
        own_ids = _query_ids(query_ids, len(vectors), exclude_self)
        vectors = self._queries(vectors, row_ids=own_ids)
        raw, positions = self._raw_search(vectors, k + int(exclude_self))
        unfilled = np.flatnonzero((positions < 0).any(axis=1))
        if unfilled.size:  # faiss leaves slots at -1 when float32 distances overflow (values around 1e19)
            raise SearchError(f"{_row('queries', int(unfilled[0]), 0, own_ids)} is too large to score in float32 "
                              f"(max |value| {float(np.abs(vectors[unfilled[0]]).max()):.3g}); expected an embedding "
                              "of ordinary magnitude")
        scores, positions = _order_ties(self._to_scores(raw), positions)
        ids = self.ids[positions]
        if exclude_self:
            scores, ids = _drop_own(scores, ids, own_ids, k)
        return SearchResult(scores=scores, ids=ids)

    def _raw_search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss' raw answer for checked (n_query, d) float32 queries: (n_query, k) float32 squared L2 distances or
        inner products, and (n_query, k) int64 gallery positions (-1 where a slot stayed unfilled). An approximate
        index (:class:`fct_registry.vectors.ann_index.AnnIndex`) overrides this."""
        return self._index.search(vectors, k)

    def score_all(self, queries: object, first_row: int = 0, row_ids: np.ndarray | None = None) -> np.ndarray:
        """Score of every gallery item for each query, in gallery order (for full rankings, e.g. mAP).

        Each query row is computed on its own with faiss' per-pair kernels (``fvec_L2sqr_ny`` /
        ``fvec_inner_products_ny``), so a row is bit-identical whatever other queries share the call
        (faiss' index search switches to a BLAS kernel at 20 queries, which rounds differently).

        Args:
            queries: (n_query, d) real numbers.
            first_row: for error messages only: the row number of ``queries[0]`` in the caller's whole input
                (a caller scoring its queries in batches passes the batch's start).
            row_ids: for error messages only: (n_query,) item ids of the queries, or None.

        Returns:
            (n_query, n_gallery) float32 scores, larger is better (-Euclidean distance or cosine similarity in
            [-1, 1]).

        Raises:
            SearchError: query dim != index dim, no queries, non-finite or (cosine) zero queries (naming the row
                ``first_row + i`` and, with ``row_ids``, its id).
        """
        vectors = self._queries(_matrix(queries, "queries"), first_row, row_ids)
        out = np.empty((len(vectors), len(self)), dtype=np.float32)
        kernel = faiss.fvec_L2sqr_ny if self.metric == "l2" else faiss.fvec_inner_products_ny
        gallery = self._index.get_xb()
        for row, vector in zip(out, vectors, strict=False):
            kernel(faiss.swig_ptr(row), faiss.swig_ptr(vector), gallery, self.dim, len(self))
        return self._to_scores(out)

    def _check_values(self, vectors: np.ndarray, name: str, first_row: int = 0,
                      row_ids: np.ndarray | None = None) -> None:
        """Refuse NaN/inf and (cosine) zero rows, naming the row in the caller's input; normalise (cosine)."""
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            raise SearchError(f"{_row(name, int(np.flatnonzero(~finite)[0]), first_row, row_ids)} contains NaN or "
                              "inf; expected finite real numbers")
        if self.metric == "cosine":
            zero = np.flatnonzero(~vectors.any(axis=1))
            if zero.size:
                raise SearchError(f"{_row(name, int(zero[0]), first_row, row_ids)} is a zero vector; cosine needs "
                                  "a non-zero norm")
            faiss.normalize_L2(vectors)

    def _queries(self, vectors: np.ndarray, first_row: int = 0, row_ids: np.ndarray | None = None) -> np.ndarray:
        if vectors.shape[1] != self.dim:
            raise SearchError(f"queries have dim {vectors.shape[1]} but the gallery index has dim {self.dim}")
        self._check_values(vectors, "queries", first_row, row_ids)
        return vectors

    def _checked_k(self, k: object, exclude_self: bool) -> int:
        """``k`` as a Python int (faiss refuses numpy integers); bools and non-integers are refused."""
        limit = len(self) - int(exclude_self)
        if not isinstance(k, Integral) or isinstance(k, bool) or not 1 <= k <= limit:
            raise SearchError(f"k must be an integer in [1, {limit}] (n_gallery={len(self)}, "
                              f"exclude_self={exclude_self}), got {k!r}")
        return int(k)

    def _to_scores(self, raw: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            return np.clip(raw, -1.0, 1.0, out=raw)  # float32 rounding: unit vectors can score 1.0000006
        np.maximum(raw, 0.0, out=raw)  # BLAS rounding can make a squared L2 slightly negative
        np.sqrt(raw, out=raw)
        return np.negative(raw, out=raw)


def _matrix(x: object, name: str) -> np.ndarray:
    """A new float32 (n >= 1, d >= 1) copy of ``x``."""
    vectors = as_float32_matrix(x, name, SearchError)
    if vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise SearchError(f"{name} must have at least one row and one column, got shape {vectors.shape}")
    return vectors


def _row(name: str, row: int, first_row: int, row_ids: np.ndarray | None) -> str:
    """``"queries row 1100"`` or ``"queries row 1100 (item_id 7)"``: a row named in the caller's whole input."""
    return f"{name} row {first_row + row}" + ("" if row_ids is None else f" (item_id {int(row_ids[row])})")


def _integer_vector(x: object, n: int, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.shape != (n,) or arr.dtype.kind not in "iu":
        raise SearchError(f"{name} must be an integer array of shape ({n},), got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def unique_ids(x: object, n: int, name: str) -> np.ndarray:
    """``x`` as (n,) int64 ids, each once.

    Raises:
        SearchError: ``x`` is not an integer array of shape (n,), or an id repeats (naming it).
    """
    arr = _integer_vector(x, n, name)
    unique, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise SearchError(f"{name} must be unique, id {int(unique[counts > 1][0])} repeats")
    return arr


def _gallery_ids(ids: object, n_gallery: int) -> np.ndarray:
    return np.arange(n_gallery, dtype=np.int64) if ids is None else unique_ids(ids, n_gallery, "gallery ids")


def _query_ids(query_ids: object, n_query: int, exclude_self: bool) -> np.ndarray | None:
    if exclude_self != (query_ids is not None):
        raise SearchError(f"query_ids are needed iff exclude_self=True; got exclude_self={exclude_self} "
                          f"and query_ids={'None' if query_ids is None else 'given'}")
    return None if query_ids is None else unique_ids(query_ids, n_query, "query_ids")


def _order_ties(scores: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by descending score, equal scores by ascending gallery position."""
    order = np.lexsort((positions, -scores), axis=-1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(positions, order, axis=1)


def _drop_own(scores: np.ndarray, ids: np.ndarray, own_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first k results of each row whose id differs from the row's query id."""
    order = np.argsort(ids == own_ids[:, None], axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def set_search_threads(threads: int | None) -> None:
    """How many OpenMP threads faiss may use for the searches of the *calling* thread (other threads keep theirs).

    A single query gains nothing from a parallel region and can lose milliseconds in it: on a busy machine the
    region waits until every one of its threads has been scheduled. A search worker sets 1 for small batches and
    all cores for large ones.

    Args:
        threads: A count >= 1, or None for every core this process may run on.

    Raises:
        SearchError: ``threads`` is below 1.
    """
    if threads is not None and (not isinstance(threads, Integral) or threads < 1):
        raise SearchError(f"threads must be an integer >= 1 or None, got {threads!r}")
    faiss.omp_set_num_threads(int(threads) if threads is not None else len(os.sched_getaffinity(0)))


def index_for_set(embedding_set: EmbeddingSet) -> GalleryIndex:
    """Load a whole embedding set into a :class:`GalleryIndex` (metric from its manifest, ids = item ids).

    The index keeps the set's ``ModelRef`` as ``.model`` so :func:`search_set` can refuse queries embedded by
    another model version.

    Raises:
        EmbeddingSetError: the set's shards cannot be read.
        SearchError: the stored vectors are unusable for the metric (NaN/inf, or a zero vector under cosine),
            naming the set, the row and its item id.
    """
    batch = embedding_set.read()
    manifest = embedding_set.manifest
    try:
        return GalleryIndex(batch.embeddings, manifest.metric, ids=batch.ids, model=manifest.model)
    except SearchError as exc:
        raise SearchError(f"embedding set {embedding_set.path}: {exc}") from None


def search_set(index: GalleryIndex, queries: object, query_model: ModelRef, k: int) -> SearchResult:
    """Search an index built by :func:`index_for_set` with queries embedded by ``query_model``.

    Args:
        index: a GalleryIndex whose ``model`` is set.
        queries: (n_query, d) embeddings produced by ``query_model``.
        query_model: the model version of the queries; must equal ``index.model``.
        k: neighbours per query, an integer (Python or numpy) with 1 <= k <= n_gallery.

    Returns:
        SearchResult with scores (n_query, k) float32 (larger is better) and ids (n_query, k) int64.

    Raises:
        VersionMismatchError: ``query_model != index.model`` (e.g. new-model queries against an old gallery).
        SearchError: ``index.model`` is None, or bad queries / k (see :meth:`GalleryIndex.search`; a bad query
            row is named by its row in ``queries``).
    """
    if index.model is None:
        raise SearchError("index has no model (index.model is None); build it with index_for_set")
    require_same_model(query_model, index.model)
    return index.search(queries, k)
