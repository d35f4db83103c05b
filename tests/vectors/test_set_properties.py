"""Property-based tests: an embedding set written from random batches reads back exactly, with valid checksums."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import blake3
import numpy as np
import pyarrow.parquet as pq
import pytest
from batch_checks import assert_batches_equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fct_registry.core.errors import EmbeddingSetError
from fct_registry.core.refs import ModelRef
from fct_registry.vectors.batch import EmbeddingBatch, concat_batches
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.set_writer import write_embedding_set

V1 = ModelRef(label="v1", sha256=hashlib.sha256(b"model v1").hexdigest())
S1 = ModelRef(label="s1", sha256=hashlib.sha256(b"side model").hexdigest())
INT64 = st.integers(-(2**63), 2**63 - 1)
FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)  # subnormals, -0.0 and extremes included


@st.composite
def set_contents(draw):
    """Random items (unique int64 ids, int64 labels with -1, finite float32 vectors, optional side-info) cut into
    several batches, and the set's shard size."""
    n = draw(st.integers(1, 30))
    d = draw(st.integers(1, 6))
    d_side = draw(st.none() | st.integers(1, 3))
    ids = draw(st.lists(INT64, min_size=n, max_size=n, unique=True))
    labels = draw(st.lists(st.integers(-1, 5) | INT64, min_size=n, max_size=n))
    embeddings = draw(hnp.arrays(np.float32, (n, d), elements=FLOAT32))
    side_info = None if d_side is None else draw(hnp.arrays(np.float32, (n, d_side), elements=FLOAT32))
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), max_size=4, unique=True))) if n > 1 else []
    batches = []
    for start, stop in zip([0, *cuts], [*cuts, n], strict=True):
        side = None if side_info is None else side_info[start:stop]
        batches.append(EmbeddingBatch(np.array(ids[start:stop], dtype=np.int64),
                                      np.array(labels[start:stop], dtype=np.int64), embeddings[start:stop], side,
                                      model=V1))
    return batches, draw(st.integers(2, 16)), draw(st.sampled_from(["l2", "cosine"]))


def file_blake3(path: Path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(set_contents(), st.integers(1, 50), st.integers(0, 2**32 - 1))
def test_written_set_reads_back_exactly_and_its_checksums_hold(contents, read_rows, seed):
    batches, shard_rows, metric = contents
    want = concat_batches(batches)
    side_model = None if want.side_info is None else S1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "set"
        written = write_embedding_set(path, iter(batches), V1, side_model, metric=metric, shard_rows=shard_rows,
                                      lineage=["random"])
        opened = EmbeddingSet.open(path, verify=True)
        m = opened.manifest
        assert m == written.manifest and (m.model, m.side_info_model, m.metric) == (V1, side_model, metric)
        assert (m.count, m.dim) == (len(want), want.embeddings.shape[1])
        assert [s.rows for s in m.shards] == [min(shard_rows, len(want) - start)
                                              for start in range(0, len(want), shard_rows)]
        for shard, file in zip(m.shards, opened.shard_paths, strict=True):
            assert shard.blake3 == file_blake3(file) and shard.sha256 is None
            assert pq.read_metadata(file).num_rows == shard.rows
        assert sorted(p.name for p in path.iterdir()) == sorted(["manifest.json", *(s.file for s in m.shards)])
        assert [p.name for p in Path(tmp).iterdir()] == ["set"]  # no temp dir left beside it

        assert_batches_equal(opened.read(), want)  # exact values; the sign of zero is checked next
        np.testing.assert_array_equal(np.signbit(opened.read().embeddings), np.signbit(want.embeddings))
        pieces = list(opened.iter_batches(read_rows))
        assert all(1 <= len(piece) <= read_rows for piece in pieces)
        assert_batches_equal(concat_batches(pieces), want)

        victim = opened.shard_paths[np.random.default_rng(seed).integers(len(m.shards))]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01  # one flipped bit anywhere in a shard is caught by its checksum
        victim.write_bytes(bytes(data))
        with pytest.raises(EmbeddingSetError, match=rf"shard {victim} blake3 does not match"):
            EmbeddingSet.open(path, verify=True)
