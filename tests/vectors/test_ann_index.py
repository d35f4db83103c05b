"""Approximate serving indexes (IVF-Flat, IVF-PQ, HNSW) with real faiss: recall against a plain brute-force oracle,
exact answers on an easy gallery, storage tied to the set's manifest, and one-line errors for bad knobs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fct_registry.core.config import ServingParams
from fct_registry.core.errors import ConfigError, EmbeddingSetError
from fct_registry.core.refs import ModelRef
from fct_registry.usecases.gallery_index import open_serving_index, serving_params
from fct_registry.usecases.sets import clean_unfinished
from fct_registry.vectors.ann_index import build_ann_index, load_ann_index, recall_at_k, resolve_knobs
from fct_registry.vectors.ann_store import (
    ANN_DIR,
    RECORD_FILE,
    index_folder,
    manifest_sha256,
    read_record,
    stored_indexes,
)
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import EmbeddingSet, scan_embedding_sets
from fct_registry.vectors.search import GalleryIndex, index_for_set
from fct_registry.vectors.set_writer import write_embedding_set

MODEL = ModelRef(label="v2", sha256="2" * 64)


def clustered(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """(n, dim) float32: points around ``clusters`` far-apart centres (±``spread`` noise), in a shuffled order."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) * 10
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim)) * spread).astype(np.float32)


def write_set(path, vectors: np.ndarray, metric: str = "l2", first_id: int = 1000) -> EmbeddingSet:
    ids = np.arange(first_id, first_id + len(vectors))  # ids differ from positions: both must be kept apart
    batch = EmbeddingBatch(ids, np.full(len(vectors), -1), vectors, model=MODEL)
    return write_embedding_set(path, [batch], MODEL, metric=metric, shard_rows=97, overwrite=path.exists())


def oracle_recall(gallery: np.ndarray, positions: np.ndarray, answers: np.ndarray, ids: np.ndarray, k: int) -> float:
    """recall@k by plain loops: exact top-k by float64 numpy distances (own item excluded) vs ``answers``."""
    total = 0
    for row, position in enumerate(positions):
        distances = ((gallery.astype(np.float64) - gallery[position].astype(np.float64)) ** 2).sum(axis=1)
        distances[position] = np.inf
        truth = {int(ids[j]) for j in np.argsort(distances, kind="stable")[:k]}
        found = [int(i) for i in answers[row] if i != ids[position]][:k]
        total += len(truth & set(found))
    return total / (k * len(positions))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_recall_at_10_equals_a_brute_force_oracle(tmp_path, kind):
    gallery = np.random.default_rng(0).normal(size=(800, 16)).astype(np.float32)  # no structure: recall < 1
    embedding_set = write_set(tmp_path / "g", gallery)
    params = ServingParams(index=kind, nlist=16, nprobe=2, hnsw_m=4, ef_construction=8, ef_search=10,
                           recall_queries=60)
    built = build_ann_index(embedding_set, params)
    positions = built.heldout.positions
    assert len(set(positions.tolist())) == 60 and (build_ann_index(embedding_set, params).heldout.positions
                                                   == positions).all()  # a fixed seed picks the same queries
    answers = built.index.search(gallery[positions], 11).ids
    expected = oracle_recall(gallery, positions, answers, built.index.ids, 10)
    assert 0.2 < expected < 0.95  # an approximation worth measuring
    assert built.record.recall_at_10 == pytest.approx(expected, abs=1e-12)
    assert (built.record.recall_k, built.record.recall_queries) == (10, 60)


def test_recall_counts_each_found_item_once_and_ignores_missing_slots():
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(np.array([[3, 2, 9], [-1, -1, 4]]), truth) == pytest.approx(3 / 6)
    with pytest.raises(Exception, match=r"\(2, 2\) and \(2, 3\)"):
        recall_at_k(np.array([[1, 2], [3, 4]]), truth)


@pytest.mark.parametrize(("kind", "metric"), [("ivf", "l2"), ("ivf", "cosine"), ("hnsw", "l2"), ("ivfpq", "l2")])
def test_an_easy_gallery_gets_the_exact_answer(tmp_path, kind, metric):
    gallery = clustered(600, 8, clusters=12, spread=0.5, seed=1)
    embedding_set = write_set(tmp_path / "g", gallery, metric)
    params = ServingParams(index=kind, nlist=12, nprobe=3, pq_m=8, pq_nbits=8, train_size=600)
    built = build_ann_index(embedding_set, params)
    exact = index_for_set(embedding_set)
    queries = gallery[::37] + 0.01
    got, want = built.index.search(queries, 5), exact.search(queries, 5)
    if kind == "ivfpq":  # PQ ranks by distances to the quantized vectors: the near-duplicate first, the rest close
        assert (got.ids[:, 0] == want.ids[:, 0]).all()
        np.testing.assert_allclose(got.scores[:, 0], want.scores[:, 0], atol=0.2)
        assert built.record.recall_at_10 >= 0.6
        return
    assert (got.ids == want.ids).all()
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)
    assert built.record.recall_at_10 >= 0.99


def test_fewer_items_in_the_probed_cells_than_k_widen_the_search(tmp_path):
    gallery = clustered(400, 4, clusters=8, spread=0.1, seed=2)
    embedding_set = write_set(tmp_path / "g", gallery)
    built = build_ann_index(embedding_set, ServingParams(index="ivf", nlist=8, nprobe=1))
    result = built.index.search(gallery[:3], 200)  # a cell holds ~50 items: one probe cannot fill 200 slots
    want = index_for_set(embedding_set).search(gallery[:3], 200)
    assert (result.ids >= 1000).all() and len(set(result.ids[0].tolist())) == 200
    np.testing.assert_allclose(np.sort(result.scores, axis=1), np.sort(want.scores, axis=1), rtol=1e-5, atol=1e-5)


def test_the_index_is_stored_reloaded_and_never_reused_after_the_set_changes(tmp_path):
    gallery = clustered(500, 8, clusters=10, spread=1.0, seed=3)
    embedding_set = write_set(tmp_path / "g", gallery)
    params = ServingParams(index="ivf", nlist=10, nprobe=2, recall_queries=50)
    said: list[str] = []
    first = open_serving_index(embedding_set, params, notify=said.append)
    assert first.built and first.path.parent == embedding_set.path / ANN_DIR and len(said) == 2
    assert "building the ivf index" in said[0] and "recall@10" in said[1]
    assert read_record(first.path).manifest_sha256 == first.record.manifest_sha256
    assert EmbeddingSet.open(embedding_set.path, verify=True).manifest.count == 500  # readers ignore ann/
    again = open_serving_index(EmbeddingSet.open(embedding_set.path), params, notify=said.append)
    assert not again.built and again.path == first.path and len(said) == 2
    queries = gallery[:7] + 0.1
    assert (again.index.search(queries, 10).ids == first.index.search(queries, 10).ids).all()
    wider = open_serving_index(embedding_set, params.model_copy(update={"nprobe": 10}))  # search knob only
    assert not wider.built and wider.path == first.path and wider.record.search == {"nprobe": 10}
    assert wider.record.recall_at_10 == 1.0 >= first.record.recall_at_10

    # the set changes, and its old index is put back inside it: stale, refused, rebuilt, removed
    kept = shutil.copytree(first.path, tmp_path / "kept")
    changed = write_set(tmp_path / "g", gallery[::-1].copy())
    shutil.copytree(kept, first.path)
    assert [(s.path, s.stale) for s in stored_indexes(changed)] == [(first.path, True)]
    with pytest.raises(EmbeddingSetError, match="is stale: built for manifest sha256") as info:
        load_ann_index(first.path, changed, params)
    assert "\n" not in str(info.value)
    rebuilt = open_serving_index(changed, params)
    assert rebuilt.built and rebuilt.path != first.path and not first.path.exists()
    assert [(s.path, s.stale) for s in stored_indexes(changed)] == [(rebuilt.path, False)]
    assert (rebuilt.index.search(gallery[:1], 1).ids == [[1000 + 499]]).all()  # the new order's ids


def test_a_set_whose_folder_cannot_take_the_index_is_served_from_memory(tmp_path):
    embedding_set = write_set(tmp_path / "g", clustered(200, 4, clusters=4, spread=1.0, seed=4))
    (embedding_set.path / ANN_DIR).write_text("not a folder")  # mkdir of ann/ fails, as on a read-only set
    served = open_serving_index(embedding_set, ServingParams(index="hnsw"))
    assert not served.stored and served.path is None and "could not store the index in" in served.note
    assert (embedding_set.path / ANN_DIR).read_text() == "not a folder"
    assert (served.index.search(np.zeros((1, 4)), 3).ids >= 1000).all()


def test_unfinished_builds_are_listed_and_cleaned_like_unfinished_sets(tmp_path):
    embedding_set = write_set(tmp_path / "sets" / "g", clustered(200, 4, clusters=4, spread=1.0, seed=6))
    served = open_serving_index(embedding_set, ServingParams(index="ivf", nlist=4, nprobe=1))
    leftover = served.path.parent / f".tmp-{served.path.name}.new-{'0' * 32}"  # a build killed before its rename
    leftover.mkdir()
    scan = scan_embedding_sets(tmp_path / "sets", verify=True)
    assert [s.path for s in scan.sets] == [embedding_set.path] and scan.invalid == []
    assert scan.unfinished == [leftover]
    assert clean_unfinished(tmp_path / "sets", 0) == [leftover] and served.path.is_dir()
    assert [s.path for s in stored_indexes(embedding_set)] == [served.path]


BAD_KNOBS = [
    ({"index": "ivf", "nlist": 500}, "serving.nlist 500 exceeds the set's 300 items"),
    ({"index": "ivf", "nlist": 8, "nprobe": 9}, "serving.nprobe 9 exceeds serving.nlist 8"),
    ({"index": "ivfpq", "pq_m": 3}, "serving.pq_m 3 does not divide the set's dim 4"),
    ({"index": "ivf", "nlist": 16, "train_size": 10}, "serving.train_size 10 is below 16"),
    ({"index": "ivfpq", "nlist": 2, "nprobe": 1, "pq_m": 2, "train_size": 100},
     "serving.train_size 100 is below 256"),
]


@pytest.mark.parametrize(("knobs", "message"), BAD_KNOBS, ids=[m.split()[0] for _, m in BAD_KNOBS])
def test_bad_knobs_are_one_line_errors_naming_the_value(tmp_path, knobs, message):
    with pytest.raises(ConfigError) as info:
        resolve_knobs(ServingParams(**knobs), 300, 4)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("index", "annoy", "serving.index: Input should be 'exact', 'ivf', 'ivfpq' or 'hnsw' (got 'annoy')"),
    ("nprobe", 0, "serving.nprobe: Input should be greater than 0 (got 0)"),
    ("hnsw_m", 1, "serving.hnsw_m: Input should be greater than or equal to 2 (got 1)"),
])
def test_bad_options_name_the_option_and_the_value(tmp_path, option, value, message):
    with pytest.raises(ConfigError) as info:
        serving_params(tmp_path, **{option: value})
    assert str(info.value) == message


def test_exact_knobs_have_no_stored_index_and_full_rankings_stay_exact(tmp_path):
    embedding_set = write_set(tmp_path / "g", clustered(100, 4, clusters=4, spread=1.0, seed=5))
    served = open_serving_index(embedding_set, ServingParams(index="exact"))
    assert type(served.index) is GalleryIndex and served.record is None and not (embedding_set.path / ANN_DIR).exists()
    built = build_ann_index(embedding_set, ServingParams(index="hnsw"))
    with pytest.raises(Exception, match="cannot score every gallery item"):
        built.index.score_all(np.zeros((1, 4)))
    assert RECORD_FILE == "index.json"


def test_a_damaged_or_foreign_index_where_the_set_looks_for_its_own_is_built_again(tmp_path):
    gallery = clustered(300, 8, clusters=6, spread=1.0, seed=7)
    embedding_set = write_set(tmp_path / "g", gallery)
    params = ServingParams(index="ivf", nlist=6, nprobe=2, recall_queries=30)
    first = open_serving_index(embedding_set, params)
    (first.path / "index.faiss").write_bytes(b"truncated")
    said: list[str] = []
    again = open_serving_index(embedding_set, params, notify=said.append)
    assert again.built and again.path == first.path
    assert "cannot load index" in said[0] and said[0].endswith("; building it again")
    assert (again.index.search(gallery[:1], 1).ids == [[1000]]).all()

    kept = shutil.copytree(again.path, tmp_path / "old")
    changed = write_set(tmp_path / "g", gallery[::-1].copy())  # the old index is copied where the new one goes
    target = index_folder(changed, params, manifest_sha256(changed))
    shutil.copytree(kept, target)
    said.clear()
    rebuilt = open_serving_index(changed, params, notify=said.append)
    assert "is stale: built for manifest sha256" in said[0] and rebuilt.built and rebuilt.path == target
    assert read_record(target).manifest_sha256 == manifest_sha256(changed) != read_record(kept).manifest_sha256
