"""Retrieval metrics: CMC top-k and mAP of queries against a gallery.

Protocol of FCT (Ramanujan et al., CVPR 2022, arXiv 2112.02805, Sec. 5; reference code apple/ml-fct): the test
split is both query and gallery set, each query's own item is excluded, features are compared with the metric
the gallery is searched with (``"l2"``: Euclidean on unnormalised features; ``"cosine"``), and we report

- CMC top-k: fraction of queries whose first correct match (a gallery item with the query's label) is within
  the first k ranked gallery items;
- mAP: mean over queries of the average precision over the FULL ranking of the gallery, where every gallery
  item with the query's label is relevant: AP = mean over relevant items of (relevant items ranked at or above
  it) / (its rank).

A query with no relevant gallery item (its class is absent, or only its own item had it) counts as a CMC miss
and has AP = 0; it stays in the denominators. Metrics are fractions in [0, 1]. Scores come from
:meth:`fct_registry.vectors.search.GalleryIndex.score_all` (faiss, float32; cosine clipped to [-1, 1]); equal
scores are ranked by gallery position, lower position first (a stable sort), so results are deterministic and
identical for every ``batch_size``. Ties are between equal float32 scores: items whose exact distances are equal
but whose float32 scores differ by rounding are ranked by those scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import numpy as np

from fct_registry.core.errors import SearchError
from fct_registry.vectors.search import GalleryIndex, Metric, unique_ids


def retrieval_metrics(query_emb: object, query_labels: object, gallery_emb: object, gallery_labels: object,
                      metric: Metric, query_ids: object = None, gallery_ids: object = None,
                      top_k: Sequence[int] = (1, 5), batch_size: int = 1024) -> dict[str, float]:
    """CMC top-k and mAP of queries against a gallery (see the module docstring for the protocol).

    Queries are scored in batches of ``batch_size`` rows; peak memory is about
    ``50 * batch_size * n_gallery`` bytes beyond the inputs.

    Args:
        query_emb: (n_query, d) query embeddings.
        query_labels: (n_query,) integer class labels, >= 0.
        gallery_emb: (n_gallery, d) gallery embeddings.
        gallery_labels: (n_gallery,) integer class labels; items with a negative label (-1 = unknown) are
            ranked but never relevant.
        metric: ``"l2"`` or ``"cosine"`` (required).
        query_ids: (n_query,) unique integer item ids; a query's gallery item with the same id is excluded.
        gallery_ids: (n_gallery,) unique integer item ids. Pass both id arrays (self-match exclusion, e.g.
            the test split against itself) or neither (query and gallery are distinct items).
        top_k: ranks k >= 1 (Python or numpy integers) at which CMC is reported.
        batch_size: queries per batch, an integer >= 1.

    Returns:
        ``{"cmc_top<k>": float for k in top_k, "map": float}``, e.g. keys cmc_top1, cmc_top5, map.

    Raises:
        SearchError: bad metric, shapes (no queries included), labels, ids (only one of the two given, or duplicated
            query ids), top_k or batch_size; a NaN/inf or (cosine) zero vector, naming its row in ``query_emb`` /
            ``gallery_emb`` and its item id when ids are given.
    """
    index, queries, q_labels, g_labels, own_ids = _inputs(query_emb, query_labels, gallery_emb, gallery_labels,
                                                          metric, query_ids, gallery_ids)
    n_query = len(queries)
    ks = _top_k(top_k)
    batch_size = _batch_size(batch_size)
    first_hits, aps = [], []
    for start in range(0, n_query, batch_size):
        rows = slice(start, start + batch_size)
        scores = index.score_all(queries[rows], first_row=start, row_ids=None if own_ids is None else own_ids[rows])
        relevant = g_labels[None, :] == q_labels[rows, None]
        if own_ids is not None:
            own = index.ids[None, :] == own_ids[rows, None]
            scores[own] = -np.inf  # ranked last, so the ranks of all other items are unaffected
            relevant &= ~own
        first_hit, ap = _rank_metrics(scores, relevant)
        first_hits.append(first_hit)
        aps.append(ap)
    first_hit = np.concatenate(first_hits)
    result = {f"cmc_top{k}": float(np.mean(first_hit <= k)) for k in ks}
    result["map"] = float(np.mean(np.concatenate(aps)))
    return result


def top1_correct(query_emb: object, query_labels: object, gallery_emb: object, gallery_labels: object,
                 metric: Metric, query_ids: object = None, gallery_ids: object = None,
                 batch_size: int = 1024) -> np.ndarray:
    """Whether each query's first-ranked gallery item has its label: the per-query CMC top-1 hit.

    Same protocol, arguments and errors as :func:`retrieval_metrics` (own item excluded by id, equal scores ranked
    by gallery position), so ``top1_correct(...).mean() == retrieval_metrics(...)["cmc_top1"]``; only the best item
    is looked for (an argmax, no sort), so peak memory is about ``5 * batch_size * n_gallery`` bytes. It is the
    input of negative flips (:func:`fct_registry.vectors.flips.negative_flips`; Yan et al., CVPR 2021).

    Args:
        query_emb: (n_query, d) query embeddings.
        query_labels: (n_query,) integer class labels, >= 0.
        gallery_emb: (n_gallery, d) gallery embeddings.
        gallery_labels: (n_gallery,) integer labels; negative (unknown) labels are never right.
        metric: ``"l2"`` or ``"cosine"`` (required).
        query_ids: (n_query,) unique integer item ids (with ``gallery_ids``: own item excluded).
        gallery_ids: (n_gallery,) unique integer item ids.
        batch_size: queries per batch, an integer >= 1.

    Returns:
        (n_query,) bool: True where the top-1 neighbour is relevant; False for a query with no other gallery item.

    Raises:
        SearchError: as :func:`retrieval_metrics` (bad metric, shapes, labels, ids, batch_size, non-finite vectors).
    """
    index, queries, q_labels, g_labels, own_ids = _inputs(query_emb, query_labels, gallery_emb, gallery_labels,
                                                          metric, query_ids, gallery_ids)
    n_query = len(queries)
    batch_size = _batch_size(batch_size)
    correct = np.empty(n_query, dtype=bool)
    for start in range(0, n_query, batch_size):
        rows = slice(start, start + batch_size)
        scores = index.score_all(queries[rows], first_row=start, row_ids=None if own_ids is None else own_ids[rows])
        own = None
        if own_ids is not None:
            own = index.ids[None, :] == own_ids[rows, None]
            scores[own] = -np.inf
        best = scores.argmax(axis=1)  # the first of equal maxima: the lowest gallery position, as the stable sort
        right = g_labels[best] == q_labels[rows]
        if own is not None:
            right &= ~own[np.arange(len(best)), best]  # only the own item was left: a miss
        correct[rows] = right
    return correct


def _inputs(query_emb: object, query_labels: object, gallery_emb: object, gallery_labels: object, metric: Metric,
            query_ids: object, gallery_ids: object
            ) -> tuple[GalleryIndex, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The checked inputs of a retrieval: gallery index, query matrix, query and gallery labels, own ids (or None)."""
    index = GalleryIndex(gallery_emb, metric, ids=gallery_ids)
    queries = _query_matrix(query_emb)
    n_query = len(queries)
    if n_query == 0:
        raise SearchError(f"query_emb must have at least one row (n_query >= 1), got shape {queries.shape}")
    q_labels = _labels(query_labels, n_query, "query_labels")
    g_labels = _labels(gallery_labels, len(index), "gallery_labels")
    if (q_labels < 0).any():
        raise SearchError(f"query_labels must be >= 0, got {int(q_labels.min())} (unknown labels cannot be scored)")
    return index, queries, q_labels, g_labels, _own_ids(query_ids, gallery_ids, n_query)


def _batch_size(batch_size: object) -> int:
    if not isinstance(batch_size, Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise SearchError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)


def _rank_metrics(scores: np.ndarray, relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank of the first relevant item (inf if none) and AP, per query row.

    Args:
        scores: (B, n_gallery) float32, larger is better.
        relevant: (B, n_gallery) bool.

    Returns:
        first_hit (B,) float64 1-based ranks or inf; ap (B,) float64 in [0, 1] (0 without relevant items).
    """
    order = np.argsort(-scores, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)
    hits_so_far = np.cumsum(hits, axis=1)
    n_relevant = hits_so_far[:, -1]
    ranks = np.arange(1, scores.shape[1] + 1)
    ap = np.where(hits, hits_so_far / ranks, 0.0).sum(axis=1) / np.maximum(n_relevant, 1)
    first_hit = np.where(n_relevant > 0, hits.argmax(axis=1) + 1.0, np.inf)
    return first_hit, ap


def _query_matrix(query_emb: object) -> np.ndarray:
    """View ``query_emb`` as an ndarray without copying arrays (memmaps stay on disk); batches are cast later."""
    try:
        queries = np.asarray(query_emb)
    except ValueError as exc:
        raise SearchError(f"query_emb must be a numeric (n_query, d) array, got a ragged sequence ({exc})") from None
    if queries.ndim != 2:
        raise SearchError(f"query_emb must be 2-D (n_query, d), got shape {queries.shape}")
    return queries


def _labels(labels: object, n: int, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.shape != (n,) or arr.dtype.kind not in "iu":
        raise SearchError(f"{name} must be an integer array of shape ({n},), got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def _own_ids(query_ids: object, gallery_ids: object, n_query: int) -> np.ndarray | None:
    if (query_ids is None) != (gallery_ids is None):
        raise SearchError("pass both query_ids and gallery_ids (self-match exclusion) or neither, got one")
    return None if query_ids is None else unique_ids(query_ids, n_query, "query_ids")


def _top_k(top_k: Sequence[int]) -> list[int]:
    ks = list(top_k)
    if not ks or any(not isinstance(k, Integral) or isinstance(k, bool) or k < 1 for k in ks):
        raise SearchError(f"top_k must be a non-empty sequence of integers >= 1, got {top_k!r}")
    return [int(k) for k in ks]


def knn_overlap(new: np.ndarray, transformed: np.ndarray, metric: str, k: int = 10) -> float:
    """Label-free compatibility: mean over items of |new-vs-new top-k ∩ new-vs-h(old) top-k| / k.

    For each item i, A_i is the set of its k nearest neighbours among the other items' new embeddings and B_i the set
    of its k nearest among the other items' transformed vectors, both searched with the new embedding of i;
    the score is mean_i |A_i ∩ B_i| / k. 1 means h(old) reproduces the new model's neighbourhoods; a random h scores
    about k / (N - 1).

    Args:
        new: (N, d_new) new-model embeddings of N >= 2 items.
        transformed: (N, d_new) h(old[, side-info]) of the same items.
        metric: ``l2`` or ``cosine``.
        k: Neighbours per item; capped at N - 1 (each item's own row is excluded).

    Returns:
        A fraction in [0, 1].

    Raises:
        SearchError: shapes differ, fewer than 2 items, non-finite vectors.
    """
    ids = np.arange(len(new), dtype=np.int64)
    k = min(k, len(new) - 1)
    reference = GalleryIndex(new, metric, ids=ids).search(new, k, exclude_self=True, query_ids=ids).ids
    candidate = GalleryIndex(transformed, metric, ids=ids).search(new, k, exclude_self=True, query_ids=ids).ids
    shared = [len(np.intersect1d(a, b)) for a, b in zip(reference, candidate, strict=True)]
    return float(np.mean(shared) / k)
