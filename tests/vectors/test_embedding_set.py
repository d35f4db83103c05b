"""Tests of the on-disk embedding set (Parquet shards + manifest) and its invariants."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from batch_checks import assert_batches_equal
from factories import tree

from fct_registry.core.errors import EmbeddingSetError, VersionMismatchError
from fct_registry.core.refs import ModelRef
from fct_registry.vectors.batch import EmbeddingBatch, as_float32_matrix, concat_batches
from fct_registry.vectors.embedding_set import EmbeddingSet, SetScan, require_same_model, scan_embedding_sets
from fct_registry.vectors.set_writer import write_embedding_set

V1 = ModelRef(label="v1", sha256=hashlib.sha256(b"model v1").hexdigest())
V2 = ModelRef(label="v2", sha256=hashlib.sha256(b"model v2").hexdigest())
S1 = ModelRef(label="s1", sha256=hashlib.sha256(b"side model").hexdigest())


def make_batch(start: int, n: int, d: int = 4, d_side: int | None = None, seed: int = 0,
               model: ModelRef = V1) -> EmbeddingBatch:
    rng = np.random.default_rng(seed + start)
    side = None if d_side is None else rng.normal(size=(n, d_side)).astype(np.float32)
    return EmbeddingBatch(
        ids=np.arange(start, start + n, dtype=np.int64) * 10,
        labels=np.arange(start, start + n, dtype=np.int64) % 3 - 1,
        embeddings=rng.normal(size=(n, d)).astype(np.float32),
        side_info=side,
        model=model,
    )


def concat(batches: list[EmbeddingBatch]) -> EmbeddingBatch:
    side = None if batches[0].side_info is None else np.concatenate([b.side_info for b in batches])
    return EmbeddingBatch(
        np.concatenate([b.ids for b in batches]),
        np.concatenate([b.labels for b in batches]),
        np.concatenate([b.embeddings for b in batches]),
        side,
    )




def test_model_ref_identity_and_str():
    assert str(V1) == "v1@" + hashlib.sha256(b"model v1").hexdigest()[:12]
    assert ModelRef(label="v1", sha256=V1.sha256) == V1
    assert ModelRef(label="v1b", sha256=V1.sha256) != V1
    assert ModelRef(label="v1", sha256=V2.sha256) != V1
    with pytest.raises(ValueError):
        ModelRef(label="v1", sha256="not-a-sha")


def test_round_trip_with_side_info(tmp_path):
    batches = [make_batch(0, 7, d=5, d_side=3), make_batch(7, 4, d=5, d_side=3)]
    written = write_embedding_set(tmp_path / "gallery", batches, V1, side_info_model=S1, metric="l2",
                                  lineage=["gallery v1 embedded"])
    opened = EmbeddingSet.open(tmp_path / "gallery")
    m = opened.manifest
    assert (m.model, m.side_info_model, m.dim, m.side_info_dim, m.count) == (V1, S1, 5, 3, 11)
    assert (m.metric, m.normalized, m.dtype, m.format_version) == ("l2", False, "float32", 1)
    assert m.lineage == ["gallery v1 embedded"]
    assert written.manifest == m
    assert_batches_equal(opened.read(), concat(batches))


def test_fastfill_columns_round_trip_across_shards_and_plain_manifests_keep_their_bytes(tmp_path):
    """uncertainty (n,) float32 and backfilled (n,) bool survive a write split over shards; the manifest counts the
    backfilled items, and a set without them writes no key for them (its bytes are as before they existed)."""
    batches = [make_batch(0, 7, d_side=3), make_batch(7, 4, d_side=3)]
    for i, batch in enumerate(batches):
        batch.uncertainty = np.linspace(-1, 1, len(batch), dtype=np.float32) + i
        batch.backfilled = np.arange(len(batch)) % 3 == 0
    write_embedding_set(tmp_path / "mixed", batches, V1, side_info_model=S1, shard_rows=5)
    opened = EmbeddingSet.open(tmp_path / "mixed")
    assert (opened.manifest.uncertainty, opened.manifest.backfilled, len(opened.shard_paths)) == (True, 3 + 2, 3)
    want = concat(batches)
    want.uncertainty = np.concatenate([b.uncertainty for b in batches])
    want.backfilled = np.concatenate([b.backfilled for b in batches])
    assert_batches_equal(opened.read(), want)
    assert_batches_equal(concat_batches(list(opened.iter_batches(rows=2))), want)
    write_embedding_set(tmp_path / "plain", make_batch(0, 3), V1)
    text = (tmp_path / "plain" / "manifest.json").read_text()
    assert '"uncertainty"' not in text and '"backfilled"' not in text
    assert (EmbeddingSet.open(tmp_path / "plain").manifest.uncertainty,
            EmbeddingSet.open(tmp_path / "plain").manifest.backfilled) == (False, None)


def test_fastfill_columns_in_some_batches_only_or_non_finite_are_refused(tmp_path):
    with_sigma = make_batch(0, 3)
    with_sigma.uncertainty = np.zeros(3, np.float32)
    with pytest.raises(EmbeddingSetError, match="uncertainty is present in some batches and missing in others"):
        write_embedding_set(tmp_path / "a", [with_sigma, make_batch(3, 2)], V1)
    with_sigma.uncertainty = np.array([0, np.inf, 0], np.float32)
    with pytest.raises(EmbeddingSetError, match="uncertainty of item_id 10 is NaN or inf"):
        write_embedding_set(tmp_path / "b", [with_sigma], V1)
    with pytest.raises(EmbeddingSetError, match="backfilled must be a 1-D bool array"):
        EmbeddingBatch([1], [0], [[0.0]], backfilled=np.array([0.5]))
    with pytest.raises(EmbeddingSetError, match="batch arrays disagree on n: ids 1, uncertainty 2"):
        EmbeddingBatch([1], [0], [[0.0]], uncertainty=[0.0, 1.0])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_multiple_shards_bounded(tmp_path):
    n, shard_rows = 23, 5
    batches = [make_batch(0, 3), make_batch(3, 11), make_batch(14, 1), make_batch(15, 8)]
    s = write_embedding_set(tmp_path / "g", batches, V1, shard_rows=shard_rows)
    parquet = sorted(p.name for p in (tmp_path / "g").glob("*.parquet"))
    assert len(parquet) == math.ceil(n / shard_rows) == 5
    assert [p.name for p in s.shard_paths] == parquet
    assert [sh.rows for sh in s.manifest.shards] == [5, 5, 5, 5, 3]
    assert_batches_equal(EmbeddingSet.open(tmp_path / "g").read(), concat(batches))


def test_iter_batches_bounded_and_complete(tmp_path):
    batches = [make_batch(0, 9, d_side=2), make_batch(9, 8, d_side=2)]
    s = write_embedding_set(tmp_path / "g", batches, V1, side_info_model=S1, shard_rows=6)
    pieces = list(s.iter_batches(4))
    assert all(1 <= len(p) <= 4 for p in pieces)
    assert_batches_equal(concat(pieces), concat(batches))
    with pytest.raises(EmbeddingSetError, match="rows"):
        next(s.iter_batches(0))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected_nothing_written(tmp_path, bad):
    second = make_batch(5, 5)
    second.embeddings[2, 1] = bad
    with pytest.raises(EmbeddingSetError, match="item_id 70"):
        write_embedding_set(tmp_path / "g", [make_batch(0, 5), second], V1, shard_rows=2)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_side_info_rejected(tmp_path):
    batch = make_batch(0, 3, d_side=2)
    batch.side_info[0, 0] = np.nan
    with pytest.raises(EmbeddingSetError, match="side_info"):
        write_embedding_set(tmp_path / "g", batch, V1, side_info_model=S1)
    assert list(tmp_path.iterdir()) == []


def test_duplicate_ids_rejected(tmp_path):
    a, b = make_batch(0, 4), make_batch(4, 4)
    b.ids[3] = a.ids[1]
    with pytest.raises(EmbeddingSetError, match="duplicate item_id 10"):
        write_embedding_set(tmp_path / "g", [a, b], V1, shard_rows=2)
    assert list(tmp_path.iterdir()) == []


def test_dim_change_between_batches_rejected(tmp_path):
    with pytest.raises(EmbeddingSetError, match="from 4 to 6"):
        write_embedding_set(tmp_path / "g", [make_batch(0, 3, d=4), make_batch(3, 3, d=6)], V1)
    assert list(tmp_path.iterdir()) == []


def test_side_info_in_some_batches_only_rejected(tmp_path):
    with pytest.raises(EmbeddingSetError, match="side_info"):
        write_embedding_set(tmp_path / "g", [make_batch(0, 3, d_side=2), make_batch(3, 3)], V1,
                            side_info_model=S1)
    with pytest.raises(EmbeddingSetError, match="side_info_model"):
        write_embedding_set(tmp_path / "g", [make_batch(0, 3, d_side=2)], V1)
    assert list(tmp_path.iterdir()) == []


def test_normalized_flag_checked(tmp_path):
    batch = make_batch(0, 4)
    with pytest.raises(EmbeddingSetError, match="L2 norm"):
        write_embedding_set(tmp_path / "g", batch, V1, metric="cosine", normalized=True)
    batch.embeddings /= np.linalg.norm(batch.embeddings, axis=1, keepdims=True)
    s = write_embedding_set(tmp_path / "g", batch, V1, metric="cosine", normalized=True)
    assert (s.manifest.metric, s.manifest.normalized) == ("cosine", True)


def test_bad_metric_and_empty_rejected(tmp_path):
    with pytest.raises(EmbeddingSetError, match="'l1'"):
        write_embedding_set(tmp_path / "g", make_batch(0, 2), V1, metric="l1")
    with pytest.raises(EmbeddingSetError, match="no rows"):
        write_embedding_set(tmp_path / "g", [], V1)
    assert list(tmp_path.iterdir()) == []


def test_corrupted_shard_detected(tmp_path):
    s = write_embedding_set(tmp_path / "g", [make_batch(0, 10)], V1, shard_rows=4)
    victim = s.shard_paths[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(EmbeddingSetError, match="part-00001.parquet"):
        EmbeddingSet.open(tmp_path / "g")
    EmbeddingSet.open(tmp_path / "g", verify=False)  # manifest alone is still readable
    victim.unlink()
    with pytest.raises(EmbeddingSetError, match="part-00001.parquet"):
        EmbeddingSet.open(tmp_path / "g")


def test_invalid_manifest_rejected(tmp_path):
    s = write_embedding_set(tmp_path / "g", make_batch(0, 3), V1)
    manifest = s.path / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"dim"', '"dimm"'))
    with pytest.raises(EmbeddingSetError, match="manifest.json"):
        EmbeddingSet.open(s.path)
    with pytest.raises(EmbeddingSetError, match="manifest.json"):
        EmbeddingSet.open(tmp_path / "missing")


def test_existing_path_refused_unless_overwrite(tmp_path):
    first, second = make_batch(0, 5), make_batch(100, 3, d=2, model=V2)
    write_embedding_set(tmp_path / "g", first, V1)
    with pytest.raises(EmbeddingSetError, match="already exists"):
        write_embedding_set(tmp_path / "g", second, V2)
    assert_batches_equal(EmbeddingSet.open(tmp_path / "g").read(), first)
    with pytest.raises(EmbeddingSetError, match="dim changed"):  # failed overwrite keeps the old set
        write_embedding_set(tmp_path / "g", [second, make_batch(200, 2, d=3, model=V2)], V2, overwrite=True)
    assert_batches_equal(EmbeddingSet.open(tmp_path / "g").read(), first)
    s = write_embedding_set(tmp_path / "g", second, V2, overwrite=True)
    assert s.manifest.model == V2
    assert_batches_equal(EmbeddingSet.open(tmp_path / "g").read(), second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]
    (tmp_path / "not_a_set").mkdir()
    with pytest.raises(EmbeddingSetError, match="not an embedding set"):
        write_embedding_set(tmp_path / "not_a_set", second, V2, overwrite=True)


def test_overwrite_in_place_while_streaming_from_the_old_set(tmp_path):
    old = write_embedding_set(tmp_path / "g", [make_batch(0, 9)], V1, shard_rows=4)
    want = old.read()
    upgraded = (EmbeddingBatch(b.ids, b.labels, b.embeddings * 2.0, model=V2) for b in old.iter_batches(3))
    new = write_embedding_set(tmp_path / "g", upgraded, V2, lineage=["h v1->v2"], overwrite=True)
    got = EmbeddingSet.open(new.path).read()
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.embeddings, want.embeddings * np.float32(2.0))
    assert (new.manifest.model, new.manifest.lineage) == (V2, ["h v1->v2"])


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from fct_registry.vectors.batch import EmbeddingBatch
    from fct_registry.core.refs import ModelRef
    from fct_registry.vectors.set_writer import write_embedding_set

    def batches():
        for i in range(3):
            yield EmbeddingBatch(np.arange(4) + 4 * i, np.zeros(4, dtype=np.int64), np.ones((4, 2)), model=V1)
        os.kill(os.getpid(), signal.SIGKILL)

    V1 = ModelRef(label="v1", sha256="0" * 64)
    write_embedding_set(sys.argv[1], batches(), V1, shard_rows=4)
""")


def test_interrupted_write_is_invisible_and_cleaned(tmp_path):
    root = tmp_path / "sets"
    write_embedding_set(root / "other", make_batch(0, 2), V1)
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(root / "g")], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    leftovers = [p for p in root.iterdir() if p.name.startswith(".tmp-g.")]
    assert len(leftovers) == 1 and len(list(leftovers[0].glob("*.parquet"))) == 3
    (leftovers[0] / "manifest.json").write_text("{}")  # even a manifest inside a temp dir is ignored
    assert not (root / "g").exists()
    scan = scan_embedding_sets(root)
    assert [s.path.name for s in scan.sets] == ["other"] and scan.invalid == [] and scan.unfinished == leftovers

    batch = make_batch(0, 6)
    write_embedding_set(root / "g", batch, V1)
    assert sorted(p.name for p in root.iterdir()) == ["g", "other"]
    assert [s.path.name for s in scan_embedding_sets(root, verify=True).sets] == ["g", "other"]
    assert_batches_equal(EmbeddingSet.open(root / "g").read(), batch)


def test_list_embedding_sets_nested(tmp_path):
    write_embedding_set(tmp_path / "gallery" / "v2", make_batch(0, 2, model=V2), V2)
    write_embedding_set(tmp_path / "gallery" / "v1", make_batch(0, 2), V1)
    (tmp_path / "empty_dir").mkdir()
    sets = scan_embedding_sets(tmp_path).sets
    assert [(s.path.parent.name, s.path.name, s.manifest.model) for s in sets] == [
        ("gallery", "v1", V1), ("gallery", "v2", V2)]


def test_scan_reports_invalid_sets_and_goes_on(tmp_path):
    write_embedding_set(tmp_path / "good", make_batch(0, 2), V1)
    write_embedding_set(tmp_path / "bad_shard", make_batch(0, 2), V1)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    next((tmp_path / "bad_shard").glob("*.parquet")).write_bytes(b"junk")
    before = tree(tmp_path)

    scan = scan_embedding_sets(tmp_path)
    assert [s.path.name for s in scan.sets] == ["bad_shard", "good"]
    assert [(p.name, "invalid" in reason) for p, reason in scan.invalid] == [("broken", True)]
    verified = scan_embedding_sets(tmp_path, verify=True)
    assert [s.path.name for s in verified.sets] == ["good"]
    assert sorted(p.name for p, _ in verified.invalid) == ["bad_shard", "broken"]
    assert all("\n" not in reason for _, reason in verified.invalid)
    assert tree(tmp_path) == before  # scanning reads only
    assert scan_embedding_sets(tmp_path / "missing") == SetScan([], [], [])


def test_require_same_model():
    require_same_model(V1, ModelRef(label="v1", sha256=V1.sha256))
    with pytest.raises(VersionMismatchError) as info:
        require_same_model(V2, V1)
    assert str(V1) in str(info.value) and str(V2) in str(info.value)
    with pytest.raises(VersionMismatchError, match="v1@"):  # same label, different bytes
        require_same_model(V1, ModelRef(label="v1", sha256=V2.sha256))


def test_batch_validation():
    batch = EmbeddingBatch([1, 2], [0, -1], [[1, 2], [3, 4]])
    assert batch.ids.dtype == np.int64 and batch.embeddings.dtype == np.float32
    with pytest.raises(EmbeddingSetError, match="disagree on n"):
        EmbeddingBatch(np.arange(3), np.zeros(2, dtype=np.int64), np.zeros((3, 2)))
    with pytest.raises(EmbeddingSetError, match="ids"):
        EmbeddingBatch(np.array([0.5, 1.5]), np.zeros(2, dtype=np.int64), np.zeros((2, 2)))
    with pytest.raises(EmbeddingSetError, match=r"embeddings .*\(3,\)"):
        EmbeddingBatch(np.arange(3), np.zeros(3, dtype=np.int64), np.zeros(3))


def test_as_float32_matrix_memmap_and_column_slice(tmp_path):
    file = tmp_path / "x.f64"
    values = np.arange(24, dtype=np.float64).reshape(4, 6) / 7.0
    values.tofile(file)
    before = file.read_bytes()
    mm = np.memmap(file, dtype=np.float64, mode="r", shape=(4, 6))

    out = as_float32_matrix(mm, "x")
    assert type(out) is np.ndarray and out.dtype == np.float32 and out.flags.c_contiguous
    assert out.flags.writeable and not np.shares_memory(out, mm)
    np.testing.assert_array_equal(out, values.astype(np.float32))

    cols = mm[:, 1:5:2]
    assert not cols.flags.c_contiguous
    out_cols = as_float32_matrix(cols, "x")
    assert out_cols.shape == (4, 2) and out_cols.flags.c_contiguous
    np.testing.assert_array_equal(out_cols, values[:, [1, 3]].astype(np.float32))
    out_cols[:] = -1.0
    del mm, cols
    assert file.read_bytes() == before


def test_as_float32_matrix_inputs_and_errors():
    np.testing.assert_array_equal(as_float32_matrix([[1, 2, 3]], "q"), np.array([[1, 2, 3]], np.float32))
    x = np.ones((2, 2), np.float32)
    assert not np.shares_memory(as_float32_matrix(x, "q"), x)
    with pytest.raises(EmbeddingSetError, match=r"query.*\(5,\).*\(1, d\)"):
        as_float32_matrix(np.zeros(5), "query")
    with pytest.raises(EmbeddingSetError, match="query"):
        as_float32_matrix(np.zeros((2, 2, 2)), "query")
    with pytest.raises(EmbeddingSetError, match="query"):
        as_float32_matrix([[1, 2], [3]], "query")
    with pytest.raises(EmbeddingSetError, match="query"):
        as_float32_matrix([["a", "b"]], "query")
    with pytest.raises(VersionMismatchError, match="query"):
        as_float32_matrix(np.zeros(5), "query", error=VersionMismatchError)
