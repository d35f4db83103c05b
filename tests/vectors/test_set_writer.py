"""The set writer checks the model each batch carries (vectors of another model of the same width are refused) and
writes each shard as the bytes of its in-memory encoding, hashed as they are written."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import blake3
import numpy as np
import pytest
from batch_checks import assert_batches_equal

from fct_registry.core.errors import EmbeddingSetError, VersionMismatchError
from fct_registry.core.refs import ModelRef
from fct_registry.vectors.batch import EmbeddingBatch, concat_batches, slice_batch, with_model
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.set_writer import shard_bytes, write_embedding_set, write_shard

V1 = ModelRef(label="v1", sha256=hashlib.sha256(b"model v1").hexdigest())
V2 = ModelRef(label="v2", sha256=hashlib.sha256(b"model v2").hexdigest())


def batch(start: int, n: int, model: ModelRef | None, d: int = 4) -> EmbeddingBatch:
    rng = np.random.default_rng(start)
    return EmbeddingBatch(np.arange(start, start + n), np.zeros(n, dtype=np.int64),
                          rng.normal(size=(n, d)).astype(np.float32), model=model)


def test_a_batch_of_another_model_with_the_same_dim_is_refused_and_nothing_is_written(tmp_path):
    batches = [batch(0, 3, V1), batch(3, 3, V2), batch(6, 3, V1)]  # all 4-d: the dims alone cannot tell
    with pytest.raises(VersionMismatchError) as info:
        write_embedding_set(tmp_path / "g", batches, V1, shard_rows=2)
    message = str(info.value)
    assert message == (f"batch 1 (first item_id 3) holds embeddings of model {V2}, but the set is written for "
                       f"model {V1}")
    assert list(tmp_path.iterdir()) == []


def test_an_untagged_batch_is_refused(tmp_path):
    with pytest.raises(EmbeddingSetError, match=rf"^batch 0 \(first item_id 0\) carries no model; .*model {V1}\)$"):
        write_embedding_set(tmp_path / "g", batch(0, 3, None), V1)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_overwrite_keeps_the_old_set(tmp_path):
    old = write_embedding_set(tmp_path / "g", batch(0, 5, V1), V1)
    want = old.read()
    with pytest.raises(VersionMismatchError, match=f"model {V1}, but the set is written for model {V2}"):
        write_embedding_set(tmp_path / "g", [batch(0, 5, V2), batch(5, 2, V1)], V2, overwrite=True)
    assert EmbeddingSet.open(tmp_path / "g").manifest.model == V1
    assert_batches_equal(EmbeddingSet.open(tmp_path / "g").read(), want)


def test_the_set_model_must_be_a_model_ref(tmp_path):
    with pytest.raises(EmbeddingSetError, match="model must be a ModelRef, got str 'v1'"):
        write_embedding_set(tmp_path / "g", batch(0, 2, V1), "v1")  # type: ignore[arg-type]


def test_batches_keep_their_model_through_slicing_concatenation_and_tagging():
    a, b = batch(0, 4, V1), batch(4, 2, V1)
    assert concat_batches([a, b]).model == V1 and slice_batch(a, 1, 3).model == V1
    with pytest.raises(VersionMismatchError, match=f"batches of model {V1} and model {V2}"):
        concat_batches([a, batch(4, 2, V2)])
    with pytest.raises(EmbeddingSetError, match="at least one batch"):
        concat_batches([])
    untagged = replace(a, model=None)
    tagged = with_model(untagged, V2)
    assert tagged.model == V2 and tagged.embeddings is untagged.embeddings  # shared, not copied
    assert with_model(a, V1).model == V1
    with pytest.raises(VersionMismatchError, match=f"model {V1}, cannot re-tag it as {V2}"):
        with_model(a, V2)
    with pytest.raises(EmbeddingSetError, match="model must be a ModelRef or None, got str 'v1'"):
        EmbeddingBatch([0], [0], [[1.0]], model="v1")  # type: ignore[arg-type]


def test_a_shard_is_written_as_its_in_memory_encoding_and_its_checksum_is_of_the_file(tmp_path):
    rng = np.random.default_rng(3)
    n = 20_000  # 10 MB of vectors: Parquet writes many pages through the hashing file
    rows = EmbeddingBatch(rng.permutation(n), rng.integers(0, 10, n), rng.normal(size=(n, 64)).astype(np.float32),
                          rng.normal(size=(n, 64)).astype(np.float32), uncertainty=rng.random(n, dtype=np.float32))
    info = write_shard(tmp_path, "part-00000.parquet", rows)
    data = (tmp_path / "part-00000.parquet").read_bytes()
    assert data == shard_bytes(rows).to_pybytes() and len(data) > 10**7
    assert (info.file, info.rows, info.blake3, info.sha256) == ("part-00000.parquet", n,
                                                                  blake3.blake3(data).hexdigest(), None)
    assert [p.name for p in tmp_path.iterdir()] == ["part-00000.parquet"]  # the temp file was renamed
