"""On-disk embedding sets: ``<dir>/manifest.json`` plus Parquet shards ``part-00000.parquet``, ..., written atomically.

Shard columns: ``item_id`` int64, ``label`` int64 (-1 = unknown), ``embedding`` fixed_size_list<float32>[d] and
optionally ``side_info`` fixed_size_list<float32>[d_side] (FCT side-information: Ramanujan et al., CVPR 2022,
arXiv 2112.02805, Sec. 3.2). All vectors of a set come from one model version, named by a :class:`ModelRef`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fct_registry.errors import EmbeddingSetError, FctError, VersionMismatchError

MANIFEST = "manifest.json"
_TEMP_SUFFIX = r"\.(new|old)-[0-9a-f]{32}"


class ModelRef(BaseModel):
    """Identity of one model version: the project's logical label plus the sha256 of its ONNX file.

    Two refs are the same model iff ``label`` and ``sha256`` are both equal; ``str(ref)`` is
    ``"<label>@<first 12 hex of sha256>"``, e.g. ``"v1@3f2a9c0d1e4b"``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    label: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    def __str__(self) -> str:
        return f"{self.label}@{self.sha256[:12]}"


class ShardInfo(BaseModel):
    """One Parquet shard of a set: file name inside the set dir, row count, sha256 of the file bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    file: str = Field(pattern=r"^part-\d{5}\.parquet$")
    rows: int = Field(gt=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class EmbeddingSetManifest(BaseModel):
    """Contents of ``manifest.json``: which model made the vectors, their shape, metric and shards."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    format_version: Literal[1] = 1
    model: ModelRef
    side_info_model: ModelRef | None = None
    dim: int = Field(gt=0)
    side_info_dim: int | None = Field(default=None, gt=0)
    dtype: Literal["float32"] = "float32"
    count: int = Field(gt=0)
    metric: Literal["l2", "cosine"]
    normalized: bool
    shards: list[ShardInfo]
    lineage: list[str]


def as_float32_matrix(x: object, name: str, error: type[FctError] = EmbeddingSetError) -> np.ndarray:
    """Copy ``x`` (n, d) into a new writable C-contiguous float32 ndarray (n, d); ``x`` is never modified.

    Accepts nested lists, any real int/float dtype, read-only ``np.memmap`` and non-contiguous views (column
    slices). A single vector must be passed as (1, d). ``name`` is used in messages; ``error`` is the domain
    error class to raise (other modules pass their own, e.g. SearchError).

    Raises:
        FctError (``error``): ``x`` is not 2-D, is ragged or is not real-valued numeric.
    """
    try:
        arr = np.asarray(x)
    except ValueError as exc:
        raise error(f"{name} must be a numeric (n, d) array, got a ragged sequence ({exc})") from None
    if arr.dtype.kind not in "iuf":
        raise error(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise error(f"{name} must be 2-D (n, d), got shape {arr.shape}; pass a single vector as (1, d)")
    return np.array(arr, dtype=np.float32, order="C", copy=True)


def _vector(x: object, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise EmbeddingSetError(f"{name} must be a 1-D integer array (n,), got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64, copy=False)


def _matrix(x: object, name: str) -> np.ndarray:
    if isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2 and x.flags.c_contiguous:
        return x
    return as_float32_matrix(x, name)


@dataclass
class EmbeddingBatch:
    """n items of one model: ids (n,) int64 (unique within a set), labels (n,) int64 (-1 = unknown),
    embeddings (n, d) float32 C-contiguous, side_info (n, d_side) float32 C-contiguous or None.

    Other integer/float dtypes and layouts are converted on construction.

    Raises:
        EmbeddingSetError: wrong ranks or dtypes, or the arrays disagree on n.
    """

    ids: np.ndarray
    labels: np.ndarray
    embeddings: np.ndarray
    side_info: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.ids = _vector(self.ids, "ids")
        self.labels = _vector(self.labels, "labels")
        self.embeddings = _matrix(self.embeddings, "embeddings")
        if self.side_info is not None:
            self.side_info = _matrix(self.side_info, "side_info")
        rows = {"ids": len(self.ids), "labels": len(self.labels), "embeddings": len(self.embeddings)}
        if self.side_info is not None:
            rows["side_info"] = len(self.side_info)
        if len(set(rows.values())) != 1:
            raise EmbeddingSetError(f"batch arrays disagree on n: {rows}")

    def __len__(self) -> int:
        return len(self.ids)


def _concat(batches: list[EmbeddingBatch]) -> EmbeddingBatch:
    side = None if batches[0].side_info is None else np.concatenate([b.side_info for b in batches])
    return EmbeddingBatch(*(np.concatenate([getattr(b, f) for b in batches]) for f in ("ids", "labels",
                                                                                      "embeddings")), side)


def _slice(batch: EmbeddingBatch, start: int, stop: int) -> EmbeddingBatch:
    side = None if batch.side_info is None else batch.side_info[start:stop]
    return EmbeddingBatch(batch.ids[start:stop], batch.labels[start:stop], batch.embeddings[start:stop], side)


def _fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def _shard_bytes(batch: EmbeddingBatch) -> bytes:
    columns = {"item_id": pa.array(batch.ids), "label": pa.array(batch.labels),
               "embedding": _fixed_list(batch.embeddings)}
    if batch.side_info is not None:
        columns["side_info"] = _fixed_list(batch.side_info)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _matrix_from_arrow(column: pa.Array, width: int, name: str) -> np.ndarray:
    if column.type.list_size != width:
        raise EmbeddingSetError(f"column {name} has width {column.type.list_size}, manifest says {width}")
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).copy()


class EmbeddingSet:
    """A stored embedding set (``.path``, ``.manifest``); load with :meth:`open`, create with
    :func:`write_embedding_set`."""

    def __init__(self, path: Path, manifest: EmbeddingSetManifest) -> None:
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> EmbeddingSet:
        """Load the set at ``path``; with ``verify`` check every shard's sha256 and row count.

        Raises:
            EmbeddingSetError: missing or invalid manifest, missing shard, checksum or row-count mismatch.
        """
        path = Path(path)
        try:
            text = (path / MANIFEST).read_text()
        except OSError as exc:
            raise EmbeddingSetError(f"cannot read {path / MANIFEST}: {exc.strerror}") from None
        try:
            manifest = EmbeddingSetManifest.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise EmbeddingSetError(f"invalid {path / MANIFEST}: {first['loc']}: {first['msg']}") from None
        embedding_set = cls(path, manifest)
        if verify:
            embedding_set.verify()
        return embedding_set

    @property
    def shard_paths(self) -> list[Path]:
        """Absolute paths of the shards, in row order."""
        return [self.path / shard.file for shard in self.manifest.shards]

    def verify(self) -> None:
        """Check shard sha256s, per-shard row counts and the total count against the manifest.

        Raises:
            EmbeddingSetError: naming the first shard file that is missing or does not match.
        """
        for shard, file in zip(self.manifest.shards, self.shard_paths, strict=False):
            try:
                digest = _file_sha256(file)
            except OSError as exc:
                raise EmbeddingSetError(f"cannot read shard {file}: {exc.strerror}") from None
            if digest != shard.sha256:
                raise EmbeddingSetError(f"shard {file} sha256 does not match the manifest (corrupted)")
            rows = pq.read_metadata(file).num_rows
            if rows != shard.rows:
                raise EmbeddingSetError(f"shard {file} has {rows} rows, manifest says {shard.rows}")
        total = sum(shard.rows for shard in self.manifest.shards)
        if total != self.manifest.count:
            raise EmbeddingSetError(f"shards of {self.path} hold {total} rows, manifest count is "
                                    f"{self.manifest.count}")

    def _to_batch(self, table: pa.RecordBatch) -> EmbeddingBatch:
        m = self.manifest
        side = None
        if m.side_info_dim is not None:
            side = _matrix_from_arrow(table.column("side_info"), m.side_info_dim, "side_info")
        return EmbeddingBatch(table.column("item_id").to_numpy().copy(), table.column("label").to_numpy().copy(),
                              _matrix_from_arrow(table.column("embedding"), m.dim, "embedding"), side)

    def read(self) -> EmbeddingBatch:
        """Load the whole set: ids (count,), labels (count,), embeddings (count, d) float32, side_info."""
        table = pa.concat_tables(pq.read_table(p) for p in self.shard_paths).combine_chunks()
        return self._to_batch(table.to_batches()[0])

    def iter_batches(self, rows: int = 65536) -> Iterator[EmbeddingBatch]:
        """Yield the set in row order as batches of at most ``rows`` items (memory bounded by ``rows``).

        Raises:
            EmbeddingSetError: ``rows`` < 1.
        """
        if rows < 1:
            raise EmbeddingSetError(f"rows must be >= 1, got {rows}")
        for file in self.shard_paths:
            with pq.ParquetFile(file) as parquet:
                for record_batch in parquet.iter_batches(batch_size=rows):
                    yield self._to_batch(record_batch)


def _temp_dirs(path: Path) -> list[Path]:
    pattern = re.compile(r"\.tmp-" + re.escape(path.name) + _TEMP_SUFFIX)
    return [p for p in path.parent.glob(".tmp-*") if pattern.fullmatch(p.name)]


def _check_batch(batch: EmbeddingBatch, first: EmbeddingBatch, normalized: bool) -> None:
    for name in ("embeddings", "side_info"):
        want, got = getattr(first, name), getattr(batch, name)
        if (want is None) != (got is None):
            raise EmbeddingSetError("side_info is present in some batches and missing in others")
        if got is not None and got.shape[1] != want.shape[1]:
            raise EmbeddingSetError(f"{name} dim changed from {want.shape[1]} to {got.shape[1]} between batches")
        if got is not None and not np.isfinite(got).all():
            bad = int(batch.ids[~np.isfinite(got).all(axis=1)][0])
            raise EmbeddingSetError(f"{name} of item_id {bad} contain NaN or inf")
    if normalized:
        norms = np.linalg.norm(batch.embeddings, axis=1)
        if not np.allclose(norms, 1.0, atol=1e-3):
            worst = norms[np.abs(norms - 1.0).argmax()]
            raise EmbeddingSetError(f"normalized=True but an embedding has L2 norm {worst:.6f}")


def _check_unique(id_arrays: list[np.ndarray]) -> None:
    ids = np.sort(np.concatenate(id_arrays))
    dup = ids[1:][ids[1:] == ids[:-1]]
    if len(dup):
        raise EmbeddingSetError(f"duplicate item_id {int(dup[0])}")


def _write_shards(tmp: Path, batches: Iterable[EmbeddingBatch], normalized: bool,
                  shard_rows: int) -> tuple[EmbeddingBatch, list[ShardInfo], list[np.ndarray]]:
    first, shards, ids, pending, pending_rows = None, [], [], [], 0

    def flush(batch: EmbeddingBatch) -> None:
        data = _shard_bytes(batch)
        file = f"part-{len(shards):05d}.parquet"
        _write_file(tmp / file, data)
        shards.append(ShardInfo(file=file, rows=len(batch), sha256=hashlib.sha256(data).hexdigest()))

    for batch in batches:
        if not isinstance(batch, EmbeddingBatch):
            raise EmbeddingSetError(f"expected EmbeddingBatch items, got {type(batch).__name__}")
        first = batch if first is None else first
        _check_batch(batch, first, normalized)
        ids.append(batch.ids)
        pending.append(batch)
        pending_rows += len(batch)
        if pending_rows >= shard_rows:
            buffered = _concat(pending)
            full = pending_rows - pending_rows % shard_rows
            for start in range(0, full, shard_rows):
                flush(_slice(buffered, start, start + shard_rows))
            pending, pending_rows = [_slice(buffered, full, pending_rows)], pending_rows - full
    if pending_rows:
        flush(_concat(pending))
    if not shards:
        raise EmbeddingSetError("no rows to write: an embedding set needs at least one item")
    return first, shards, ids


def _swap_in(tmp: Path, path: Path) -> None:
    old = path.parent / f".tmp-{path.name}.old-{uuid.uuid4().hex}"
    if path.exists():
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        if old.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_embedding_set(path: str | os.PathLike, batches: EmbeddingBatch | Iterable[EmbeddingBatch],
                        model: ModelRef, side_info_model: ModelRef | None = None,
                        metric: Literal["l2", "cosine"] = "l2", normalized: bool = False,
                        lineage: Iterable[str] = (), shard_rows: int = 65536,
                        overwrite: bool = False) -> EmbeddingSet:
    """Stream batches into a new set at ``path``: written in a temp dir beside it, then renamed into place.

    Leftover ``.tmp-<name>.*`` dirs of an interrupted write to ``path`` are removed first and are never listed
    as sets. On error the temp dir is removed and ``path`` is untouched; with ``overwrite`` an existing set is
    swapped out only once the new one is complete. Concurrent writers to one path are not supported.

    Args:
        batches: one EmbeddingBatch or an iterable of them (embeddings (n, d), side_info (n, d_side)).
        model: model that produced the embeddings; side_info_model: required iff batches carry side_info.
        metric: "l2" (Euclidean, unnormalised) or "cosine", the metric the set is to be searched with.
        normalized: every embedding has unit L2 norm (checked to 1e-3).
        lineage: history, e.g. ["gallery v1 embedded", "h v1->v2 applied"].
        shard_rows: max rows per shard; the set has ceil(count / shard_rows) files.

    Returns:
        The written set (not re-verified).

    Raises:
        EmbeddingSetError: ``path`` exists (without ``overwrite``) or is not a set, bad metric or shard_rows,
            NaN/inf values, dim change between batches, side_info in only some batches or not matching
            ``side_info_model``, duplicate item ids, no rows.
    """
    path = Path(path)
    if metric not in ("l2", "cosine"):
        raise EmbeddingSetError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    if shard_rows < 1:
        raise EmbeddingSetError(f"shard_rows must be >= 1, got {shard_rows}")
    if path.exists() and not overwrite:
        raise EmbeddingSetError(f"{path} already exists; pass overwrite=True to replace it")
    if path.exists() and not (path / MANIFEST).is_file():
        raise EmbeddingSetError(f"refusing to overwrite {path}: it is not an embedding set (no {MANIFEST})")
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _temp_dirs(path):
        shutil.rmtree(stale)
    tmp = path.parent / f".tmp-{path.name}.new-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        first, shards, ids = _write_shards(
            tmp, [batches] if isinstance(batches, EmbeddingBatch) else batches, normalized, shard_rows)
        _check_unique(ids)
        if (first.side_info is None) != (side_info_model is None):
            raise EmbeddingSetError(f"side_info_model is {side_info_model} but batches "
                                    f"{'lack' if first.side_info is None else 'carry'} side_info")
        manifest = EmbeddingSetManifest(
            model=model, side_info_model=side_info_model, dim=first.embeddings.shape[1],
            side_info_dim=None if first.side_info is None else first.side_info.shape[1],
            count=sum(s.rows for s in shards), metric=metric, normalized=normalized, shards=shards,
            lineage=list(lineage))
        _write_file(tmp / MANIFEST, manifest.model_dump_json(indent=2).encode())
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return EmbeddingSet(path, manifest)


def list_embedding_sets(root: str | os.PathLike, verify: bool = False) -> list[EmbeddingSet]:
    """All sets under ``root`` (any depth), sorted by path; ``.tmp-*`` dirs of unfinished writes are skipped.

    Raises:
        EmbeddingSetError: a listed set has an invalid manifest (or fails verification with ``verify``).
    """
    root = Path(root)
    manifests = sorted(root.rglob(MANIFEST))
    dirs = [m.parent for m in manifests if not any(p.startswith(".tmp-") for p in m.relative_to(root).parts)]
    return [EmbeddingSet.open(d, verify=verify) for d in dirs]


def require_same_model(query_model: ModelRef, gallery_model: ModelRef) -> None:
    """Refuse to compare query and gallery vectors produced by different model versions.

    Raises:
        VersionMismatchError: naming both refs when ``query_model != gallery_model``.
    """
    if query_model != gallery_model:
        raise VersionMismatchError(f"query model {query_model} differs from gallery model {gallery_model}; "
                                   "upgrade the gallery or re-embed the queries with one model")
