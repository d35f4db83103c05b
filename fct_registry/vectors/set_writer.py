"""Writing an embedding set: Parquet shards and ``manifest.json`` in a temp dir beside the target, renamed in.

Killed at any moment, a write leaves the previous contents of the path intact and no partial set; the next write
to the same path removes the leftover temp dir first. :func:`write_embedding_set` streams batches through all three
steps in one process; writers that produce shards elsewhere (the upgrade engines' worker processes, on any node that
sees the temp dir) use the steps one by one: :func:`prepare_set`, :func:`write_shard` per shard, :func:`commit_set`.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fct_registry.core.errors import EmbeddingSetError, VersionMismatchError
from fct_registry.core.refs import ModelRef
from fct_registry.vectors.batch import OPTIONAL_FIELDS, EmbeddingBatch, concat_batches, slice_batch
from fct_registry.vectors.embedding_set import (
    MANIFEST,
    TEMP_SUFFIX,
    EmbeddingSet,
    EmbeddingSetManifest,
    Hasher,
    ShardInfo,
    new_hasher,
)
from fct_registry.vectors.vector_column import vector_array

PARQUET_OPTIONS = {"use_dictionary": ["label"], "compression": {"item_id": "snappy", "label": "snappy"},
                   "write_statistics": ["item_id", "label"]}
"""``pyarrow.parquet.write_table`` options of every shard: dictionary encoding for ``label`` only (few distinct
values), Snappy and min/max statistics for ``item_id`` and ``label`` only. Float vectors are stored plain: on them
dictionary encoding is tried, overflows and falls back, Snappy saves ~1 % and statistics serve no query, and the
three cost about a third of the shard-encoding time (measured for the upgrade engines). Shards written with
pyarrow's defaults (sets made before) read the same."""


def shard_table(batch: EmbeddingBatch) -> pa.Table:
    """The Arrow table of one shard holding ``batch`` (columns as in :mod:`~fct_registry.vectors.embedding_set`);
    the vector columns are views of the batch's arrays, not copies."""
    columns = {"item_id": pa.array(batch.ids), "label": pa.array(batch.labels),
               "embedding": vector_array(batch.embeddings)}
    if batch.side_info is not None:
        columns["side_info"] = vector_array(batch.side_info)
    if batch.uncertainty is not None:
        columns["uncertainty"] = pa.array(batch.uncertainty)
    if batch.backfilled is not None:
        columns["backfilled"] = pa.array(batch.backfilled)
    return pa.table(columns)


def shard_bytes(batch: EmbeddingBatch) -> pa.Buffer:
    """The Parquet file of one shard holding ``batch``, in memory: the bytes :func:`write_shard` writes.

    The same batch always gives the same bytes (a pure function of the values), so two writers of one shard agree.
    """
    sink = pa.BufferOutputStream()
    pq.write_table(shard_table(batch), sink, **PARQUET_OPTIONS)
    return sink.getvalue()


class _HashingFile(io.RawIOBase):
    """A write-only binary file that feeds every byte written through it to ``hasher`` on its way to ``file``.

    Parquet is encoded straight into the shard's file through it, page by page, instead of into one buffer of the
    whole shard that is then hashed and written. That buffer (~70 MB per 65,536-row shard of 128-d vectors with
    128-d side-info, grown as it fills) is fresh memory for every shard, and fresh memory is what a VM charges most
    for in system time: the local upgrade engine's rate rose by a quarter without it (README, "The local upgrade
    loop").
    """

    def __init__(self, file: io.BufferedWriter, hasher: Hasher) -> None:
        super().__init__()
        self._file, self._hasher = file, hasher

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | memoryview) -> int:  # type: ignore[override]
        self._hasher.update(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()


def _write_file(path: Path, data: bytes | pa.Buffer) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


SHARD_TEMP = re.compile(r"\.part-\d{5}\.parquet\.\d+-[0-9a-f]{8}\.tmp")
"""Name of a shard being written: ``.<file>.<writer pid>-<random>.tmp``, renamed to ``<file>`` once complete."""


def write_shard(folder: str | os.PathLike, file: str, batch: EmbeddingBatch) -> ShardInfo:
    """Write ``batch`` as the shard ``folder/file``, atomically: a temp file named after this process, fsynced, then
    renamed. A writer killed midway leaves only a ``.<file>.<pid>-<random>.tmp`` file, which :func:`commit_set`
    removes; a second writer of the same shard (a retried task) replaces the first's file with its own.

    Args:
        folder: The set's temp dir from :func:`prepare_set` (on any node that sees it).
        file: ``part-NNNNN.parquet``.
        batch: The shard's rows (embeddings (n, d) float32, n >= 1), checked by :func:`check_batch` beforehand.

    Returns:
        The shard's manifest entry: file, rows, blake3 of the bytes written (hashed as they are written, not
        re-read); the file's bytes are :func:`shard_bytes` of ``batch``.
    """
    folder = Path(folder)
    digest = new_hasher("blake3")
    tmp = folder / f".{file}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            pq.write_table(shard_table(batch), _HashingFile(f, digest), **PARQUET_OPTIONS)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ShardInfo(file=file, rows=len(batch), blake3=digest.hexdigest())


def _temp_dirs(path: Path) -> list[Path]:
    pattern = re.compile(r"\.tmp-" + re.escape(path.name) + TEMP_SUFFIX)
    return [p for p in path.parent.glob(".tmp-*") if pattern.fullmatch(p.name)]


def _check_model(batch: EmbeddingBatch, index: int, model: ModelRef) -> None:
    where = f"batch {index} (first item_id {int(batch.ids[0])})" if len(batch) else f"batch {index}"
    if batch.model is None:
        raise EmbeddingSetError(f"{where} carries no model; tag it with the ModelRef that made its embeddings "
                                f"(this set is for model {model})")
    if batch.model != model:
        raise VersionMismatchError(f"{where} holds embeddings of model {batch.model}, but the set is written for "
                                   f"model {model}")


def check_batch(batch: EmbeddingBatch, first: EmbeddingBatch, normalized: bool) -> None:
    """Refuse a batch that cannot join a set whose first batch is ``first`` (``batch`` itself for the first).

    Raises:
        EmbeddingSetError: an optional column present in only one of them, a dim change, NaN/inf in embeddings,
            side-info or uncertainty (first bad item_id named), or ``normalized`` and an L2 norm off 1 by > 1e-3.
    """
    for name in OPTIONAL_FIELDS:
        if (getattr(first, name) is None) != (getattr(batch, name) is None):
            raise EmbeddingSetError(f"{name} is present in some batches and missing in others")
    if batch.uncertainty is not None and not np.isfinite(batch.uncertainty).all():
        bad = int(batch.ids[~np.isfinite(batch.uncertainty)][0])
        raise EmbeddingSetError(f"uncertainty of item_id {bad} is NaN or inf")
    for name in ("embeddings", "side_info"):
        want, got = getattr(first, name), getattr(batch, name)
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


def _write_shards(tmp: Path, batches: Iterable[EmbeddingBatch], model: ModelRef, normalized: bool,
                  shard_rows: int) -> tuple[EmbeddingBatch, list[ShardInfo], list[np.ndarray], int]:
    first, shards, ids, pending, pending_rows, backfilled = None, [], [], [], 0, 0

    def flush(batch: EmbeddingBatch) -> None:
        shards.append(write_shard(tmp, f"part-{len(shards):05d}.parquet", batch))

    for index, batch in enumerate(batches):
        if not isinstance(batch, EmbeddingBatch):
            raise EmbeddingSetError(f"expected EmbeddingBatch items, got {type(batch).__name__}")
        _check_model(batch, index, model)
        first = batch if first is None else first
        check_batch(batch, first, normalized)
        ids.append(batch.ids)
        backfilled += 0 if batch.backfilled is None else int(batch.backfilled.sum())
        pending.append(batch)
        pending_rows += len(batch)
        if pending_rows >= shard_rows:
            buffered = concat_batches(pending)
            full = pending_rows - pending_rows % shard_rows
            for start in range(0, full, shard_rows):
                flush(slice_batch(buffered, start, start + shard_rows))
            pending, pending_rows = [slice_batch(buffered, full, pending_rows)], pending_rows - full
    if pending_rows:
        flush(concat_batches(pending))
    if not shards:
        raise EmbeddingSetError("no rows to write: an embedding set needs at least one item")
    return first, shards, ids, backfilled


def manifest_bytes(manifest: EmbeddingSetManifest) -> bytes:
    """``manifest.json``'s bytes; the optional FastFill fields are written only when used, so a plain set's
    manifest is byte-identical to one written before they existed."""
    unused = {name for name in ("uncertainty", "backfilled") if getattr(manifest, name) in (False, None)}
    return manifest.model_dump_json(indent=2, exclude=unused).encode()


def swap_in(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` (a file or a folder) to ``path``, replacing what is there only once ``tmp`` is
    complete; if the final rename fails, the previous ``path`` is put back.

    Raises:
        OSError: the rename failed (``path`` is as it was).
    """
    old = path.parent / f".tmp-{path.name}.old-{uuid.uuid4().hex}"
    if path.exists():
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        if old.exists():
            os.replace(old, path)
        raise
    remove_path(old)


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree if it exists."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def prepare_set(path: str | os.PathLike, overwrite: bool = False,
                extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Check that a set may be written at ``path`` and create its temp dir beside it (``.tmp-<name>.new-<uuid>``).

    Leftover temp dirs of an interrupted write to ``path`` are removed first. The caller writes shards into the
    returned dir (:func:`write_shard`) and then :func:`commit_set`, or removes the dir on failure.

    Raises:
        EmbeddingSetError: ``path`` exists (without ``overwrite``) or is not a set; an ``extra_files`` name that is
            not a plain file name or is the manifest's or a shard's.
    """
    path = Path(path)
    for name in extra_files or {}:
        if name in (MANIFEST, ".", "..") or "/" in name or os.sep in name or re.fullmatch(r"part-\d{5}\.parquet", name):
            raise EmbeddingSetError(f"extra file name {name!r} must be a plain file name other than {MANIFEST} and "
                                    "part-NNNNN.parquet")
    if path.exists() and not overwrite:
        raise EmbeddingSetError(f"{path} already exists; pass overwrite=True to replace it")
    if path.exists() and not (path / MANIFEST).is_file():
        raise EmbeddingSetError(f"refusing to overwrite {path}: it is not an embedding set (no {MANIFEST})")
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _temp_dirs(path):
        shutil.rmtree(stale)
    tmp = path.parent / f".tmp-{path.name}.new-{uuid.uuid4().hex}"
    tmp.mkdir()
    return tmp


def commit_set(tmp: Path, path: str | os.PathLike, manifest: EmbeddingSetManifest,
               extra_files: Mapping[str, bytes] | None = None) -> EmbeddingSet:
    """Finish a set written in ``tmp`` (from :func:`prepare_set`): remove the temp files of shard writers that died,
    write the sidecars and ``manifest.json`` (fsynced), and rename ``tmp`` to ``path`` (:func:`swap_in`).

    Raises:
        EmbeddingSetError: a shard the manifest lists is missing from ``tmp``.
        OSError: writing or the rename failed (``path`` is as it was; the caller removes ``tmp``).
    """
    path = Path(path)
    for stray in tmp.iterdir():
        if SHARD_TEMP.fullmatch(stray.name):
            stray.unlink(missing_ok=True)
    missing = [shard.file for shard in manifest.shards if not (tmp / shard.file).is_file()]
    if missing:
        raise EmbeddingSetError(f"shard {tmp / missing[0]} is missing; the set at {path} was not written")
    for name, data in (extra_files or {}).items():
        _write_file(tmp / name, data)
    _write_file(tmp / MANIFEST, manifest_bytes(manifest))
    swap_in(tmp, path)
    return EmbeddingSet(path, manifest)


def write_embedding_set(path: str | os.PathLike, batches: EmbeddingBatch | Iterable[EmbeddingBatch],
                        model: ModelRef, side_info_model: ModelRef | None = None,
                        metric: Literal["l2", "cosine"] = "l2", normalized: bool = False,
                        lineage: Iterable[str] = (), shard_rows: int = 65536,
                        overwrite: bool = False, extra_files: Mapping[str, bytes] | None = None) -> EmbeddingSet:
    """Stream batches into a new set at ``path``: written in a temp dir beside it, then renamed into place.

    Leftover ``.tmp-<name>.*`` dirs of an interrupted write to ``path`` are removed first and are never listed
    as sets. On error the temp dir is removed and ``path`` is untouched; with ``overwrite`` an existing set is
    swapped out only once the new one is complete. Concurrent writers to one path are not supported.

    Args:
        batches: one EmbeddingBatch or an iterable of them (embeddings (n, d), side_info (n, d_side)), each
            carrying ``batch.model``, the model that made its embeddings.
        model: the set's model (named in the manifest); every batch's ``model`` must equal it.
        side_info_model: required iff batches carry side_info.
        metric: "l2" (Euclidean, unnormalised) or "cosine", the metric the set is to be searched with.
        normalized: every embedding has unit L2 norm (checked to 1e-3).
        lineage: history, e.g. ["gallery v1 embedded", "h v1->v2 applied"].
        shard_rows: max rows per shard; the set has ceil(count / shard_rows) files.
        extra_files: sidecar files written into the set with it, file name -> bytes (e.g. ``sources.json``, where
            the items came from); not listed in the manifest, so readers of the set ignore them.

    Returns:
        The written set (not re-verified).

    Raises:
        VersionMismatchError: a batch carries another model than ``model`` (naming both); nothing is written.
        EmbeddingSetError: ``model`` is not a ModelRef or a batch carries none; ``path`` exists (without
            ``overwrite``) or is not a set, bad metric or shard_rows, NaN/inf values, dim change between batches,
            side_info in only some batches or not matching ``side_info_model``, duplicate item ids, no rows; an
            ``extra_files`` name that is not a plain file name or is the manifest's or a shard's.
    """
    path = Path(path)
    if not isinstance(model, ModelRef):
        raise EmbeddingSetError(f"model must be a ModelRef, got {type(model).__name__} {model!r}")
    if metric not in ("l2", "cosine"):
        raise EmbeddingSetError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    if shard_rows < 1:
        raise EmbeddingSetError(f"shard_rows must be >= 1, got {shard_rows}")
    tmp = prepare_set(path, overwrite, extra_files)
    try:
        first, shards, ids, backfilled = _write_shards(
            tmp, [batches] if isinstance(batches, EmbeddingBatch) else batches, model, normalized, shard_rows)
        _check_unique(ids)
        if (first.side_info is None) != (side_info_model is None):
            raise EmbeddingSetError(f"side_info_model is {side_info_model} but batches "
                                    f"{'lack' if first.side_info is None else 'carry'} side_info")
        manifest = EmbeddingSetManifest(
            model=model, side_info_model=side_info_model, dim=first.embeddings.shape[1],
            side_info_dim=None if first.side_info is None else first.side_info.shape[1],
            count=sum(s.rows for s in shards), metric=metric, normalized=normalized, shards=shards,
            lineage=list(lineage), uncertainty=first.uncertainty is not None,
            backfilled=None if first.backfilled is None else backfilled)
        commit_set(tmp, path, manifest, extra_files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return EmbeddingSet(path, manifest)
