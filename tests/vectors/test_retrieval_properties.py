"""Property-based tests: CMC top-k, mAP, per-query top-1 (negative flips) and top-k search equal a plain-Python-loop
oracle of the documented protocol.

The oracle is :func:`metric_oracle.oracle_metrics`, the protocol written out as a plain loop.

Ties are the point, so the first family of inputs is built to make the implementation's float32 arithmetic exact:
for ``l2`` small integer vectors (squared distances are small integers), for ``cosine`` signed one-hot and
four-hot vectors scaled by 1, 2 or 4 (unit vectors with components 0, +-1/2, +-1, all inner products multiples of
1/4). The oracle ranks those exactly (integers and fractions), so equal scores are really equal on both sides.
The second family is random float vectors with exact duplicates, ranked by the oracle in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from metric_oracle import exact_score, float_score, oracle_flips, oracle_metrics, oracle_top1

from fct_registry.vectors.flips import negative_flips
from fct_registry.vectors.metrics import retrieval_metrics, top1_correct
from fct_registry.vectors.search import GalleryIndex

SETTINGS = settings(max_examples=80, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@st.composite
def exact_vectors(draw, metric: str, d: int) -> list[int]:
    if metric == "l2":
        return draw(st.lists(st.integers(-3, 3), min_size=d, max_size=d))
    hot = draw(st.sampled_from([1, 4]))
    support = draw(st.permutations(range(d)))[:hot]
    signs = draw(st.lists(st.sampled_from([-1, 1]), min_size=hot, max_size=hot))
    scale = draw(st.sampled_from([1, 2, 4]))
    vector = [0] * d
    for position, sign in zip(support, signs, strict=True):
        vector[position] = sign * scale
    return vector


@st.composite
def retrieval_cases(draw, exact: bool):
    """A small gallery and queries drawn from a small pool of vectors (so distances tie), labels with repeats,
    query classes absent from the gallery, and ids for self-exclusion (the test split against itself, or
    separate queries some of whose ids name gallery items)."""
    metric = draw(st.sampled_from(["l2", "cosine"]))
    d = draw(st.integers(4, 5)) if exact and metric == "cosine" else draw(st.integers(1, 4))
    pool_size = draw(st.integers(1, 5))
    if exact:
        pool = [draw(exact_vectors(metric, d)) for _ in range(pool_size)]
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        pool = rng.standard_normal((pool_size, d)).astype(np.float32).astype(np.float64).tolist()
    n_gallery = draw(st.integers(1, 10))
    gallery = [pool[draw(st.integers(0, pool_size - 1))] for _ in range(n_gallery)]
    gallery_ids = draw(st.lists(st.integers(-50, 50), min_size=n_gallery, max_size=n_gallery, unique=True))
    mode = draw(st.sampled_from(["self", "separate_with_ids", "separate"]))
    if mode == "self":  # the test split against itself: its own item is excluded
        queries, query_ids = gallery, gallery_ids
        gallery_labels = draw(st.lists(st.integers(0, 3), min_size=n_gallery, max_size=n_gallery))
        query_labels = gallery_labels
    else:
        n_query = draw(st.integers(1, 8))
        queries = [pool[draw(st.integers(0, pool_size - 1))] for _ in range(n_query)]
        gallery_labels = draw(st.lists(st.integers(-1, 3), min_size=n_gallery, max_size=n_gallery))
        query_labels = draw(st.lists(st.integers(0, 5), min_size=n_query, max_size=n_query))  # 4, 5: absent
        query_ids = None
        if mode == "separate_with_ids":
            query_ids = draw(st.lists(st.sampled_from(range(-60, 61)), min_size=n_query, max_size=n_query,
                                      unique=True))
    top_k = draw(st.lists(st.integers(1, n_gallery + 2), min_size=1, max_size=4, unique=True))
    batch_size = draw(st.integers(1, 6))
    return metric, queries, query_labels, gallery, gallery_labels, query_ids, \
        None if query_ids is None else gallery_ids, top_k, batch_size


def check_against_oracle(case, score) -> dict[str, float]:
    metric, queries, query_labels, gallery, gallery_labels, query_ids, gallery_ids, top_k, batch_size = case
    got = retrieval_metrics(np.array(queries), np.array(query_labels), np.array(gallery), np.array(gallery_labels),
                            metric, query_ids=query_ids, gallery_ids=gallery_ids, top_k=top_k,
                            batch_size=batch_size)
    want = oracle_metrics(queries, query_labels, gallery, gallery_labels, metric, query_ids, gallery_ids, top_k,
                          score)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=1e-12, abs_tol=1e-12), (key, got, want)
        assert 0.0 <= got[key] <= 1.0
    return got


@SETTINGS
@given(retrieval_cases(exact=True))
def test_metrics_equal_the_oracle_with_exact_ties(case):
    check_against_oracle(case, exact_score)


def well_separated(case) -> bool:
    """Every query's scores against distinct gallery vectors differ by > 1e-4 (float32 keeps their order)."""
    metric, queries, _, gallery, *_ = case
    distinct = [list(v) for v in {tuple(v) for v in gallery}]
    for query in queries:
        scores = sorted(float_score(query, item, metric) for item in distinct)
        if any(b - a <= 1e-4 for a, b in zip(scores, scores[1:], strict=False)):
            return False
    return True


@SETTINGS
@given(retrieval_cases(exact=False))
def test_metrics_equal_the_oracle_on_random_vectors_with_duplicates(case):
    assume(well_separated(case))  # ties only between duplicated vectors, which score exactly alike
    check_against_oracle(case, float_score)


@SETTINGS
@given(retrieval_cases(exact=True), st.integers(1, 6))
def test_metrics_do_not_depend_on_batch_size(case, other_batch_size):
    got = check_against_oracle(case, exact_score)
    assert check_against_oracle((*case[:-1], other_batch_size), exact_score) == got


@SETTINGS
@given(retrieval_cases(exact=True), st.data())
def test_search_top_k_equals_the_oracle_ranking(case, data):
    """GalleryIndex.search: descending scores, equal scores in gallery order, own item dropped with exclude_self;
    among items tied at the k-th place, which are returned is faiss' choice (documented), so only that is free."""
    metric, queries, _, gallery, _, query_ids, gallery_ids, _, _ = case
    exclude_self = query_ids is not None
    assume(len(gallery) - int(exclude_self) >= 1)
    k = data.draw(st.integers(1, len(gallery) - int(exclude_self)), label="k")
    ids = gallery_ids if exclude_self else list(range(len(gallery)))
    result = GalleryIndex(np.array(gallery), metric, ids=np.array(ids)).search(
        np.array(queries), k, exclude_self=exclude_self, query_ids=query_ids)
    position = {item_id: j for j, item_id in enumerate(ids)}
    for i, query in enumerate(queries):
        ranked = sorted(((exact_score(query, item, metric), j) for j, item in enumerate(gallery)
                         if not exclude_self or ids[j] != query_ids[i]), key=lambda pair: (-pair[0], pair[1]))
        got = [(exact_score(query, gallery[position[item_id]], metric), position[item_id])
               for item_id in result.ids[i].tolist()]
        assert [s for s, _ in got] == [s for s, _ in ranked[:k]]  # the k best scores, best first
        assert got == sorted(got, key=lambda pair: (-pair[0], pair[1]))  # equal scores: lower position first
        kth = ranked[k - 1][0]
        assert [pair for pair in got if pair[0] > kth] == [pair for pair in ranked if pair[0] > kth]
        want_scores = [-math.sqrt(-s) if metric == "l2" else float(s) for s, _ in ranked[:k]]
        np.testing.assert_allclose(result.scores[i], want_scores, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(retrieval_cases(exact=True), st.data())
def test_top1_and_negative_flips_equal_the_oracle(case, data):
    """Per-query top-1 (an argmax) equals the oracle's first-ranked item, ties included, and averages to CMC top-1;
    negative/positive flips between the gallery's labels and a relabelled gallery equal the oracle's counts."""
    metric, queries, query_labels, gallery, gallery_labels, query_ids, gallery_ids, _, batch_size = case
    relabelled = data.draw(st.lists(st.integers(-1, 3), min_size=len(gallery), max_size=len(gallery)), label="after")
    tops, oracles = [], []
    for labels in (gallery_labels, relabelled):
        got = top1_correct(np.array(queries), np.array(query_labels), np.array(gallery), np.array(labels), metric,
                           query_ids=query_ids, gallery_ids=gallery_ids, batch_size=batch_size)
        want = oracle_top1(queries, query_labels, gallery, labels, metric, query_ids, gallery_ids, exact_score)
        assert got.dtype == bool and got.tolist() == want
        cmc = retrieval_metrics(np.array(queries), np.array(query_labels), np.array(gallery), np.array(labels), metric,
                                query_ids=query_ids, gallery_ids=gallery_ids, top_k=(1,))["cmc_top1"]
        assert math.isclose(got.mean(), cmc, rel_tol=1e-12)
        tops.append(got)
        oracles.append(want)
    flips = negative_flips(*tops)
    assert flips.metrics() == pytest.approx(oracle_flips(*oracles), rel=1e-12)
    assert flips.n_query == len(queries)
    assert flips.positive_rate - flips.negative_rate == pytest.approx(tops[1].mean() - tops[0].mean(), abs=1e-12)
