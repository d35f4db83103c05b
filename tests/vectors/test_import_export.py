"""Importing stored vectors (Parquet, npy) into embedding sets and exporting sets back out: round trips, streaming
and the one-line errors of bad inputs, which leave no set behind."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from batch_checks import assert_batches_equal

from fct_registry.core.errors import DataError, EmbeddingSetError
from fct_registry.core.refs import ModelRef
from fct_registry.vectors.batch import EmbeddingBatch, concat_batches, with_model
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.exporting import export_set
from fct_registry.vectors.importing import Columns, NpySource, ParquetSource, open_source
from fct_registry.vectors.set_writer import write_embedding_set

V1 = ModelRef(label="v1", sha256=hashlib.sha256(b"model v1").hexdigest())
S1 = ModelRef(label="s1", sha256=hashlib.sha256(b"side model").hexdigest())
N, D, D_SIDE = 23, 5, 3
FLOAT32 = pa.float32()


def gallery(n: int = N, seed: int = 0) -> EmbeddingBatch:
    rng = np.random.default_rng(seed)
    return EmbeddingBatch(ids=np.arange(n, dtype=np.int64) * 7 + 100, labels=np.arange(n, dtype=np.int64) % 4 - 1,
                          embeddings=rng.normal(size=(n, D)).astype(np.float32),
                          side_info=rng.normal(size=(n, D_SIDE)).astype(np.float32), model=V1)


def write_parquet(path: Path, batch: EmbeddingBatch, names: dict[str, str] | None = None, fixed: bool = True,
                  vector_type: pa.DataType = FLOAT32) -> Path:
    """A user's Parquet gallery: fixed_size_list (``fixed``) or variable list vector columns."""
    names = {"item_id": "item_id", "label": "label", "embedding": "embedding", "side_info": "side_info",
             **(names or {})}

    def vectors(matrix: np.ndarray) -> pa.Array:
        values = pa.array(matrix.reshape(-1), type=vector_type)
        if fixed:
            return pa.FixedSizeListArray.from_arrays(values, matrix.shape[1])
        offsets = pa.array(np.arange(0, matrix.size + 1, matrix.shape[1], dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, values)

    columns = {names["item_id"]: pa.array(batch.ids), names["label"]: pa.array(batch.labels),
               names["embedding"]: vectors(batch.embeddings), names["side_info"]: vectors(batch.side_info)}
    pq.write_table(pa.table(columns), path, row_group_size=7)
    return path


def write_npy(folder: Path, batch: EmbeddingBatch, **overrides: np.ndarray) -> Path:
    """A user's npy gallery with the default file names (``item_id.npy``, ``embedding.npy``, ...)."""
    folder.mkdir()
    arrays = {"item_id": batch.ids, "label": batch.labels, "embedding": batch.embeddings,
              "side_info": batch.side_info, **overrides}
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)
    return folder




def import_into(path: Path, source, rows: int = 4) -> EmbeddingSet:
    side = S1 if source.side_info_dim is not None else None
    batches = (with_model(batch, V1) for batch in source.iter_batches(rows))  # the importer knows no model
    return write_embedding_set(path, batches, V1, side, lineage=[f"imported from {source.path}"])


def left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----- round trips ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed_size_list", "list"])
def test_parquet_import_with_custom_columns_stores_the_values(tmp_path, fixed):
    want = gallery()
    path = write_parquet(tmp_path / "g.parquet", want, {"item_id": "pk", "embedding": "vec", "side_info": "aux",
                                                        "label": "cls"}, fixed=fixed, vector_type=pa.float64())
    source = ParquetSource(path, Columns("pk", "vec", "aux", "cls"))
    assert (source.count, source.dim, source.side_info_dim) == (N, D, D_SIDE)
    stored = import_into(tmp_path / "sets" / "g", source)
    assert_batches_equal(EmbeddingSet.open(stored.path).read(), want)
    assert stored.manifest.lineage == [f"imported from {path}"]


def test_labels_are_optional_and_side_info_is_read_only_when_asked(tmp_path):
    want = gallery()
    table = pq.read_table(write_parquet(tmp_path / "g.parquet", want)).drop_columns(["label"])
    pq.write_table(table, tmp_path / "nolabel.parquet")
    source = ParquetSource(tmp_path / "nolabel.parquet")
    assert source.side_info_dim is None and source.columns.label is None
    (batch,) = list(source.iter_batches(100))
    np.testing.assert_array_equal(batch.labels, np.full(N, -1))
    assert batch.side_info is None
    np.testing.assert_array_equal(batch.embeddings, want.embeddings)


@pytest.mark.parametrize("rows", [1, 4, 7, 100])
def test_streaming_in_small_batches_equals_reading_whole(tmp_path, rows):
    want = gallery()
    parquet = ParquetSource(write_parquet(tmp_path / "g.parquet", want), Columns(side_info="side_info"))
    npy = NpySource(write_npy(tmp_path / "npy", want), Columns(side_info="side_info"))
    for source in (parquet, npy):
        batches = list(source.iter_batches(rows))
        assert [len(b) for b in batches][:-1] == [rows] * (len(batches) - 1) and max(map(len, batches)) <= rows
        assert_batches_equal(concat_batches(batches), want)


def test_npy_import_memory_maps_and_converts_dtypes(tmp_path):
    want = gallery()
    folder = write_npy(tmp_path / "npy", want, item_id=want.ids.astype(np.int32),
                       embedding=want.embeddings.astype(np.float64))
    source = open_source(folder, Columns(side_info="side_info"))
    assert isinstance(source, NpySource) and source._embeddings.dtype == np.float64
    assert isinstance(source._embeddings, np.memmap)
    stored = import_into(tmp_path / "sets" / "g", source, rows=5)
    assert_batches_equal(stored.read(), want)


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_export_then_import_round_trips_and_leaves_the_set_untouched(tmp_path, fmt):
    want = gallery()
    stored = write_embedding_set(tmp_path / "sets" / "g", want, V1, S1, shard_rows=10)
    before = {p.name: p.read_bytes() for p in stored.path.iterdir()}
    done = []
    result = export_set(stored, tmp_path / "out" / f"g.{fmt}", fmt, rows=4, progress=done.append)
    assert done == [4, 8, 10, 14, 18, 20, 23]  # batches never cross a shard
    assert result.count == N and {p.name: p.read_bytes() for p in stored.path.iterdir()} == before
    assert left_in(tmp_path / "out") == [f"g.{fmt}"]
    if fmt == "npy":
        assert result.files == ("embeddings.npy", "ids.npy", "labels.npy", "side_info.npy")
        assert np.load(result.path / "embeddings.npy").dtype == np.float32
    else:
        schema = pq.read_schema(result.path)
        assert schema.names == ["item_id", "label", "embedding", "side_info"]
        assert schema.field("embedding").type == pa.list_(pa.float32(), D)
        assert pq.ParquetFile(result.path).metadata.num_row_groups == 7
    back = open_source(result.path, Columns(side_info="side_info"))
    assert_batches_equal(concat_batches(list(back.iter_batches(6))), want)


def test_export_refuses_to_overwrite_unless_asked_and_then_replaces(tmp_path):
    stored = write_embedding_set(tmp_path / "sets" / "g", gallery(), V1, S1)
    out = tmp_path / "g.parquet"
    out.write_bytes(b"old")
    with pytest.raises(EmbeddingSetError, match="already exists; pass overwrite"):
        export_set(stored, out, "parquet")
    assert out.read_bytes() == b"old"
    export_set(stored, out, "parquet", overwrite=True)
    assert pq.read_metadata(out).num_rows == N and left_in(tmp_path) == ["g.parquet", "sets"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(EmbeddingSetError, match=r"holds files other than an npy export \(notes.txt\)"):
        export_set(stored, tmp_path / "mine", "npy", overwrite=True)
    assert left_in(tmp_path / "mine") == ["notes.txt"]


def test_a_failed_export_leaves_nothing(tmp_path):
    stored = write_embedding_set(tmp_path / "sets" / "g", gallery(), V1, S1, shard_rows=10)
    stored.shard_paths[1].unlink()  # the second shard is missing: fails mid-stream
    for fmt in ("parquet", "npy"):
        with pytest.raises((EmbeddingSetError, OSError)):
            export_set(stored, tmp_path / "out" / "g", fmt, rows=4)
        assert left_in(tmp_path / "out") == []


# ----- bad inputs: one line naming the row and column; no set left ----------------------------------------------


def _bad_parquet(tmp_path: Path, case: str) -> Path:
    batch = gallery()
    if case == "nan":
        batch.embeddings[17, 2] = np.nan
    if case == "inf side":
        batch.side_info[9, 0] = np.inf
    if case == "duplicate":
        batch.ids[20] = batch.ids[3]
    path = write_parquet(tmp_path / "g.parquet", batch, fixed=case != "ragged")
    if case == "ragged":
        table = pq.read_table(path)
        rows = table.column("embedding").to_pylist()
        rows[12] = rows[12][:-1]
        pq.write_table(table.set_column(2, "embedding", pa.array(rows, pa.list_(pa.float32()))), path)
    if case == "null id":
        table = pq.read_table(path)
        ids = table.column("item_id").to_pylist()
        ids[15] = None
        pq.write_table(table.set_column(0, "item_id", pa.array(ids, pa.int64())), path)
    return path


BAD_PARQUET = {
    "nan": "row 17 (item_id 219) of {path} (parquet): column 'embedding' holds NaN or inf",
    "inf side": "row 9 (item_id 163) of {path} (parquet): column 'side_info' holds NaN or inf",
    "duplicate": "duplicate item_id 121 in {path} (parquet): rows 3 and 20 (column 'item_id')",
    "ragged": "row 12 (item_id 184) of {path} (parquet): column 'embedding' holds a 4-d vector; the others are 5-d",
    "null id": "row 15 of {path} (parquet): column 'item_id' is null",
}


@pytest.mark.parametrize("case", BAD_PARQUET)
def test_bad_parquet_rows_fail_in_one_line_and_leave_no_set(tmp_path, case):
    path = _bad_parquet(tmp_path, case)
    source = ParquetSource(path, Columns(side_info="side_info"))
    with pytest.raises(DataError) as caught:
        import_into(tmp_path / "sets" / "g", source, rows=4)
    assert str(caught.value) == BAD_PARQUET[case].format(path=path)
    assert "\n" not in str(caught.value)
    assert left_in(tmp_path / "sets") == []


def test_a_missing_column_is_named_with_the_columns_present(tmp_path):
    path = write_parquet(tmp_path / "g.parquet", gallery())
    with pytest.raises(DataError, match=r"has no column 'vec'; columns present: item_id, label, embedding, "
                                        r"side_info$"):
        ParquetSource(path, Columns(embedding="vec"))
    with pytest.raises(DataError, match="has no column 'cls'"):
        ParquetSource(path, Columns(label="cls"))
    pq.write_table(pa.table({"item_id": pa.array([1.5]), "embedding": pa.array([[1.0]])}), tmp_path / "f.parquet")
    with pytest.raises(DataError, match="column 'item_id' of .* must hold integers, got double"):
        ParquetSource(tmp_path / "f.parquet")


def test_bad_npy_inputs_fail_in_one_line_and_leave_no_set(tmp_path):
    want = gallery()
    embeddings = want.embeddings.copy()
    embeddings[5, 1] = np.inf
    source = NpySource(write_npy(tmp_path / "inf", want, embedding=embeddings))
    with pytest.raises(DataError, match=r"^row 5 \(item_id 135\) of .*inf \(npy\): column 'embedding' "
                                        r"\(embedding.npy\) holds NaN or inf$"):
        import_into(tmp_path / "sets" / "g", source)
    ids = want.ids.copy()
    ids[22] = ids[0]
    source = NpySource(write_npy(tmp_path / "dup", want, item_id=ids))
    with pytest.raises(DataError, match=r"^duplicate item_id 100 in .*dup \(npy\): rows 0 and 22"):
        import_into(tmp_path / "sets" / "g", source)
    assert left_in(tmp_path / "sets") == []
    with pytest.raises(DataError, match=r"has no vec.npy; .npy files present: embedding.npy, item_id.npy, "
                                        r"label.npy, side_info.npy$"):
        NpySource(tmp_path / "dup", Columns(embedding="vec"))
    with pytest.raises(DataError, match=r"label.npy has 22 rows but .*item_id.npy has 23"):
        NpySource(write_npy(tmp_path / "short", want, label=want.labels[:-1]))
    with pytest.raises(DataError, match=r"embedding.npy must hold numbers \(n, d\), got float32 \(23,\)"):
        NpySource(write_npy(tmp_path / "flat", want, embedding=want.embeddings[:, 0]))
    with pytest.raises(DataError, match="neither a .parquet file nor a folder"):
        open_source(tmp_path / "nothing.csv")
