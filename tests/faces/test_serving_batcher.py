"""The search worker of the service (fct_registry.serving.batcher) with real faiss indexes and a real ONNX backbone:
queries queued together are answered by one faiss call (images by one ONNX Runtime call), with the answers each query
gets alone."""

from __future__ import annotations

import threading

import factories
import numpy as np
import pytest

from fct_registry.core.config import ServingParams
from fct_registry.core.errors import DataError, SearchError
from fct_registry.core.refs import ModelRef
from fct_registry.onnx_boundary.embedding import default_contract, embed_images
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.serving.batcher import SearchBatcher
from fct_registry.vectors.ann_index import build_ann_index
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.search import GalleryIndex, index_for_set
from fct_registry.vectors.set_writer import write_embedding_set

MODEL = ModelRef(label="v2", sha256="2" * 64)
DIM = 16


class Gate:
    """Holds the worker inside a 'search' until opened, so that the queries submitted meanwhile queue up."""

    def __init__(self) -> None:
        self.entered, self.open = threading.Event(), threading.Event()

    def search(self, queries, k):
        self.entered.set()
        assert self.open.wait(30)
        raise SearchError("the gate answers nothing")


@pytest.fixture(scope="module")
def indexes(tmp_path_factory) -> dict[str, GalleryIndex]:
    gallery = np.random.default_rng(0).normal(size=(3000, DIM)).astype(np.float32)
    batch = EmbeddingBatch(np.arange(3000) + 10, np.full(3000, -1), gallery, model=MODEL)
    embedding_set = write_embedding_set(tmp_path_factory.mktemp("b") / "g", [batch], MODEL)
    ann = {kind: build_ann_index(embedding_set, ServingParams(index=kind, nlist=32, nprobe=4, pq_m=4, pq_nbits=6,
                                                              recall_queries=10)).index
           for kind in ("ivf", "ivfpq", "hnsw")}
    return {"exact": GalleryIndex(gallery, "l2", ids=np.arange(3000) + 10), **ann}


def held_batch(batcher: SearchBatcher, jobs: list[tuple[GalleryIndex, np.ndarray, int]]) -> list:
    """Submit ``jobs`` while the worker is held, then release it: they are all queued when it looks."""
    gate = Gate()
    first = batcher.submit(gate, np.zeros((1, DIM), np.float32), 1)
    assert gate.entered.wait(30)
    futures = [batcher.submit(index, query, k) for index, query, k in jobs]
    gate.open.set()
    with pytest.raises(SearchError):
        first.result(30)
    return [future.exception(30) or future.result(30) for future in futures]


@pytest.mark.parametrize("kind", ["exact", "ivf", "ivfpq", "hnsw"])
def test_batched_answers_equal_one_by_one_answers(indexes, kind):
    index = indexes[kind]
    queries = np.random.default_rng(1).normal(size=(40, DIM)).astype(np.float32)  # 40: faiss' BLAS path from 20
    batcher = SearchBatcher()
    try:
        answers = held_batch(batcher, [(index, queries[i:i + 1], 10) for i in range(40)])
    finally:
        batcher.close()
    assert (batcher.stats.batches, batcher.stats.queries, batcher.stats.largest) == (2, 41, 40)  # gate + one call
    for row, answer in enumerate(answers):
        alone = index.search(queries[row:row + 1], 10)
        assert (answer.ids == alone.ids).all(), row
        if kind == "exact":  # one matrix product for the batch: float32 rounding differs from the per-pair kernel
            np.testing.assert_allclose(answer.scores, alone.scores, rtol=1e-5)
        else:
            np.testing.assert_array_equal(answer.scores, alone.scores)


def test_one_bad_query_fails_alone_and_other_k_or_indexes_are_searched_apart(indexes):
    rng = np.random.default_rng(2)
    good = rng.normal(size=(3, DIM)).astype(np.float32)
    bad = np.full((1, DIM), np.nan, np.float32)
    batcher = SearchBatcher()
    try:
        answers = held_batch(batcher, [(indexes["ivf"], good[0:1], 5), (indexes["ivf"], bad, 5),
                                       (indexes["ivf"], good[1:2], 5), (indexes["ivf"], good[2:3], 3),
                                       (indexes["hnsw"], good[0:1], 5)])
    finally:
        batcher.close()
    assert isinstance(answers[1], SearchError) and "queries row 0 contains NaN or inf" in str(answers[1])
    for answer, (kind, row, k) in zip([answers[0], answers[2], answers[3], answers[4]],
                                      [("ivf", 0, 5), ("ivf", 1, 5), ("ivf", 2, 3), ("hnsw", 0, 5)], strict=True):
        assert answer.ids.shape == (1, k)
        assert (answer.ids == indexes[kind].search(good[row:row + 1], k).ids).all()
    # gate, the ivf k=5 batch (failed, then its 3 queries one by one), ivf k=3, hnsw k=5
    assert batcher.stats.batches == 7 and batcher.stats.largest == 3


def test_a_lone_query_is_searched_at_once(indexes):
    batcher = SearchBatcher()
    try:
        query = np.ones((1, DIM), np.float32)
        answer = batcher.submit(indexes["hnsw"], query, 4).result(30)
    finally:
        batcher.close()
    assert (answer.ids == indexes["hnsw"].search(query, 4).ids).all()
    assert (batcher.stats.batches, batcher.stats.largest) == (1, 1)


def test_images_queued_together_are_embedded_in_one_call_with_the_answers_each_gets_alone(tmp_path_factory):
    world = factories.shared_world(tmp_path_factory)
    backbone = OnnxModel(world.zoo.dirs["v1"] / "model.onnx")
    contract = default_contract(backbone)
    index = index_for_set(EmbeddingSet.open(world.gallery))
    images = world.zoo.splits["test"].images[:6]  # (6, 1, 28, 28) uint8
    wrong = np.zeros((1, 1, 20, 20), np.uint8)  # not the contract's size: this one alone fails
    batcher = SearchBatcher()
    try:
        jobs = [("image", images[i:i + 1]) for i in range(3)] + [("image", wrong)] + [
            ("image", images[i:i + 1]) for i in range(3, 6)]
        gate = Gate()
        first = batcher.submit(gate, np.zeros((1, 8), np.float32), 1)
        assert gate.entered.wait(30)
        futures = [batcher.submit_image(index, image, backbone, contract, 4) for _, image in jobs]
        gate.open.set()
        with pytest.raises(SearchError):
            first.result(30)
        answers = [future.exception(30) or future.result(30) for future in futures]
    finally:
        batcher.close()
    assert isinstance(answers[3], DataError)
    good = answers[:3] + answers[4:]
    for row, answer in enumerate(good):
        alone = index.search(embed_images(backbone, images[row:row + 1], contract), 4)
        assert (answer.ids == alone.ids).all(), row
        np.testing.assert_allclose(answer.scores, alone.scores, rtol=1e-5, atol=1e-6)
    # one ONNX Runtime call for the 7 images (failed by the wrong one), then each alone; one faiss call for the 6
    assert (batcher.stats.embed_batches, batcher.stats.images) == (8, 14)
    assert batcher.stats.largest == 6
