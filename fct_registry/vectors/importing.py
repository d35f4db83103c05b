"""Reading gallery vectors that a user already stores (Parquet or ``.npy``), streamed and checked, as batches.

Two layouts, read with bounded memory (one batch of ``rows`` items at a time):

- **Parquet** (a ``.parquet`` file, read with ``ParquetFile.iter_batches``): one row per item; an integer item-id
  column, a vector column (``list``, ``large_list`` or ``fixed_size_list`` of numbers), optionally a side-info
  vector column (FCT side-information: Ramanujan et al., CVPR 2022, arXiv 2112.02805, Sec. 3.2) and an integer
  label column. Default column names are those :mod:`fct_registry.vectors.exporting` writes: ``item_id``,
  ``embedding``, ``side_info``, ``label``.
- **npy** (a folder of ``.npy`` files, memory-mapped with ``np.load(mmap_mode="r")``): one file per column, named
  ``<column>.npy``: ``item_id.npy`` (n,) integers, ``embedding.npy`` (n, d) numbers, ``side_info.npy`` (n, d_side)
  numbers, ``label.npy`` (n,) integers. For the default names the files that ``sets export --format npy`` writes
  are accepted too (:data:`NPY_ALIASES`: ``ids.npy``, ``embeddings.npy``, ``labels.npy``).

Labels are optional: without a label column (or file) every label is -1 (unknown). Every batch is checked before it
is yielded, so a writer consuming the stream stops at the first bad row: every vector has the declared width and
finite values (the error names the row, its item id and the column), ids and labels have no nulls, and item ids are
unique (checked when the stream ends, before a writer could finish).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fct_registry.core.errors import DataError
from fct_registry.vectors.batch import EmbeddingBatch

NPY_ALIASES = {"item_id": "ids", "embedding": "embeddings", "label": "labels"}
"""Default column -> the file stem ``sets export --format npy`` writes, accepted when ``<column>.npy`` is absent."""


@dataclass(frozen=True)
class Columns:
    """Names of the columns (Parquet) or file stems (npy folder) to read.

    Attributes:
        item_id: Integer item ids (n,), unique.
        embedding: Vectors (n, d).
        side_info: Side-information vectors (n, d_side), or None to read none.
        label: Integer labels (n,); None: ``label`` when the source has it, else every label is -1.
    """

    item_id: str = "item_id"
    embedding: str = "embedding"
    side_info: str | None = None
    label: str | None = None


def _null_row(array: pa.Array) -> int | None:
    if array.null_count == 0:
        return None
    return int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])


def _ids_for_message(ids: np.ndarray, row: int) -> str:
    return f"item_id {int(ids[row])}" if row < len(ids) else "unknown item_id"


class VectorSource:
    """A stream of stored vectors with a known count and widths (use :func:`open_source`).

    Attributes:
        path: The Parquet file or the npy folder.
        columns: The columns read.
        count: n, the number of items.
        dim: d, the width of every vector.
        side_info_dim: d_side, or None without side-information.
    """

    kind = ""
    path: Path
    columns: Columns
    count: int
    dim: int
    side_info_dim: int | None

    def _raw_batches(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray, object, object]]:
        raise NotImplementedError

    def __str__(self) -> str:
        return f"{self.path} ({self.kind})"

    def iter_batches(self, rows: int = 65536) -> Iterator[EmbeddingBatch]:
        """Yield the items in stored order as checked batches of at most ``rows`` items.

        Yields:
            EmbeddingBatch: ids (n,) int64, labels (n,) int64 (-1 without labels), embeddings (n, d) float32,
            side_info (n, d_side) float32 or None.

        Raises:
            DataError: ``rows`` < 1; a null id, label or vector, a vector of another width, a NaN or inf value
                (naming the row, its item id and the column); duplicate item ids (naming the id and both rows).
        """
        if rows < 1:
            raise DataError(f"rows must be >= 1, got {rows}")
        start, seen = 0, []
        for ids, labels, embeddings, side_info in self._raw_batches(rows):
            embeddings = self._vectors(embeddings, self.columns.embedding, self.dim, start, ids)
            if side_info is not None:
                side_info = self._vectors(side_info, self.columns.side_info, self.side_info_dim, start, ids)
            seen.append(ids)
            yield EmbeddingBatch(ids, labels, embeddings, side_info)
            start += len(ids)
        _check_unique_ids(seen, self)

    def _vectors(self, raw: object, column: str, width: int, start: int, ids: np.ndarray) -> np.ndarray:
        matrix = self._matrix(raw, column, width, start, ids)
        finite = np.isfinite(matrix).all(axis=1)
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            raise DataError(f"row {start + row} ({_ids_for_message(ids, row)}) of {self}: "
                            f"{self._column(column)} holds NaN or inf")
        return matrix

    def _matrix(self, raw: object, column: str, width: int, start: int, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _column(self, column: str) -> str:
        return f"column {column!r}"


def _check_unique_ids(id_arrays: list[np.ndarray], source: VectorSource) -> None:
    ids = np.concatenate(id_arrays) if id_arrays else np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if len(dup):
        first, second = int(order[dup[0]]), int(order[dup[0] + 1])  # stable sort: rows in stored order
        raise DataError(f"duplicate item_id {int(sorted_ids[dup[0]])} in {source}: rows {first} and {second} "
                        f"({source._column(source.columns.item_id)})")


# ----- Parquet ------------------------------------------------------------------------------------------------


def _is_vector_type(kind: pa.DataType) -> bool:
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    return is_list and (pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type))


class ParquetSource(VectorSource):
    """Items of one Parquet file, one row each (see the module docstring)."""

    kind = "parquet"

    def __init__(self, path: str | os.PathLike, columns: Columns = Columns()) -> None:
        """Open ``path`` and check its columns and widths (reads the schema and the first row only).

        Raises:
            DataError: the file is missing or not Parquet, a column is missing (the message lists those present),
                has the wrong type, or the file has no rows.
        """
        self.path = Path(path)
        try:
            parquet = pq.ParquetFile(self.path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"cannot read Parquet file {self.path}: {exc}") from None
        schema = parquet.schema_arrow
        present = schema.names
        if columns.label is None:
            columns = Columns(columns.item_id, columns.embedding, columns.side_info,
                              "label" if "label" in present else None)
        self.columns = columns
        wanted = [c for c in (columns.item_id, columns.embedding, columns.side_info, columns.label) if c is not None]
        for name in wanted:
            if name not in present:
                raise DataError(f"{self.path} has no column {name!r}; columns present: {', '.join(present)}")
        for name in (columns.item_id, columns.label):
            if name is not None and not pa.types.is_integer(schema.field(name).type):
                raise DataError(f"column {name!r} of {self.path} must hold integers, got {schema.field(name).type}")
        for name in (columns.embedding, columns.side_info):
            if name is not None and not _is_vector_type(schema.field(name).type):
                raise DataError(f"column {name!r} of {self.path} must hold vectors (a list or fixed_size_list of "
                                f"numbers), got {schema.field(name).type}")
        self._wanted = list(dict.fromkeys(wanted))
        self.count = parquet.metadata.num_rows
        if self.count == 0:
            raise DataError(f"{self.path} has no rows")
        first = next(parquet.iter_batches(batch_size=1, columns=self._wanted))
        self.dim = self._width(first.column(columns.embedding), columns.embedding)
        self.side_info_dim = (None if columns.side_info is None
                              else self._width(first.column(columns.side_info), columns.side_info))
        parquet.close()

    def _width(self, column: pa.Array, name: str) -> int:
        if pa.types.is_fixed_size_list(column.type):
            width = column.type.list_size
        elif column.is_valid().to_pylist()[0]:
            width = len(column[0].values)
        else:
            raise DataError(f"row 0 of {self}: column {name!r} is null")
        if width < 1:
            raise DataError(f"column {name!r} of {self} holds empty vectors")
        return width

    def _raw_batches(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray, object, object]]:
        columns, start = self.columns, 0
        with pq.ParquetFile(self.path) as parquet:
            for record_batch in parquet.iter_batches(batch_size=rows, columns=self._wanted):
                id_column = record_batch.column(columns.item_id)
                null = _null_row(id_column)
                if null is not None:
                    raise DataError(f"row {start + null} of {self}: column {columns.item_id!r} is null")
                ids = id_column.to_numpy().astype(np.int64)
                labels = np.full(len(ids), -1, np.int64)
                if columns.label is not None:
                    label_column = record_batch.column(columns.label)
                    null = _null_row(label_column)
                    if null is not None:
                        raise DataError(f"row {start + null} ({_ids_for_message(ids, null)}) of {self}: column "
                                        f"{columns.label!r} is null")
                    labels = label_column.to_numpy().astype(np.int64)
                side = None if columns.side_info is None else record_batch.column(columns.side_info)
                yield ids, labels, record_batch.column(columns.embedding), side
                start += len(ids)

    def _matrix(self, raw: object, column: str, width: int, start: int, ids: np.ndarray) -> np.ndarray:
        array: pa.Array = raw
        null = _null_row(array)
        if null is not None:
            raise DataError(f"row {start + null} ({_ids_for_message(ids, null)}) of {self}: column {column!r} is "
                            "null")
        if not pa.types.is_fixed_size_list(array.type):
            lengths = array.value_lengths().to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(lengths != width)
            if len(bad):
                row = int(bad[0])
                raise DataError(f"row {start + row} ({_ids_for_message(ids, row)}) of {self}: column {column!r} "
                                f"holds a {int(lengths[row])}-d vector; the others are {width}-d")
        values = array.flatten()
        if values.null_count:
            row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]) // width
            raise DataError(f"row {start + row} ({_ids_for_message(ids, row)}) of {self}: column {column!r} holds "
                            "a null value")
        return np.ascontiguousarray(values.to_numpy(zero_copy_only=False).reshape(-1, width), dtype=np.float32)


# ----- npy ----------------------------------------------------------------------------------------------------


class NpySource(VectorSource):
    """Items of a folder of ``.npy`` files, memory-mapped (see the module docstring)."""

    kind = "npy"

    def __init__(self, path: str | os.PathLike, columns: Columns = Columns()) -> None:
        """Memory-map the folder's files and check their dtypes and shapes (reads only the headers).

        Raises:
            DataError: the folder or a file is missing (the message lists the ``.npy`` files present), a file is
                not a plain numeric ``.npy`` array, or the shapes disagree.
        """
        self.path = Path(path)
        present = sorted(p.stem for p in self.path.glob("*.npy"))
        label = columns.label
        if label is None:
            label = next((n for n in ("label", "labels") if n in present), None)
        self.columns = Columns(columns.item_id, columns.embedding, columns.side_info, label)
        self._ids = self._load(columns.item_id, present, 1, ("i", "u"))
        self._labels = None if label is None else self._load(label, present, 1, ("i", "u"))
        self._embeddings = self._load(columns.embedding, present, 2, ("i", "u", "f"))
        self._side = None if columns.side_info is None else self._load(columns.side_info, present, 2,
                                                                         ("i", "u", "f"))
        self.count = len(self._ids)
        arrays = {columns.item_id: self._ids, label: self._labels, columns.embedding: self._embeddings,
                  columns.side_info: self._side}
        for name, array in arrays.items():
            if array is not None and len(array) != self.count:
                raise DataError(f"{self._file(name)} has {len(array)} rows but {self._file(columns.item_id)} has "
                                f"{self.count}")
        if self.count == 0:
            raise DataError(f"{self._file(columns.item_id)} has no rows")
        self.dim = self._embeddings.shape[1]
        self.side_info_dim = None if self._side is None else self._side.shape[1]
        for name, width in ((columns.embedding, self.dim), (columns.side_info, self.side_info_dim)):
            if width == 0:
                raise DataError(f"{self._file(name)} holds empty vectors")

    def _file(self, name: str) -> Path:
        path = self.path / f"{name}.npy"
        alias = NPY_ALIASES.get(name)
        if not path.is_file() and alias is not None and (self.path / f"{alias}.npy").is_file():
            return self.path / f"{alias}.npy"
        return path

    def _load(self, name: str, present: list[str], ndim: int, kinds: tuple[str, ...]) -> np.ndarray:
        path = self._file(name)
        if not self.path.is_dir():
            raise DataError(f"npy folder {self.path} does not exist or is not a folder")
        if not path.is_file():
            raise DataError(f"{self.path} has no {name}.npy; .npy files present: "
                            f"{', '.join(f'{p}.npy' for p in present) or 'none'}")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {path} as a .npy array: {exc}") from None
        if not isinstance(array, np.ndarray) or array.dtype.kind not in kinds or array.ndim != ndim:
            expected = "integers (n,)" if ndim == 1 else "numbers (n, d)"
            raise DataError(f"{path} must hold {expected}, got {array.dtype} {array.shape}")
        return array

    def _raw_batches(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray, object, object]]:
        for start in range(0, self.count, rows):
            stop = min(start + rows, self.count)
            ids = np.array(self._ids[start:stop], dtype=np.int64)
            labels = (np.full(stop - start, -1, np.int64) if self._labels is None
                      else np.array(self._labels[start:stop], dtype=np.int64))
            side = None if self._side is None else self._side[start:stop]
            yield ids, labels, self._embeddings[start:stop], side

    def _matrix(self, raw: object, column: str, width: int, start: int, ids: np.ndarray) -> np.ndarray:
        return np.array(raw, dtype=np.float32, order="C")

    def _column(self, column: str) -> str:
        return f"column {column!r} ({self._file(column).name})"


def open_source(path: str | os.PathLike, columns: Columns = Columns()) -> VectorSource:
    """Open stored vectors: a ``.parquet`` file as :class:`ParquetSource`, a folder as :class:`NpySource`.

    Raises:
        DataError: ``path`` is neither, or the source is invalid (see the two classes).
    """
    path = Path(path)
    if path.is_dir():
        return NpySource(path, columns)
    if path.is_file() and path.suffix.lower() in (".parquet", ".pq"):
        return ParquetSource(path, columns)
    raise DataError(f"{path} is neither a .parquet file nor a folder of .npy files")
