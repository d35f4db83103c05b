"""Writing a stored embedding set out for a vector database: one Parquet file or a folder of ``.npy`` files.

Both are streamed from the set (memory bounded by one batch of ``rows`` items), written beside the destination under
a ``.tmp-`` name and renamed into place, so a failed or killed export leaves no partial output; the set itself is only
read.

- **parquet**: one file, columns ``item_id`` int64, ``label`` int64 (-1 = unknown), ``embedding``
  fixed_size_list<float32>[d] and, when the set has side-information, ``side_info`` fixed_size_list<float32>[d_side];
  one row group per batch.
- **npy**: a folder with ``ids.npy`` (n,) int64, ``labels.npy`` (n,) int64, ``embeddings.npy`` (n, d) float32 and,
  with side-information, ``side_info.npy`` (n, d_side) float32, rows in the set's order.

Both layouts are read back by :func:`fct_registry.vectors.importing.open_source` with its default columns.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fct_registry.core.errors import EmbeddingSetError
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.set_writer import remove_path, swap_in

NPY_FILES = ("ids.npy", "labels.npy", "embeddings.npy", "side_info.npy")
Format = Literal["parquet", "npy"]


@dataclass(frozen=True)
class Export:
    """A finished export: where it is, its layout, how many items and which files."""

    path: Path
    format: Format
    count: int
    files: tuple[str, ...]


def _schema(embedding_set: EmbeddingSet) -> pa.Schema:
    m = embedding_set.manifest
    fields = [pa.field("item_id", pa.int64(), nullable=False), pa.field("label", pa.int64(), nullable=False),
              pa.field("embedding", pa.list_(pa.float32(), m.dim), nullable=False)]
    if m.side_info_dim is not None:
        fields.append(pa.field("side_info", pa.list_(pa.float32(), m.side_info_dim), nullable=False))
    return pa.schema(fields)


def _fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def _write_parquet(embedding_set: EmbeddingSet, tmp: Path, rows: int, progress: Callable[[int], None]) -> None:
    schema = _schema(embedding_set)
    done = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for batch in embedding_set.iter_batches(rows):
            columns = [pa.array(batch.ids), pa.array(batch.labels), _fixed_list(batch.embeddings)]
            if batch.side_info is not None:
                columns.append(_fixed_list(batch.side_info))
            writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
            done += len(batch)
            progress(done)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())


def _write_npy(embedding_set: EmbeddingSet, tmp: Path, rows: int, progress: Callable[[int], None]) -> None:
    m = embedding_set.manifest
    tmp.mkdir()
    shapes = {"ids.npy": ((m.count,), np.int64), "labels.npy": ((m.count,), np.int64),
              "embeddings.npy": ((m.count, m.dim), np.float32)}
    if m.side_info_dim is not None:
        shapes["side_info.npy"] = ((m.count, m.side_info_dim), np.float32)
    arrays = {name: np.lib.format.open_memmap(tmp / name, mode="w+", dtype=dtype, shape=shape)
              for name, (shape, dtype) in shapes.items()}
    start = 0
    for batch in embedding_set.iter_batches(rows):
        stop = start + len(batch)
        if stop > m.count:
            raise EmbeddingSetError(f"{embedding_set.path} holds more rows than its manifest count {m.count}")
        for name, values in (("ids.npy", batch.ids), ("labels.npy", batch.labels),
                             ("embeddings.npy", batch.embeddings), ("side_info.npy", batch.side_info)):
            if name in arrays:
                arrays[name][start:stop] = values
        start = stop
        progress(start)
    if start != m.count:
        raise EmbeddingSetError(f"{embedding_set.path} holds {start} rows, its manifest count is {m.count}")
    for array in arrays.values():
        array.flush()
    del arrays


def _replaceable(out: Path, format: Format) -> None:
    if out.is_dir() and format == "npy":
        others = sorted(p.name for p in out.iterdir() if p.name not in NPY_FILES)
        if others:
            raise EmbeddingSetError(f"refusing to overwrite {out}: it holds files other than an npy export "
                                    f"({', '.join(others[:3])})")
    elif out.is_dir() or (format == "npy" and out.exists()):
        raise EmbeddingSetError(f"refusing to overwrite {out} with a {format} export: it is a "
                                f"{'folder' if out.is_dir() else 'file'}")


def export_set(embedding_set: EmbeddingSet, out: str | os.PathLike, format: Format, rows: int = 65536,
               overwrite: bool = False, progress: Callable[[int], None] | None = None) -> Export:
    """Write ``embedding_set`` to ``out`` as one Parquet file or a folder of ``.npy`` files (module docstring).

    Args:
        embedding_set: the set to export (read only).
        out: the Parquet file or npy folder to create; its parent folders are created.
        format: ``parquet`` or ``npy``.
        rows: items per batch read from the set (bounds memory) and per Parquet row group.
        overwrite: replace an existing export at ``out`` (an npy folder only when it holds nothing but npy-export
            files); the old one is swapped out only once the new one is complete.
        progress: called with the number of items written after each batch.

    Returns:
        The written export.

    Raises:
        EmbeddingSetError: bad ``format`` or ``rows``, ``out`` exists (without ``overwrite``, or it is not an
            export of that format), or the set's shards disagree with its manifest.
    """
    out = Path(out)
    if format not in ("parquet", "npy"):
        raise EmbeddingSetError(f"format must be 'parquet' or 'npy', got {format!r}")
    if rows < 1:
        raise EmbeddingSetError(f"rows must be >= 1, got {rows}")
    if out.exists() and not overwrite:
        raise EmbeddingSetError(f"{out} already exists; pass overwrite to replace it")
    if out.exists():
        _replaceable(out, format)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}.new-{uuid.uuid4().hex}"
    write = _write_parquet if format == "parquet" else _write_npy
    try:
        write(embedding_set, tmp, rows, progress or (lambda _done: None))
        swap_in(tmp, out)
    except BaseException:
        remove_path(tmp)
        raise
    files = (out.name,) if format == "parquet" else tuple(sorted(p.name for p in out.iterdir()))
    return Export(out, format, embedding_set.manifest.count, files)
