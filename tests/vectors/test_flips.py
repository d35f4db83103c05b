"""set_flips: negative flips of an upgraded set against its source, from the two stored sets alone."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fct_registry.core.errors import SearchError
from fct_registry.core.refs import ModelRef
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.flips import Flips, negative_flips, set_flips
from fct_registry.vectors.metrics import top1_correct
from fct_registry.vectors.set_writer import write_embedding_set

V1 = ModelRef(label="v1", sha256=hashlib.sha256(b"flips v1").hexdigest())
V2 = ModelRef(label="v2", sha256=hashlib.sha256(b"flips v2").hexdigest())


def write(path, ids, labels, vectors, model):
    batch = EmbeddingBatch(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64),
                           np.asarray(vectors, dtype=np.float32), model=model)
    return write_embedding_set(path, batch, model, shard_rows=4)  # several shards: batches cross them


def test_set_flips_on_a_hand_built_upgrade_leaves_unlabelled_items_out(tmp_path):
    # the hand-built update of test_metrics (classes 0 0 1 1 2 2) plus two unlabelled items, which would be the
    # nearest neighbours of items 0 and 5 if they were in the gallery
    ids, labels = [30, 31, 32, 33, 90, 34, 35, 91], [0, 0, 1, 1, -1, 2, 2, -1]
    old = [[0.0], [1.0], [10.0], [11.0], [0.1], [20.0], [40.0], [40.1]]
    new = [[0.0], [5.0], [3.0], [11.0], [0.1], [20.0], [21.0], [21.1]]
    source, upgraded = write(tmp_path / "v1", ids, labels, old, V1), write(tmp_path / "v1@v2", ids, labels, new, V2)
    assert set_flips(source, upgraded, batch_rows=3) == Flips(negative=4, positive=1, n_query=6)


def test_set_flips_samples_at_most_max_queries_and_equals_the_flips_of_that_sample(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    ids = rng.permutation(1000)[:n]
    labels = rng.integers(0, 3, n)
    old = rng.standard_normal((n, 4)) + labels[:, None]
    new = old + rng.normal(0, 0.8, (n, 4))
    source, upgraded = write(tmp_path / "a", ids, labels, old, V1), write(tmp_path / "b", ids, labels, new, V2)
    full = set_flips(source, upgraded)
    hits = [top1_correct(x, labels, x, labels, "l2", ids, ids) for x in (old, new)]
    assert full == negative_flips(*hits) and full.n_query == n and full.negative > 0
    sample = set_flips(source, upgraded, max_queries=25, seed=3)
    keep = np.sort(np.random.default_rng(3).choice(n, size=25, replace=False))
    hits = [top1_correct(x[keep], labels[keep], x[keep], labels[keep], "l2", ids[keep], ids[keep]) for x in (old, new)]
    assert sample == negative_flips(*hits) and sample.n_query == 25


def test_set_flips_needs_two_labelled_items_and_the_same_ids(tmp_path):
    source = write(tmp_path / "s", [1, 2, 3], [0, -1, -1], [[0.0], [1.0], [2.0]], V1)
    assert set_flips(source, source) is None
    labelled = write(tmp_path / "l", [1, 2, 3], [0, 0, 1], [[0.0], [1.0], [2.0]], V1)
    other = write(tmp_path / "o", [1, 2, 4], [0, 0, 1], [[0.0], [1.0], [2.0]], V2)
    with pytest.raises(SearchError, match=rf"set {tmp_path / 'o'} lacks 1 of the 3 item ids"):
        set_flips(labelled, other)
    with pytest.raises(SearchError, match="max_queries must be >= 2, got 1"):
        set_flips(labelled, labelled, max_queries=1)
