"""A batch of one model's vectors in memory: item ids, labels, embeddings, optional side-information, optional
per-item FastFill columns, and the model version that made the embeddings.

Shapes: ids (n,) int64, labels (n,) int64 (-1 = unknown), embeddings (n, d) float32, side_info (n, d_side) float32
(FCT side-information: Ramanujan et al., CVPR 2022, arXiv 2112.02805, Sec. 3.2), uncertainty (n,) float32 (the
forward transformation's predicted log-variance sigma; FastFill: Jaeckle et al., ICLR 2023, arXiv 2303.04766,
Sec. 4) and backfilled (n,) bool (True: the item's vector was computed by the backbone itself from its image,
False: it was transformed from an older model's). A batch written into a set must
carry its ``model`` (a :class:`~fct_registry.core.refs.ModelRef`): the writer refuses batches of another model, so
vectors of two models of the same width are never stored under one version.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fct_registry.core.errors import EmbeddingSetError, FctError, VersionMismatchError
from fct_registry.core.refs import ModelRef


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


OPTIONAL_FIELDS = ("side_info", "uncertainty", "backfilled")
"""Columns an EmbeddingBatch may lack; all batches of one set either carry each or lack it."""


def _vector(x: object, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise EmbeddingSetError(f"{name} must be a 1-D integer array (n,), got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64, copy=False)


def _column(x: object, name: str, dtype: type, n: int) -> np.ndarray:
    arr = np.asarray(x)
    kinds = "b" if dtype is np.bool_ else "iuf"
    if arr.ndim != 1 or arr.dtype.kind not in kinds:
        raise EmbeddingSetError(f"{name} must be a 1-D {np.dtype(dtype).name} array (n,), got {arr.dtype} {arr.shape}")
    if len(arr) != n:
        raise EmbeddingSetError(f"batch arrays disagree on n: ids {n}, {name} {len(arr)}")
    return np.ascontiguousarray(arr, dtype=dtype)


def _matrix(x: object, name: str) -> np.ndarray:
    if isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2 and x.flags.c_contiguous:
        return x
    return as_float32_matrix(x, name)


@dataclass
class EmbeddingBatch:
    """n items of one model: ids (n,) int64 (unique within a set), labels (n,) int64 (-1 = unknown),
    embeddings (n, d) float32 C-contiguous, side_info (n, d_side) float32 C-contiguous or None, and ``model``, the
    model version that made the embeddings (None: not known, e.g. a batch read back from a set, whose manifest
    names the model; :func:`with_model` tags such a batch). Optional per-item columns: ``uncertainty`` (n,) float32,
    FastFill's predicted log-variance of each transformed vector, and ``backfilled`` (n,) bool, whether each vector
    came from the backbone itself (True) or from a forward transformation (False).

    Other integer/float dtypes and layouts are converted on construction.

    Raises:
        EmbeddingSetError: wrong ranks or dtypes, the arrays disagree on n, or ``model`` is not a ModelRef.
    """

    ids: np.ndarray
    labels: np.ndarray
    embeddings: np.ndarray
    side_info: np.ndarray | None = None
    model: ModelRef | None = None
    uncertainty: np.ndarray | None = None
    backfilled: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.ids = _vector(self.ids, "ids")
        self.labels = _vector(self.labels, "labels")
        self.embeddings = _matrix(self.embeddings, "embeddings")
        if self.side_info is not None:
            self.side_info = _matrix(self.side_info, "side_info")
        if self.model is not None and not isinstance(self.model, ModelRef):
            raise EmbeddingSetError(f"model must be a ModelRef or None, got {type(self.model).__name__} "
                                    f"{self.model!r}")
        rows = {"ids": len(self.ids), "labels": len(self.labels), "embeddings": len(self.embeddings)}
        if self.side_info is not None:
            rows["side_info"] = len(self.side_info)
        if len(set(rows.values())) != 1:
            raise EmbeddingSetError(f"batch arrays disagree on n: {rows}")
        if self.uncertainty is not None:
            self.uncertainty = _column(self.uncertainty, "uncertainty", np.float32, len(self.ids))
        if self.backfilled is not None:
            self.backfilled = _column(self.backfilled, "backfilled", np.bool_, len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)


def with_model(batch: EmbeddingBatch, model: ModelRef) -> EmbeddingBatch:
    """The same items tagged with the model that made their embeddings (arrays shared, not copied).

    Args:
        batch: a batch with ``model`` None (e.g. read from a set or an import) or already ``model``.
        model: the model version that made ``batch.embeddings``.

    Raises:
        VersionMismatchError: ``batch`` already carries another model (naming both).
        EmbeddingSetError: ``model`` is not a ModelRef.
    """
    if batch.model is not None and batch.model != model:
        raise VersionMismatchError(f"batch holds embeddings of model {batch.model}, cannot re-tag it as {model}")
    return replace(batch, model=model)


def concat_batches(batches: list[EmbeddingBatch]) -> EmbeddingBatch:
    """One batch holding ``batches`` in order (at least one; all with or all without side_info, one model).

    Raises:
        VersionMismatchError: the batches carry different models (naming two of them).
        EmbeddingSetError: ``batches`` is empty, or side_info (or an optional per-item column) is present in some
            and missing in others.
    """
    if not batches:
        raise EmbeddingSetError("concat_batches needs at least one batch, got none")
    models = {b.model for b in batches}
    if len(models) > 1:
        first, other = sorted(models, key=str)[:2]
        raise VersionMismatchError(f"cannot concatenate batches of model {first} and model {other}")
    optional = {}
    for name in OPTIONAL_FIELDS:
        if len({getattr(b, name) is None for b in batches}) > 1:
            raise EmbeddingSetError(f"{name} is present in some batches and missing in others")
        optional[name] = None if getattr(batches[0], name) is None else np.concatenate(
            [getattr(b, name) for b in batches])
    return EmbeddingBatch(*(np.concatenate([getattr(b, f) for b in batches]) for f in ("ids", "labels",
                                                                                      "embeddings")),
                          model=batches[0].model, **optional)


def slice_batch(batch: EmbeddingBatch, start: int, stop: int) -> EmbeddingBatch:
    """Rows ``start:stop`` of ``batch`` (views, not copies), with the same model."""
    return select_rows(batch, slice(start, stop))


def select_rows(batch: EmbeddingBatch, rows: slice | np.ndarray) -> EmbeddingBatch:
    """The items ``rows`` of ``batch`` (a slice gives views; a (n,) bool mask or index array gives copies), every
    column and the model kept."""
    optional = {name: None if getattr(batch, name) is None else getattr(batch, name)[rows]
                for name in OPTIONAL_FIELDS}
    return EmbeddingBatch(batch.ids[rows], batch.labels[rows], batch.embeddings[rows], model=batch.model,
                          **optional)
