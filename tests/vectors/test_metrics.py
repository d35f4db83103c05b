"""CMC / mAP, per-query top-1 and negative flips against hand-computed values and a plain Python loop; table, gap
and headline."""

from __future__ import annotations

import numpy as np
import pytest
from metric_oracle import float_score, oracle_flips, oracle_metrics, oracle_top1

from fct_registry.core.errors import SearchError
from fct_registry.vectors.compatibility import compatibility_table, gap_closed, headline, summary
from fct_registry.vectors.flips import Flips, negative_flips
from fct_registry.vectors.metrics import knn_overlap, retrieval_metrics, top1_correct


def reference_metrics(queries, query_labels, gallery, gallery_labels, metric, query_ids, gallery_ids, top_k):
    """The protocol as a plain loop over queries, with float64 Python arithmetic."""
    return oracle_metrics(queries, query_labels, gallery, gallery_labels, metric, query_ids, gallery_ids, top_k,
                          float_score)


def test_top1_and_top5_differ_on_built_case():
    # gallery on a line at x = 1..6, labels 1 1 1 1 0 1
    gallery = [[float(x), 0.0] for x in range(1, 7)]
    gallery_labels = [1, 1, 1, 1, 0, 1]
    # query at 0 (label 0): only relevant item at rank 5 -> top1 miss, top5 hit, AP = 1/5
    # query at 7 (label 1): ranks 1..6 = x 6,5,4,3,2,1, relevant at 1,3,4,5,6 -> AP = (1 + 2/3 + 3/4 + 4/5 + 5/6) / 5
    got = retrieval_metrics([[0.0, 0.0], [7.0, 0.0]], [0, 1], gallery, gallery_labels, "l2")
    ap_second = (1 + 2 / 3 + 3 / 4 + 4 / 5 + 5 / 6) / 5
    assert ap_second == pytest.approx(0.81)
    assert got == pytest.approx({"cmc_top1": 0.5, "cmc_top5": 1.0, "map": (0.2 + ap_second) / 2})


def test_self_match_is_excluded_by_id():
    items = [[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]]
    labels = [0, 0, 1]
    ids = [10, 11, 12]
    # without its own item, the label-1 query has no relevant item: a miss with AP 0
    got = retrieval_metrics(items, labels, items, labels, "l2", query_ids=ids, gallery_ids=ids)
    assert got == pytest.approx({"cmc_top1": 2 / 3, "cmc_top5": 2 / 3, "map": 2 / 3})
    # without ids every query finds itself first
    assert retrieval_metrics(items, labels, items, labels, "l2") == {"cmc_top1": 1.0, "cmc_top5": 1.0, "map": 1.0}


def test_query_class_absent_from_gallery_counts_as_miss_with_zero_ap():
    gallery = [[1.0, 0.0], [0.0, 1.0]]
    got = retrieval_metrics([[1.0, 0.0], [1.0, 0.0]], [0, 9], gallery, [0, 1], "cosine")
    assert got == {"cmc_top1": 0.5, "cmc_top5": 0.5, "map": 0.5}


def test_unknown_gallery_labels_are_never_relevant():
    got = retrieval_metrics([[1.0, 0.0]], [1], [[1.0, 0.0], [0.0, 1.0]], [-1, 1], "l2")
    assert got == {"cmc_top1": 0.0, "cmc_top5": 1.0, "map": 0.5}
    with pytest.raises(SearchError, match="query_labels must be >= 0, got -1"):
        retrieval_metrics([[1.0, 0.0]], [-1], [[1.0, 0.0]], [1], "l2")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ties_are_broken_by_gallery_position(metric):
    # two identical gallery vectors, equal scores: the lower gallery position is ranked first
    wrong_first = retrieval_metrics([[1.0, 0.0]], [1], [[1.0, 0.0], [1.0, 0.0]], [0, 1], metric, top_k=(1, 2))
    assert wrong_first == {"cmc_top1": 0.0, "cmc_top2": 1.0, "map": 0.5}
    right_first = retrieval_metrics([[1.0, 0.0]], [1], [[1.0, 0.0], [1.0, 0.0]], [1, 0], metric, top_k=(1, 2))
    assert right_first == {"cmc_top1": 1.0, "cmc_top2": 1.0, "map": 1.0}


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_matches_plain_loop_on_test_split_against_itself(metric):
    rng = np.random.default_rng(3)
    items = rng.standard_normal((41, 6)).astype(np.float32)
    labels = rng.integers(0, 7, size=41)
    labels[0] = 99  # a class with a single item: after self-exclusion it is absent
    ids = rng.permutation(41) + 1000
    top_k = (1, 3, 5)
    got = retrieval_metrics(items, labels, items, labels, metric, query_ids=ids, gallery_ids=ids,
                            top_k=top_k, batch_size=8)
    want = reference_metrics(items.tolist(), labels.tolist(), items.tolist(), labels.tolist(), metric,
                             ids.tolist(), ids.tolist(), top_k)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert 0.0 < got["map"] < 1.0 and got["cmc_top1"] < got["cmc_top5"]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_matches_plain_loop_on_separate_query_and_gallery(metric):
    rng = np.random.default_rng(4)
    queries = rng.standard_normal((23, 5))
    gallery = rng.standard_normal((60, 5))
    query_labels = rng.integers(0, 6, size=23)  # label 5 never occurs in the gallery
    gallery_labels = rng.integers(0, 5, size=60)
    got = retrieval_metrics(queries, query_labels, gallery, gallery_labels, metric, batch_size=5)
    want = reference_metrics(queries.astype(np.float32).tolist(), query_labels.tolist(),
                             gallery.astype(np.float32).tolist(), gallery_labels.tolist(), metric, None, None, (1, 5))
    assert (query_labels == 5).any()
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_identical_for_every_batch_size(metric):
    rng = np.random.default_rng(5)
    items = rng.standard_normal((21, 4)).astype(np.float32)  # 21 = 4*5 + 1 = 5*4 + 1: last batch has one row
    labels = rng.integers(0, 3, size=21)
    ids = np.arange(21)
    results = [retrieval_metrics(items, labels, items, labels, metric, query_ids=ids, gallery_ids=ids,
                                 batch_size=b) for b in (1, 4, 5, 21, 1024)]
    assert all(r == results[0] for r in results[1:])


def test_bad_arguments():
    x = [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(SearchError, match="both query_ids and gallery_ids"):
        retrieval_metrics(x, [0, 1], x, [0, 1], "l2", query_ids=[0, 1])
    with pytest.raises(SearchError, match=r"query_labels must be an integer array of shape \(2,\)"):
        retrieval_metrics(x, [0], x, [0, 1], "l2")
    with pytest.raises(SearchError, match="gallery_labels"):
        retrieval_metrics(x, [0, 1], x, [0.0, 1.0], "l2")
    with pytest.raises(SearchError, match="top_k"):
        retrieval_metrics(x, [0, 1], x, [0, 1], "l2", top_k=(0,))
    with pytest.raises(SearchError, match="batch_size"):
        retrieval_metrics(x, [0, 1], x, [0, 1], "l2", batch_size=0)
    with pytest.raises(SearchError, match=r"got shape \(2,\)"):
        retrieval_metrics([1.0, 0.0], [0], x, [0, 1], "l2")
    with pytest.raises(SearchError, match="metric"):
        retrieval_metrics(x, [0, 1], x, [0, 1], "euclidean")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        retrieval_metrics(x, [0, 1], x, [0, 1])  # type: ignore[call-arg]


# Six items on a line, classes 0 0 1 1 2 2, the test split against itself (own item excluded by id).
# old: 0 1 10 11 20 40 -> top-1 neighbours 1 0 3 2 3 4: all right but item 4 (its nearest, 11, is class 1)
# new: 0 5 3 11 20 21 -> top-1 neighbours 2 2 1 1 5 4: only items 4 and 5 right
FLIP_LABELS, FLIP_IDS = [0, 0, 1, 1, 2, 2], [30, 31, 32, 33, 34, 35]
OLD_LINE, NEW_LINE = [[0.0], [1.0], [10.0], [11.0], [20.0], [40.0]], [[0.0], [5.0], [3.0], [11.0], [20.0], [21.0]]


def test_negative_flips_on_a_hand_built_update():
    metric = "l2"
    hits = [top1_correct(x, FLIP_LABELS, x, FLIP_LABELS, metric, FLIP_IDS, FLIP_IDS, batch_size=4)
            for x in (OLD_LINE, NEW_LINE)]
    assert [h.tolist() for h in hits] == [[True, True, True, True, False, True],
                                          [False, False, False, False, True, True]]
    assert [h.tolist() for h in hits] == [oracle_top1(x, FLIP_LABELS, x, FLIP_LABELS, metric, FLIP_IDS, FLIP_IDS,
                                                      float_score) for x in (OLD_LINE, NEW_LINE)]
    flips = negative_flips(*hits)
    assert flips == Flips(negative=4, positive=1, n_query=6)  # items 0-3 broke, item 4 was fixed
    assert flips.metrics() == pytest.approx({"negative_flips": 4 / 6, "positive_flips": 1 / 6})
    assert flips.metrics() == pytest.approx(oracle_flips(*(h.tolist() for h in hits)))
    assert negative_flips(hits[1], hits[0]) == Flips(negative=1, positive=4, n_query=6)  # the update undone


def test_top1_of_a_query_whose_only_gallery_item_is_its_own_is_a_miss():
    assert top1_correct([[1.0, 0.0]], [3], [[1.0, 0.0]], [3], "cosine", [7], [7]).tolist() == [False]
    assert top1_correct([[1.0, 0.0]], [3], [[1.0, 0.0]], [3], "cosine").tolist() == [True]  # no ids: itself
    with pytest.raises(SearchError, match="batch_size"):
        top1_correct([[1.0]], [0], [[1.0]], [0], "l2", batch_size=0)
    with pytest.raises(SearchError, match="query_labels must be >= 0"):
        top1_correct([[1.0]], [-1], [[1.0]], [0], "l2")


def test_negative_flips_refuses_what_is_not_two_aligned_bool_vectors():
    with pytest.raises(SearchError, match=r"before must be a non-empty 1-D bool array .* got int64 \(2,\)"):
        negative_flips(np.array([1, 0]), np.array([True, False]))
    with pytest.raises(SearchError, match=r"after must be a non-empty 1-D bool array .* got bool \(0,\)"):
        negative_flips(np.array([True]), np.array([], dtype=bool))
    with pytest.raises(SearchError, match="same queries, got 2 and 3 queries"):
        negative_flips(np.ones(2, dtype=bool), np.ones(3, dtype=bool))


CASES = {"old_vs_old": {"cmc_top1": 0.464, "map": 0.283},
         "new_vs_new": {"cmc_top1": 0.684, "map": 0.456},
         "new_vs_upgraded": {"cmc_top1": 0.651}}


def test_compatibility_table_markdown():
    assert compatibility_table(CASES) == (
        "| case | cmc_top1 | map |\n"
        "|---|---:|---:|\n"
        "| old_vs_old | 0.4640 | 0.2830 |\n"
        "| new_vs_new | 0.6840 | 0.4560 |\n"
        "| new_vs_upgraded | 0.6510 | - |\n")
    with pytest.raises(SearchError, match="cases is empty"):
        compatibility_table({})


def test_gap_closed_on_paper_numbers():
    # FCT (arXiv 2112.02805) ImageNet with side-info: 85 % of the top-1 gap, 91 % of the mAP gap
    assert gap_closed(46.4, 68.4, 65.1) == pytest.approx(18.7 / 22.0)
    assert round(gap_closed(0.464, 0.684, 0.651), 2) == 0.85
    assert round(gap_closed(28.3, 45.6, 44.0), 2) == 0.91
    assert gap_closed(0.2, 0.6, 0.2) == 0.0 and gap_closed(0.2, 0.6, 0.6) == 1.0
    with pytest.raises(SearchError, match="no gap"):
        gap_closed(0.5, 0.5, 0.6)


def test_headline_is_fct_and_the_share_of_the_gap_it_closes():
    cases = CASES | {"new_vs_upgraded": {"cmc_top1": 0.651, "map": 0.440, "cmc_top1_std": 0.01}}
    assert headline(cases) == pytest.approx({"top1": 0.651, "map": 0.440, "top1_gap_closed": 18.7 / 22.0,
                                             "map_gap_closed": 15.7 / 17.3})
    with pytest.raises(KeyError):
        headline(CASES)  # new_vs_upgraded has no mAP


def test_headline_and_summary_carry_fct_and_bct_negative_flips():
    cases = {"old_vs_old": {"cmc_top1": 0.68, "map": 0.5},
             "new_vs_new": {"cmc_top1": 0.89, "map": 0.8, "negative_flips": 0.036},
             "bct_vs_old": {"cmc_top1": 0.53, "map": 0.4, "negative_flips": 0.282},
             "new_vs_upgraded_noside": {"cmc_top1": 0.83, "map": 0.7, "negative_flips": 0.069},
             "new_vs_upgraded": {"cmc_top1": 0.86, "map": 0.75, "negative_flips": 0.052, "negative_flips_std": 0.002}}
    top = headline(cases)
    assert (top["negative_flips"], top["bct_negative_flips"]) == (0.052, 0.282)
    assert {k: v for k, v in summary(cases).items() if "flips" in k} == {
        "fct_negative_flips": 0.052, "noside_negative_flips": 0.069, "bct_negative_flips": 0.282}
    assert compatibility_table(cases).splitlines()[:3] == [
        "| case | cmc_top1 | map | negative_flips | negative_flips_std |", "|---|---:|---:|---:|---:|",
        "| old_vs_old | 0.6800 | 0.5000 | - | - |"]


def knn_overlap_by_loop(new: np.ndarray, transformed: np.ndarray, k: int) -> float:
    """Oracle: squared L2 distances by a plain loop, ties broken by position, own item skipped."""
    def nearest(i: int, gallery: np.ndarray) -> set[int]:
        distances = [(float(((new[i] - gallery[j]) ** 2).sum()), j) for j in range(len(gallery)) if j != i]
        return {j for _, j in sorted(distances)[:k]}

    shares = [len(nearest(i, new) & nearest(i, transformed)) / k for i in range(len(new))]
    return sum(shares) / len(shares)


def test_knn_overlap_equals_a_plain_loop_and_spans_zero_to_one():
    rng = np.random.default_rng(0)
    new = rng.normal(size=(40, 6)).astype(np.float32)
    noisy = new + rng.normal(scale=0.5, size=new.shape).astype(np.float32)
    assert knn_overlap(new, noisy, "l2", k=5) == pytest.approx(knn_overlap_by_loop(new, noisy, 5), abs=1e-9)
    assert 0.2 < knn_overlap(new, noisy, "l2", k=5) < 1.0
    assert knn_overlap(new, new + 1e-6, "l2", k=5) == 1.0
    assert knn_overlap(new, rng.normal(size=new.shape).astype(np.float32), "l2", k=5) < 0.4
    assert knn_overlap(new[:3], new[:3], "l2", k=10) == 1.0  # k capped at N - 1



# ----- regressions of issue 10 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ids", [False, True])
def test_bad_query_is_named_by_its_global_row_not_its_row_in_the_batch(ids):
    rng = np.random.default_rng(6)
    queries = rng.standard_normal((1200, 3)).astype(np.float32)
    queries[1100, 1] = np.nan  # row 76 of the second batch of 1024
    gallery = rng.standard_normal((5, 3))
    kwargs = {"query_ids": np.arange(1200) + 5000, "gallery_ids": np.arange(5)} if ids else {}
    message = r"^queries row 1100 \(item_id 6100\) contains NaN" if ids else r"^queries row 1100 contains NaN"
    with pytest.raises(SearchError, match=message):
        retrieval_metrics(queries, np.zeros(1200, dtype=np.int64), gallery, np.zeros(5, dtype=np.int64), "l2",
                          **kwargs)
    queries[1100] = 0.0
    with pytest.raises(SearchError, match=r"^queries row 1100 .*is a zero vector"):
        retrieval_metrics(queries, np.zeros(1200, dtype=np.int64), gallery, np.zeros(5, dtype=np.int64), "cosine",
                          batch_size=1000, **kwargs)


def test_bad_gallery_row_names_its_item_id():
    gallery = np.eye(3)
    gallery[2, 2] = np.inf
    with pytest.raises(SearchError, match=r"gallery embeddings row 2 \(item_id 32\) contains NaN or inf"):
        retrieval_metrics(np.eye(3), [0, 1, 2], gallery, [0, 1, 2], "l2", query_ids=[30, 31, 32],
                          gallery_ids=[30, 31, 32])


@pytest.mark.parametrize("queries", [np.zeros((0, 3)), np.zeros((0, 3), dtype=np.float32)])
def test_zero_queries_is_a_one_line_search_error(queries):
    with pytest.raises(SearchError, match=r"query_emb must have at least one row") as info:
        retrieval_metrics(queries, np.zeros(0, dtype=np.int64), np.eye(3), [0, 1, 2], "l2")
    assert "\n" not in str(info.value)


def test_duplicate_query_ids_are_refused():
    items = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    labels = [0, 0, 1]
    # query 1 claims item 10's id, so its own item 11 would no longer be excluded: cmc_top1 1/3 -> 2/3
    with pytest.raises(SearchError, match="query_ids must be unique, id 10 repeats"):
        retrieval_metrics(items, labels, items, labels, "l2", query_ids=[10, 10, 12], gallery_ids=[10, 11, 12])


def test_numpy_integer_top_k_and_batch_size_are_accepted():
    rng = np.random.default_rng(7)
    items = rng.standard_normal((12, 3))
    labels = rng.integers(0, 3, size=12)
    plain = retrieval_metrics(items, labels, items, labels, "l2", top_k=(1, 3), batch_size=5)
    numpy_ints = retrieval_metrics(items, labels, items, labels, "l2", top_k=np.array([1, 3]),
                                   batch_size=np.int64(5))
    assert numpy_ints == plain and list(numpy_ints) == ["cmc_top1", "cmc_top3", "map"]
    for bad in ((1.0,), (True,), (np.bool_(True),)):
        with pytest.raises(SearchError, match="top_k"):
            retrieval_metrics(items, labels, items, labels, "l2", top_k=bad)
    with pytest.raises(SearchError, match="batch_size"):
        retrieval_metrics(items, labels, items, labels, "l2", batch_size=np.float64(5.0))
    assert knn_overlap(items, items, "l2", k=np.int64(3)) == 1.0
