"""GalleryIndex / search_set against hand-computed rankings and numpy brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fct_registry.core.errors import SearchError, VersionMismatchError
from fct_registry.core.refs import ModelRef
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.search import GalleryIndex, index_for_set, search_set
from fct_registry.vectors.set_writer import write_embedding_set

V1 = ModelRef(label="v1", sha256="1" * 64)
V2 = ModelRef(label="v2", sha256="2" * 64)


def brute_force(queries: np.ndarray, gallery: np.ndarray, metric: str) -> np.ndarray:
    """(n_query, n_gallery) float64 scores, larger is better, computed by numpy in float64."""
    q, g = queries.astype(np.float64), gallery.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        return q @ g.T
    return -np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))


def test_cosine_uses_euclidean_norm_not_l1():
    # L1-normalised, [1, 0] would score 2/3 against [2, 1] and beat [2, 1] itself (5/9): the reference bug.
    result = GalleryIndex([[2.0, 1.0], [1.0, 0.0]], "cosine").search([[2.0, 1.0]], k=2)
    assert result.ids.tolist() == [[0, 1]]
    np.testing.assert_allclose(result.scores, [[1.0, 2.0 / math.sqrt(5.0)]], rtol=1e-6)


def test_metric_changes_ranking_on_unnormalised_gallery():
    gallery = np.array([[10.0, 0.0], [0.9, 0.1]], dtype=np.float32)
    l2 = GalleryIndex(gallery, "l2").search([[1.0, 0.0]], k=2)
    cosine = GalleryIndex(gallery, "cosine").search([[1.0, 0.0]], k=2)
    assert l2.ids.tolist() == [[1, 0]]
    np.testing.assert_allclose(l2.scores, [[-math.sqrt(0.02), -9.0]], rtol=1e-5)  # minus Euclidean distance
    assert cosine.ids.tolist() == [[0, 1]]
    np.testing.assert_allclose(cosine.scores, [[1.0, 0.9 / math.sqrt(0.82)]], rtol=1e-6)
    assert l2.scores.dtype == np.float32 and l2.ids.dtype == np.int64


def test_metric_is_required():
    with pytest.raises(TypeError):
        GalleryIndex([[1.0, 0.0]])  # type: ignore[call-arg]
    with pytest.raises(SearchError, match="'dot'"):
        GalleryIndex([[1.0, 0.0]], "dot")  # type: ignore[arg-type]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n_query", [7, 37])  # faiss uses a per-pair kernel below 20 queries, BLAS from 20
def test_search_equals_numpy_brute_force(metric, n_query):
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((200, 16)).astype(np.float32)
    queries = rng.standard_normal((n_query, 16)).astype(np.float32)
    ids = rng.permutation(1000)[:200] + 5000
    result = GalleryIndex(gallery, metric, ids=ids).search(queries, k=10)
    expected = brute_force(queries, gallery, metric)
    order = np.argsort(-expected, axis=1, kind="stable")[:, :10]
    assert result.ids.shape == (n_query, 10)
    np.testing.assert_array_equal(result.ids, ids[order])
    np.testing.assert_allclose(result.scores, np.take_along_axis(expected, order, axis=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_exclude_self_drops_own_item_only(metric):
    rng = np.random.default_rng(1)
    items = rng.standard_normal((30, 8)).astype(np.float32)
    ids = np.arange(100, 130)
    result = GalleryIndex(items, metric, ids=ids).search(items[:5], k=4, exclude_self=True, query_ids=ids[:5])
    scores = brute_force(items[:5], items, metric)
    scores[np.arange(5), np.arange(5)] = -np.inf
    np.testing.assert_array_equal(result.ids, ids[np.argsort(-scores, axis=1, kind="stable")[:, :4]])
    # a query whose id is not in the gallery keeps its k best, including an identical vector
    other = GalleryIndex(items, metric, ids=ids).search(items[:1], k=2, exclude_self=True, query_ids=[7])
    assert other.ids[0, 0] == 100


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_equal_scores_are_ordered_by_gallery_position(metric):
    # four identical gallery vectors; faiss' IndexFlatIP alone would return them highest position first
    gallery = [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
    result = GalleryIndex(gallery, metric, ids=[60, 50, 40, 30, 20, 10]).search([[3.0, 0.0]], k=4)
    assert result.ids.tolist() == [[50, 30, 20, 10]]
    assert len(set(result.scores[0].tolist())) == 1


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_score_all_matches_brute_force_and_is_batch_independent(metric):
    rng = np.random.default_rng(2)
    gallery = rng.standard_normal((50, 12))  # float64 input is cast to float32
    queries = rng.standard_normal((25, 12))
    index = GalleryIndex(gallery, metric)
    scores = index.score_all(queries)
    assert scores.shape == (25, 50) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, brute_force(queries, gallery, metric), rtol=1e-5, atol=1e-5)
    for row in (0, 24):
        np.testing.assert_array_equal(index.score_all(queries[row:row + 1])[0], scores[row])


def test_inputs_are_not_modified():
    gallery = np.array([[3.0, 4.0], [1.0, 1.0]])
    queries = np.array([[6.0, 8.0]], dtype=np.float32)
    GalleryIndex(gallery, "cosine").search(queries, k=1)
    assert gallery.tolist() == [[3.0, 4.0], [1.0, 1.0]] and queries.tolist() == [[6.0, 8.0]]


@pytest.mark.parametrize("k", [0, -1, 4, 2.0, True])
def test_bad_k(k):
    with pytest.raises(SearchError, match=r"k must be an integer in \[1, 3\]"):
        GalleryIndex(np.eye(3), "l2").search(np.eye(3)[:1], k=k)


def test_exclude_self_needs_one_spare_item_and_query_ids():
    index = GalleryIndex(np.eye(3), "l2")
    with pytest.raises(SearchError, match=r"\[1, 2\]"):
        index.search(np.eye(3), k=3, exclude_self=True, query_ids=[0, 1, 2])
    with pytest.raises(SearchError, match="query_ids"):
        index.search(np.eye(3), k=1, exclude_self=True)
    with pytest.raises(SearchError, match="query_ids"):
        index.search(np.eye(3), k=1, query_ids=[0, 1, 2])
    with pytest.raises(SearchError, match=r"shape \(3,\)"):
        index.search(np.eye(3), k=1, exclude_self=True, query_ids=[0, 1])


def test_bad_shapes_and_values():
    index = GalleryIndex(np.eye(3), "cosine")
    with pytest.raises(SearchError, match="queries have dim 2 but the gallery index has dim 3"):
        index.search([[1.0, 0.0]], k=1)
    with pytest.raises(SearchError, match=r"shape \(3,\)"):
        index.search([1.0, 0.0, 0.0], k=1)  # a single query must be (1, d)
    with pytest.raises(SearchError, match="row 1 is a zero vector"):
        index.search([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], k=1)
    with pytest.raises(SearchError, match="row 0 contains NaN"):
        index.search([[np.nan, 0.0, 0.0]], k=1)
    with pytest.raises(SearchError, match="id 7 repeats"):
        GalleryIndex(np.eye(3), "l2", ids=[7, 8, 7])
    with pytest.raises(SearchError, match="gallery ids"):
        GalleryIndex(np.eye(3), "l2", ids=[0.0, 1.0, 2.0])
    with pytest.raises(SearchError, match=r"shape \(0, 3\)"):
        GalleryIndex(np.zeros((0, 3)), "l2")


def _write_set(path, model, metric):
    batch = EmbeddingBatch(ids=np.array([11, 12, 13], dtype=np.int64), labels=np.array([0, 1, 0], dtype=np.int64),
                           embeddings=np.array([[10.0, 0.0], [0.9, 0.1], [0.0, 2.0]], dtype=np.float32),
                           side_info=None, model=model)
    return write_embedding_set(path, batch, model=model, metric=metric)


@pytest.mark.parametrize(("metric", "expected"), [("l2", [[12, 13, 11]]), ("cosine", [[11, 12, 13]])])
def test_index_for_set_uses_manifest_metric_ids_and_model(tmp_path, metric, expected):
    index = index_for_set(_write_set(tmp_path / "gallery", V1, metric))
    assert index.metric == metric and index.model == V1 and len(index) == 3 and index.dim == 2
    assert search_set(index, [[1.0, 0.0]], V1, k=3).ids.tolist() == expected


def test_search_set_refuses_other_model(tmp_path):
    index = index_for_set(_write_set(tmp_path / "gallery", V1, "l2"))
    with pytest.raises(VersionMismatchError, match="v2@222222222222"):
        search_set(index, [[1.0, 0.0]], V2, k=1)
    with pytest.raises(VersionMismatchError):
        search_set(index, [[1.0, 0.0]], ModelRef(label="v1", sha256="3" * 64), k=1)
    with pytest.raises(SearchError, match="index.model is None"):
        search_set(GalleryIndex([[1.0, 0.0]], "l2"), [[1.0, 0.0]], V1, k=1)


# ----- regressions of issue 10 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [np.int64(2), np.int32(2), np.uint8(2)])
def test_numpy_integer_k_is_accepted(k):
    index = GalleryIndex(np.eye(3), "l2", ids=[10, 11, 12])
    plain = index.search(np.eye(3)[:1], k=2)
    result = index.search(np.eye(3)[:1], k=k)  # crashed inside faiss with a SWIG TypeError
    np.testing.assert_array_equal(result.ids, plain.ids)
    excluded = index.search(np.eye(3)[:1], k=k, exclude_self=True, query_ids=[10])
    assert excluded.ids.tolist() == [[11, 12]]


@pytest.mark.parametrize("k", [np.float64(2.0), np.bool_(True), "2", None])
def test_non_integer_k_is_refused_in_one_line(k):
    with pytest.raises(SearchError, match=r"k must be an integer in \[1, 3\]") as info:
        GalleryIndex(np.eye(3), "l2").search(np.eye(3)[:1], k=k)
    assert repr(k) in str(info.value) and "\n" not in str(info.value)


def test_search_set_accepts_numpy_k(tmp_path):
    index = index_for_set(_write_set(tmp_path / "gallery", V1, "l2"))
    assert search_set(index, [[1.0, 0.0]], V1, k=np.int64(2)).ids.tolist() == [[12, 13]]


def test_bad_query_row_is_named_by_its_row_and_query_id():
    index = GalleryIndex(np.eye(3), "cosine", ids=[10, 11, 12])
    queries = np.eye(3)[[0, 1, 2, 0]]
    queries[3] = 0.0
    with pytest.raises(SearchError, match=r"^queries row 3 \(item_id 10\) is a zero vector"):
        index.search(queries, k=1, exclude_self=True, query_ids=[11, 12, 13, 10])
    queries[3, 0] = np.inf
    with pytest.raises(SearchError, match=r"^queries row 3 contains NaN or inf; expected finite"):
        index.search(queries, k=1)
    with pytest.raises(SearchError, match=r"^queries row 1002 \(item_id 7\) contains NaN"):
        index.score_all(queries[3:], first_row=999 + 3, row_ids=np.array([7]))


def test_bad_gallery_row_of_a_stored_set_names_the_set_and_item_id(tmp_path):
    stored = _write_set(tmp_path / "gallery", V1, "l2")
    batch = stored.read()
    batch.embeddings[1, 1] = np.nan  # a set corrupted after it was written (the writer refuses NaN)
    with pytest.raises(SearchError, match=r"gallery embeddings row 1 \(item_id 12\) contains NaN"):
        GalleryIndex(batch.embeddings, "l2", ids=batch.ids)
    from factories import poison_set

    poison_set(stored.path, row=2)
    with pytest.raises(SearchError, match=rf"^embedding set {stored.path}: gallery embeddings row 2 \(item_id 13\) "
                                          "contains NaN or inf"):
        index_for_set(EmbeddingSet.open(stored.path))


def test_duplicate_query_ids_are_refused():
    index = GalleryIndex(np.eye(3), "l2", ids=[10, 11, 12])
    with pytest.raises(SearchError, match="query_ids must be unique, id 10 repeats"):
        index.search(np.eye(3), k=1, exclude_self=True, query_ids=[10, 10, 12])


def test_cosine_self_matches_of_unit_float32_vectors_score_at_most_one():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = GalleryIndex(x, "cosine")
    for scores in (index.search(x, k=3).scores, index.score_all(x[:40]), index.search(-x[:40], k=1000).scores):
        assert scores.dtype == np.float32
        assert scores.max() <= 1.0 and scores.min() >= -1.0  # were up to 1.0000006
        assert (1.0 - scores).min() >= 0.0  # a cosine distance is never negative
    np.testing.assert_allclose(index.search(x, k=1).scores, 1.0, atol=1e-6)


def test_l2_distances_are_never_negative():
    x = np.random.default_rng(1).standard_normal((300, 32)).astype(np.float32)
    index = GalleryIndex(x, "l2")
    for scores in (index.search(x, k=2).scores, index.score_all(x[:30])):  # BLAS path (>= 20 queries) included
        assert (-scores).min() >= 0.0


def test_a_query_whose_float32_distances_overflow_is_refused_not_answered_with_unfilled_slots():
    gallery = np.eye(4, dtype=np.float32)
    index = GalleryIndex(gallery, "l2", ids=np.arange(10, 14))
    huge = np.array([[3e19, 0, 0, 0], [1, 0, 0, 0]], dtype=np.float32)
    with pytest.raises(SearchError, match=r"^queries row 0 is too large to score in float32 \(max \|value\| 3e\+19\)"):
        index.search(huge, 2)
    assert index.search(huge[1:], 1).ids.tolist() == [[10]]
