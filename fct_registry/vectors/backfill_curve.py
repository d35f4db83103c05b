"""Backfill curves: retrieval quality of a gallery as its items are re-embedded by the new backbone, in some order.

FastFill (Jaeckle, Faghri, Farhadi, Tuzel, Pouransari, ICLR 2023, arXiv 2303.04766, Sec. 5): after the cheap
upgrade (every gallery item holds h(old, side-info)), items are backfilled -- their vector replaced by the new
backbone's embedding of their image -- gradually. At fraction i / (P - 1) of the gallery (i = 0..P-1, P = 22 in
the paper) the first items in the backfill order hold new vectors and the rest transformed ones; queries are the new
backbone's embeddings; CMC top-k, mAP and (given each query's top-1 correctness before the update) the negative
flip rate are measured at each point, and a curve's AUC is the mean of each metric over its points.

Orders: ``random``; ``uncertainty`` (h's predicted sigma descending, FastFill's); ``distance`` (the true
||phi_new - h|| descending, which needs every new vector: an oracle, an upper bound for reference only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from fct_registry.core.errors import SearchError
from fct_registry.vectors.flips import negative_flips
from fct_registry.vectors.metrics import retrieval_metrics, top1_correct
from fct_registry.vectors.search import Metric

Order = Literal["random", "uncertainty", "distance"]
ORDERS: tuple[Order, ...] = ("random", "uncertainty", "distance")
POINTS = 22
"""The paper's curve: fractions 0, 1/21, ..., 21/21."""


def backfill_order(order: Order, n: int, *, sigma: np.ndarray | None = None, distance: np.ndarray | None = None,
                   seed: int = 0) -> np.ndarray:
    """Gallery positions (n,) int64 in the order they are backfilled (ties keep position order).

    Args:
        order: ``random`` (a permutation drawn from ``seed``), ``uncertainty`` (``sigma`` descending) or
            ``distance`` (``distance`` descending).
        n: gallery items.
        sigma: (n,) float32 predicted log-variances, for ``uncertainty``.
        distance: (n,) float ||phi_new - h|| per item, for ``distance``.
        seed: for ``random``.

    Raises:
        SearchError: unknown order, or its input missing or not (n,) finite.
    """
    if order == "random":
        return np.random.default_rng(seed).permutation(n).astype(np.int64)
    if order not in ORDERS:
        raise SearchError(f"backfill order must be one of {list(ORDERS)}, got {order!r}")
    key = sigma if order == "uncertainty" else distance
    name = "sigma" if order == "uncertainty" else "distance"
    if key is None or np.shape(key) != (n,) or not np.isfinite(key).all():
        raise SearchError(f"order {order!r} needs {name} as ({n},) finite values, got "
                          f"{None if key is None else np.shape(key)}")
    return np.argsort(-np.asarray(key, dtype=np.float64), kind="stable").astype(np.int64)


def mixed_gallery(transformed: np.ndarray, new: np.ndarray, order: np.ndarray, count: int) -> np.ndarray:
    """The gallery (n, d) float32 after backfilling the first ``count`` items of ``order``: their rows from ``new``
    (n, d), every other row from ``transformed`` (n, d)."""
    gallery = transformed.copy()
    gallery[order[:count]] = new[order[:count]]
    return gallery


def backfill_curve(queries: np.ndarray, query_labels: np.ndarray, query_ids: np.ndarray, transformed: np.ndarray,
                   new: np.ndarray, labels: np.ndarray, ids: np.ndarray, order: np.ndarray, metric: Metric,
                   top_k: Sequence[int] = (1, 5), before: np.ndarray | None = None, points: int = POINTS
                   ) -> list[dict[str, float]]:
    """Retrieval metrics of the gallery at each backfill fraction i / (points - 1), i = 0..points-1.

    Args:
        queries: (n_query, d) float32, the new backbone's embeddings of the query items.
        query_labels: (n_query,) int64 labels; query_ids: (n_query,) int64 item ids (own item excluded).
        transformed: (n_gallery, d) float32 h(old, side-info) of the gallery items.
        new: (n_gallery, d) float32 the new backbone's embeddings of the same items.
        labels: (n_gallery,) int64; ids: (n_gallery,) int64.
        order: (n_gallery,) positions in backfill order (:func:`backfill_order`).
        metric: ``l2`` or ``cosine``.
        top_k: CMC ranks.
        before: (n_query,) bool top-1 correctness of the same queries before the update (old/old); with it each
            point also has ``negative_flips`` (Yan et al., CVPR 2021).
        points: curve points, >= 2.

    Returns:
        One dict per point: ``fraction`` (of items backfilled, exact: count / n_gallery), ``backfilled`` (count),
        ``cmc_top<k>``, ``map`` and optionally ``negative_flips``, fractions in [0, 1].

    Raises:
        SearchError: ``points`` < 2, ``order`` not a permutation of the gallery, or any input error of
            :func:`~fct_registry.vectors.metrics.retrieval_metrics`.
    """
    n = len(transformed)
    if points < 2:
        raise SearchError(f"a backfill curve needs points >= 2, got {points}")
    if new.shape != transformed.shape or not np.array_equal(np.sort(order), np.arange(n)):
        raise SearchError(f"order must be a permutation of the {n} gallery items and new {new.shape} must match "
                          f"transformed {transformed.shape}")
    curve = []
    for i in range(points):
        count = round(n * i / (points - 1))
        gallery = mixed_gallery(transformed, new, order, count)
        point = {"fraction": count / n, "backfilled": float(count)}
        point |= retrieval_metrics(queries, query_labels, gallery, labels, metric, query_ids, ids, top_k=top_k)
        if before is not None:
            after = top1_correct(queries, query_labels, gallery, labels, metric, query_ids, ids)
            point["negative_flips"] = negative_flips(before, after).negative_rate
        curve.append(point)
    return curve


def curve_auc(curve: Sequence[dict[str, float]]) -> dict[str, float]:
    """FastFill's AUC of a curve: each metric's mean over the points (``fraction``/``backfilled`` excluded).

    Raises:
        SearchError: an empty curve.
    """
    if not curve:
        raise SearchError("curve_auc needs at least one point")
    keys = [k for k in curve[0] if k not in ("fraction", "backfilled")]
    return {key: float(np.mean([point[key] for point in curve])) for key in keys}
