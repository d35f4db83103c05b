"""A plain-loop oracle of the retrieval protocol (CMC top-k, mAP, per-query top-1, negative flips), shared by the
metric tests.

The protocol of :mod:`fct_registry.vectors.metrics` written out: the query's own item (same id) is dropped, the
gallery is ranked by descending score with equal scores in gallery order (lower position first), an item is
relevant iff its label equals the query's, CMC top-k counts queries whose first relevant item has rank <= k, AP is
the mean over relevant items of (relevant items at or above it) / (its rank), and a query without relevant items is
a miss with AP 0 that stays in the denominators.
"""

from __future__ import annotations

import math
from fractions import Fraction


def exact_score(query: list, item: list, metric: str) -> Fraction:
    """Larger is better: minus the squared Euclidean distance (same order as minus the distance), or the cosine of
    two integer vectors whose squared norms are perfect squares (exact as a fraction)."""
    if metric == "l2":
        return -Fraction(sum((a - b) ** 2 for a, b in zip(query, item, strict=True)))
    norms = math.isqrt(sum(a * a for a in query)) * math.isqrt(sum(b * b for b in item))
    return Fraction(sum(a * b for a, b in zip(query, item, strict=True)), norms)


def float_score(query: list, item: list, metric: str) -> float:
    """Larger is better, in float64: minus the Euclidean distance, or the cosine similarity."""
    if metric == "l2":
        return -math.dist(query, item)
    dot = sum(a * b for a, b in zip(query, item, strict=True))
    return dot / (math.hypot(*query) * math.hypot(*item))


def oracle_ranking(query, query_id, gallery, gallery_ids, metric, score) -> list[int]:
    """Gallery positions, best first: the query's own item (same id) dropped, equal scores in gallery order."""
    ranked = []
    for j, item in enumerate(gallery):
        if query_id is not None and gallery_ids[j] == query_id:
            continue  # the query's own item
        ranked.append((score(query, item, metric), j))
    ranked.sort(key=lambda pair: (-pair[0], pair[1]))  # best first; equal scores: lower gallery position first
    return [j for _, j in ranked]


def oracle_metrics(queries, query_labels, gallery, gallery_labels, metric, query_ids, gallery_ids, top_k, score):
    """The documented protocol as a plain loop over queries and gallery items."""
    hits = dict.fromkeys(top_k, 0)
    ap_sum = 0.0
    for i, query in enumerate(queries):
        ranked = oracle_ranking(query, None if query_ids is None else query_ids[i], gallery, gallery_ids, metric, score)
        found, precisions, first = 0, [], None
        for rank, j in enumerate(ranked, start=1):
            if gallery_labels[j] == query_labels[i]:
                found += 1
                precisions.append(found / rank)
                if first is None:
                    first = rank
        for k in top_k:
            if first is not None and first <= k:
                hits[k] += 1
        ap_sum += sum(precisions) / len(precisions) if precisions else 0.0
    result = {f"cmc_top{k}": hits[k] / len(queries) for k in top_k}
    result["map"] = ap_sum / len(queries)
    return result


def oracle_top1(queries, query_labels, gallery, gallery_labels, metric, query_ids, gallery_ids, score) -> list[bool]:
    """Per query: whether its first-ranked gallery item has its label (False when no other item is left)."""
    correct = []
    for i, query in enumerate(queries):
        ranked = oracle_ranking(query, None if query_ids is None else query_ids[i], gallery, gallery_ids, metric, score)
        correct.append(bool(ranked) and gallery_labels[ranked[0]] == query_labels[i])
    return correct


def oracle_flips(before: list[bool], after: list[bool]) -> dict[str, float]:
    """Negative flips (right before, wrong after) and positive flips, as rates over the queries (Yan et al. 2021)."""
    negative = sum(1 for b, a in zip(before, after, strict=True) if b and not a)
    positive = sum(1 for b, a in zip(before, after, strict=True) if a and not b)
    return {"negative_flips": negative / len(before), "positive_flips": positive / len(before)}
