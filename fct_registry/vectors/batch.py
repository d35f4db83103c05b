"""A batch of one model's vectors in memory: item ids, labels, embeddings and optional side-information.

Shapes: ids (n,) int64, labels (n,) int64 (-1 = unknown), embeddings (n, d) float32, side_info (n, d_side) float32
(FCT side-information: Ramanujan et al., CVPR 2022, arXiv 2112.02805, Sec. 3.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fct_registry.core.errors import EmbeddingSetError, FctError


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


def concat_batches(batches: list[EmbeddingBatch]) -> EmbeddingBatch:
    side = None if batches[0].side_info is None else np.concatenate([b.side_info for b in batches])
    return EmbeddingBatch(*(np.concatenate([getattr(b, f) for b in batches]) for f in ("ids", "labels",
                                                                                      "embeddings")), side)


def slice_batch(batch: EmbeddingBatch, start: int, stop: int) -> EmbeddingBatch:
    side = None if batch.side_info is None else batch.side_info[start:stop]
    return EmbeddingBatch(batch.ids[start:stop], batch.labels[start:stop], batch.embeddings[start:stop], side)
