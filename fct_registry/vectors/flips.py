"""Negative flips: the queries a model update breaks, the regression a user notices even when the mean improves.

Positive-Congruent Training (Yan, Xiong, Kundu, Yang, Deng, Wang, Xia, Soatto, CVPR 2021, arXiv 2011.09161, Sec. 3,
Eq. 1) defines the negative flip rate of an update as NFR = (1/N) * sum_i 1[old right on i, new wrong on i]. For
retrieval (as FCT's follow-ups measure it), "right" is the per-query CMC top-1 hit of
:func:`fct_registry.vectors.metrics.top1_correct`: the first-ranked gallery item, own item excluded, has the query's
label. "Before" is the stored gallery's own model searching it (``old_vs_old``); "after" is the same queries' items
searched after the update (new queries against the upgraded gallery, ``new_vs_upgraded``, or the new model against
a re-embedded gallery, ``new_vs_new``). The positive flip rate counts the other way (wrong before, right after), so
``after top-1 - before top-1 = positive rate - negative rate``.

:func:`set_flips` measures an upgraded embedding set against the set it came from with the sets alone (no image):
each set's own vectors are its queries (see its docstring for what that does and does not measure).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fct_registry.core.errors import SearchError
from fct_registry.vectors.embedding_set import EmbeddingSet


@dataclass(frozen=True)
class Flips:
    """Per-query top-1 changes of an update (Yan et al., CVPR 2021).

    Attributes:
        negative: Queries right before and wrong after.
        positive: Queries wrong before and right after.
        n_query: Queries compared (N, the denominator of both rates).
    """

    negative: int
    positive: int
    n_query: int

    @property
    def negative_rate(self) -> float:
        """Negative flip rate, a fraction in [0, 1]."""
        return self.negative / self.n_query

    @property
    def positive_rate(self) -> float:
        """Positive flip rate, a fraction in [0, 1]."""
        return self.positive / self.n_query

    def metrics(self) -> dict[str, float]:
        """``{"negative_flips": rate, "positive_flips": rate}`` (fractions), the keys of the compatibility table."""
        return {"negative_flips": self.negative_rate, "positive_flips": self.positive_rate}


def negative_flips(before: object, after: object) -> Flips:
    """Count the queries an update flips from right to wrong (and from wrong to right).

    Args:
        before: (n_query,) bool, each query's top-1 correctness before the update (e.g. old/old).
        after: (n_query,) bool, the same queries, in the same order, after it (e.g. new/upgraded).

    Returns:
        The counts; ``.negative_rate`` is the negative flip rate (Yan et al., CVPR 2021, Eq. 1).

    Raises:
        SearchError: not 1-D bool arrays of the same length >= 1.
    """
    old, new = np.asarray(before), np.asarray(after)
    for name, arr in (("before", old), ("after", new)):
        if arr.dtype != bool or arr.ndim != 1 or len(arr) == 0:
            raise SearchError(f"{name} must be a non-empty 1-D bool array (per-query top-1 correctness), got "
                              f"{arr.dtype} {arr.shape}")
    if old.shape != new.shape:
        raise SearchError(f"before and after must score the same queries, got {len(old)} and {len(new)} queries")
    return Flips(negative=int(np.count_nonzero(old & ~new)), positive=int(np.count_nonzero(~old & new)),
                 n_query=len(old))


def set_flips(source: EmbeddingSet, upgraded: EmbeddingSet, max_queries: int = 10_000, seed: int = 0,
              batch_rows: int = 65536) -> Flips | None:
    """Negative flips of an upgrade measured with the two sets alone: each set's own vectors searching it.

    Before: each labelled item's stored (source-model) vector searches the source set; after: its upgraded vector
    searches the upgraded set; own item excluded, the set's metric (:func:`~fct_registry.vectors.metrics.top1_correct`).
    An upgrade reads no image, so it has no new-model queries: this measures whether the upgraded vectors keep each
    item's nearest labelled neighbour right among themselves, not what a new-model query sees (that is
    ``new_vs_upgraded`` of the evaluate stage and ``fct-registry evaluate --baseline``). Items with an unknown label
    (< 0) are left out of both sides (neither queries nor gallery).

    Memory stays bounded whatever the set's size: at most ``max_queries`` labelled items (a seeded sample, in set
    order) are both the queries and the gallery, read in batches of ``batch_rows``.

    Args:
        source: The set that was upgraded, embeddings (count, d_old) float32.
        upgraded: The upgraded set, embeddings (count, d_new) float32, holding the same item ids.
        max_queries: Items sampled when more are labelled, an integer >= 2.
        seed: Seed of the sample.
        batch_rows: Rows per read batch.

    Returns:
        The flips, or None when fewer than 2 items are labelled (nothing to measure).

    Raises:
        SearchError: ``max_queries`` < 2, the sets hold different item ids, or non-finite vectors.
        EmbeddingSetError: a shard cannot be read.
    """
    from fct_registry.vectors.metrics import top1_correct  # faiss, loaded only to measure (listings stay light)

    if max_queries < 2:
        raise SearchError(f"max_queries must be >= 2, got {max_queries}")
    ids, labels = _labelled(source, batch_rows)
    if len(ids) < 2:
        return None
    if len(ids) > max_queries:
        keep = np.sort(np.random.default_rng(seed).choice(len(ids), size=max_queries, replace=False))
        ids, labels = ids[keep], labels[keep]
    correct = []
    for embedding_set in (source, upgraded):
        vectors = _rows(embedding_set, ids, batch_rows)
        correct.append(top1_correct(vectors, labels, vectors, labels, embedding_set.manifest.metric, ids, ids))
    return negative_flips(*correct)


def _labelled(embedding_set: EmbeddingSet, batch_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and labels (both (n,) int64, set order) of the items with a label >= 0."""
    ids, labels = [], []
    for batch in embedding_set.iter_batches(batch_rows):
        known = batch.labels >= 0
        ids.append(batch.ids[known])
        labels.append(batch.labels[known])
    return np.concatenate(ids).astype(np.int64), np.concatenate(labels).astype(np.int64)


def _rows(embedding_set: EmbeddingSet, ids: np.ndarray, batch_rows: int) -> np.ndarray:
    """The vectors (len(ids), d) float32 of ``ids`` (sorted by the caller's order, i.e. set order of the source)."""
    found_ids, found = [], []
    for batch in embedding_set.iter_batches(batch_rows):
        hit = np.isin(batch.ids, ids)
        found_ids.append(batch.ids[hit])
        found.append(batch.embeddings[hit])
    got_ids = np.concatenate(found_ids)
    if len(got_ids) != len(ids):
        raise SearchError(f"set {embedding_set.path} lacks {len(ids) - len(got_ids)} of the {len(ids)} item ids "
                          "sampled from the set it was upgraded from; expected the same items")
    order = np.argsort(got_ids, kind="stable")
    return np.concatenate(found)[order[np.searchsorted(got_ids, ids, sorter=order)]]
