"""The upgrade cut into output shards: threads, irregular source shards, verification while reading, FastFill's
sigma, and the engine options."""

from __future__ import annotations

import numpy as np
import pytest
from engine_world import V1, V2, V3, by_hand, chain, digests, leftovers, make_set, step

from fct_registry.core.errors import EmbeddingSetError, UpgradeError
from fct_registry.engines.local import session_threads
from fct_registry.engines.run import upgrade_set
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import MANIFEST, EmbeddingSet
from fct_registry.vectors.set_writer import manifest_bytes, write_embedding_set


def test_threads_write_the_same_bytes_and_fastfill_sigma_reaches_the_set(h, tmp_path):
    source = make_set(tmp_path / "v1", n=1000, shard_rows=128)  # 8 shards
    steps = [step(h, "h1", V1, V2), step(h, "fastfill", V2, V3)]
    reports = []
    one = upgrade_set(source.path, steps, tmp_path / "one", batch_rows=50, workers=1)
    three = upgrade_set(source.path, steps, tmp_path / "three", batch_rows=50, workers=3, on_shard=reports.append)

    assert digests(one.path) == digests(three.path)
    got = EmbeddingSet.open(three.path, verify=True).read()
    want, sigma = by_hand(h, ["h1", "fastfill"], source.read(), with_sigma=True)
    np.testing.assert_allclose(got.embeddings, want, atol=1e-4)
    np.testing.assert_allclose(got.uncertainty, sigma, atol=1e-4)
    assert three.manifest.uncertainty and [s.rows for s in three.manifest.shards] == [128] * 7 + [104]
    assert [r.info for r in reports] == three.manifest.shards  # reported in order, as written
    assert all(r.size == (three.path / r.info.file).stat().st_size for r in reports)


def test_irregular_source_shards_are_recut_into_the_output_shard_size(h, tmp_path):
    """Shards of 100, 40 and 100 rows (as an append may leave a set): output shards of 100, 100 and 40 rows, the
    middle one read from two source shards, in row order."""
    regular = make_set(tmp_path / "v1", n=240, shard_rows=100)  # part-00000: 100, part-00001: 100, part-00002: 40
    first, second, last = regular.manifest.shards
    irregular = regular.manifest.model_copy(update={"shards": [first, last, second]})
    (regular.path / MANIFEST).write_bytes(manifest_bytes(irregular))
    source = EmbeddingSet.open(regular.path, verify=True)
    assert [s.rows for s in source.manifest.shards] == [100, 40, 100]

    upgraded = upgrade_set(source.path, chain(h), tmp_path / "v3", batch_rows=30, workers=1)
    assert [s.rows for s in upgraded.manifest.shards] == [100, 100, 40]
    # batches never span two source pieces, so threads splitting them write the same bytes
    assert digests(upgrade_set(source.path, chain(h), tmp_path / "v3-3", batch_rows=30, workers=3).path) == \
        digests(upgraded.path)
    got, want = upgraded.read(), source.read()
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.side_info, want.side_info)
    np.testing.assert_allclose(got.embeddings, by_hand(h, ["h1", "h2"], want), atol=1e-4)


def test_a_corrupted_source_shard_is_caught_while_reading_and_nothing_is_written(h, tmp_path):
    source = make_set(tmp_path / "v1", n=300, shard_rows=128)
    shard = source.path / "part-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(EmbeddingSetError, match=r"shard .*part-00002\.parquet blake3 does not match the manifest"):
        upgrade_set(source.path, chain(h), tmp_path / "v3", workers=2)
    assert not (tmp_path / "v3").exists() and leftovers(tmp_path) == []


def test_a_normalized_source_needs_unit_outputs(h, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    batch = EmbeddingBatch(np.arange(50), np.zeros(50, np.int64), x / np.linalg.norm(x, axis=1, keepdims=True),
                           rng.normal(size=(50, 3)).astype(np.float32), model=V1)
    source = write_embedding_set(tmp_path / "v1", batch, V1, step(h, "h1", V1, V2).side_info, "cosine", True)
    with pytest.raises(EmbeddingSetError, match="normalized=True but an embedding has L2 norm"):
        upgrade_set(source.path, chain(h), tmp_path / "v3")
    assert not (tmp_path / "v3").exists() and leftovers(tmp_path) == []


BAD_OPTIONS = {
    "no workers": ({"workers": 0}, r"workers must be an integer >= 1, got 0"),
    "fractional workers": ({"workers": 1.5}, r"workers must be an integer >= 1, got 1\.5"),
    "no cpus": ({"engine": "ray", "worker_cpus": 0}, r"worker_cpus must be a number > 0, got 0"),
    "nan cpus": ({"engine": "ray", "worker_cpus": float("nan")}, r"worker_cpus must be a number > 0, got nan"),
    "no memory": ({"engine": "ray", "worker_memory": 0}, r"worker_memory must be a number of bytes >= 1, got 0"),
    "cpus for local": ({"worker_cpus": 2}, r"worker_cpus and worker_memory are Ray resources; they need engine "
                                           r"'ray', got 'local'"),
    "batch rows": ({"batch_rows": 2.5}, r"batch_rows must be an integer >= 1, got 2\.5"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_engine_options_are_refused_before_anything_runs(h, tmp_path, case):
    options, message = BAD_OPTIONS[case]
    source = make_set(tmp_path / "v1", n=20)
    with pytest.raises(UpgradeError, match=message) as info:
        upgrade_set(source.path, chain(h), tmp_path / "v3", **options)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "v3").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(("threads", "cpus", "expected"), [(1, 2, None), (2, 2, 1), (3, 2, 1), (2, 16, 8), (3, 16, 5)])
def test_engine_threads_share_the_cores_among_their_sessions(threads, cpus, expected):
    assert session_threads(threads, cpus) == expected
