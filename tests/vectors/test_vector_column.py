"""Tests of the stored vector column: fixed-size binary little-endian float32, and the list encoding of older sets."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from batch_checks import assert_batches_equal

from fct_registry.core.errors import EmbeddingSetError
from fct_registry.core.refs import ModelRef
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import MANIFEST, EmbeddingSet, ShardInfo
from fct_registry.vectors.set_writer import write_embedding_set
from fct_registry.vectors.vector_column import vector_array, vector_matrix

V1 = ModelRef(label="v1", sha256=hashlib.sha256(b"model v1").hexdigest())
S1 = ModelRef(label="s1", sha256=hashlib.sha256(b"side model").hexdigest())


def _matrix(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_values_are_the_rows_little_endian_float32_bytes():
    matrix = np.array([[1.0, -2.5], [3.25, 0.0]], dtype=np.float32)
    column = vector_array(matrix)
    assert column.type == pa.binary(8)
    assert column[1].as_py() == np.array([3.25, 0.0], dtype="<f4").tobytes()
    back = vector_matrix(column, 2, "embedding", copy=False)
    np.testing.assert_array_equal(back, matrix)
    assert back.dtype == np.float32 and not back.flags.writeable  # a view of the Arrow buffer


def test_big_endian_and_float64_input_are_stored_as_little_endian_float32():
    matrix = _matrix(5, 3)
    for variant in (matrix.astype(">f4"), matrix.astype(np.float64), np.asfortranarray(matrix)):
        np.testing.assert_array_equal(vector_matrix(vector_array(variant), 3, "embedding"), matrix)


def test_a_sliced_or_chunked_column_reads_its_own_rows():
    matrix = _matrix(10, 4)
    column = vector_array(matrix)
    np.testing.assert_array_equal(vector_matrix(column.slice(3, 4), 4, "embedding"), matrix[3:7])
    chunked = pa.chunked_array([column.slice(0, 6), column.slice(6)])
    np.testing.assert_array_equal(vector_matrix(chunked, 4, "embedding"), matrix)


def test_copy_gives_a_writable_matrix_that_does_not_alias_the_column():
    matrix = _matrix(3, 2)
    column = vector_array(matrix)
    copied = vector_matrix(column, 2, "embedding")
    copied[0, 0] = 99.0
    np.testing.assert_array_equal(vector_matrix(column, 2, "embedding"), matrix)


@pytest.mark.parametrize(("column", "message"), [
    (vector_array(np.zeros((2, 3), np.float32)), "column embedding has width 3, manifest says 4"),
    (pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(6, np.float32)), 3),
     "column embedding has width 3, manifest says 4"),
    (pa.array([1, 2]), r"column embedding has type int64; expected fixed_size_binary\(16\)"),
    (pa.array([b"\0" * 16, None], pa.binary(16)), "column embedding holds 1 null vectors; expected none"),
])
def test_wrong_width_type_or_nulls_are_refused_in_one_line(column, message):
    with pytest.raises(EmbeddingSetError, match=message):
        vector_matrix(column, 4, "embedding")


def test_new_shards_store_binary_vectors_and_a_set_of_list_shards_reads_the_same(tmp_path):
    batch = EmbeddingBatch(np.arange(7, dtype=np.int64), np.arange(7, dtype=np.int64) % 2, _matrix(7, 4),
                           _matrix(7, 3, seed=1), model=V1)
    written = write_embedding_set(tmp_path / "new", [batch], V1, side_info_model=S1)
    schema = pq.read_schema(written.shard_paths[0])
    assert schema.field("embedding").type == pa.binary(16) and schema.field("side_info").type == pa.binary(12)

    old = tmp_path / "old"  # the same set as a set written before issue 13 stores it: fixed_size_list columns
    old.mkdir()
    table = pq.read_table(written.shard_paths[0])
    for name, width in (("embedding", 4), ("side_info", 3)):
        values = vector_matrix(table.column(name), width, name)
        listed = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)
        table = table.set_column(table.schema.get_field_index(name), name, listed)
    pq.write_table(table, old / "part-00000.parquet")
    digest = hashlib.sha256((old / "part-00000.parquet").read_bytes()).hexdigest()
    shard = ShardInfo(file="part-00000.parquet", rows=7, sha256=digest)  # and its checksum: sha256
    (old / MANIFEST).write_text(written.manifest.model_copy(update={"shards": [shard]}).model_dump_json())
    assert_batches_equal(EmbeddingSet.open(old).read(), EmbeddingSet.open(written.path).read())
    assert_batches_equal(EmbeddingSet.open(old).read(), batch)


def test_a_shard_records_exactly_one_checksum_and_writes_only_that_one():
    digest = "ab" * 32
    assert ShardInfo(file="part-00000.parquet", rows=1, blake3=digest).model_dump() == {
        "file": "part-00000.parquet", "rows": 1, "blake3": digest}
    assert ShardInfo(file="part-00000.parquet", rows=1, sha256=digest).model_dump_json() == (
        f'{{"file":"part-00000.parquet","rows":1,"sha256":"{digest}"}}')  # an older set's manifest, byte for byte
    for both_or_none in ({}, {"blake3": digest, "sha256": digest}):
        with pytest.raises(ValueError, match="exactly one checksum"):
            ShardInfo(file="part-00000.parquet", rows=1, **both_or_none)
