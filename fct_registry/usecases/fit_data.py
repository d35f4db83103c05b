"""The training and validation pairs of a fit: from a folder of images (features through ONNX Runtime, cached) or
from a Parquet file of vectors (any modality).

Pairs are (old, side-info, new) rows of the same items: the source backbone's embedding, the side-info model's vector
and the target backbone's embedding (FCT: Ramanujan et al., CVPR 2022, arXiv 2112.02805, Sec. 3).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fct_registry.core.errors import ConfigError, DataError, RegistryError
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import RegisteredVersion
from fct_registry.usecases.features import FeatureProgress, Features, folder_fingerprint, image_features

if TYPE_CHECKING:
    from fct_registry.onnx_boundary.image_folder import ImageFolder

Triple = tuple[np.ndarray, np.ndarray | None, np.ndarray]
"""(old (N, d_old), side-info (N, d_side) or None, new (N, d_new)) float32 rows of the same items."""


@dataclass(frozen=True)
class FitModels:
    """The registered models a transformation links: source and target backbones, optional side-info model."""

    source: RegisteredVersion
    target: RegisteredVersion
    side_info: RegisteredVersion | None

    def default_label(self) -> str:
        """``h-<source label>-<target label>``, with ``-noside`` when there is no side-info model."""
        return f"h-{self.source.ref.label}-{self.target.ref.label}" + ("" if self.side_info else "-noside")


@dataclass(frozen=True)
class FitData:
    """Training and validation pairs of one fit.

    Attributes:
        train: (old, side-info or None, new) float32 training rows.
        val: (old, side-info or None, new) float32 validation rows.
        val_labels: (N_val,) int64 class labels >= 0, or None when the validation items are unlabelled.
        data_hash: Identity of the training data (recorded as ``fct.data_hash``).
        inputs: Where the data came from (recorded in the version's params).
        features: The cached feature files used (image folders only).
        train_labels: (N_train,) int64 class labels >= 0 of the training rows, or None when some are unlabelled
            (FastFill's loss needs them).
    """

    train: Triple
    val: Triple
    val_labels: np.ndarray | None
    data_hash: str
    inputs: dict[str, Any]
    features: tuple[Features, ...] = ()
    train_labels: np.ndarray | None = None


def resolve_models(registry: ModelRegistry, source: str, target: str, side_info: str | None) -> FitModels:
    """Look up the backbones and the side-info model (number, label or ``@alias``).

    Raises:
        RegistryError: an unknown version, or source and target are the same model.
    """
    models = FitModels(registry.get("backbone", source), registry.get("backbone", target),
                       registry.get("side-info", side_info) if side_info is not None else None)
    if models.source.ref == models.target.ref:
        raise RegistryError(f"source and target are the same backbone {models.source.ref}; nothing to fit")
    return models


# ----- training data --------------------------------------------------------------------------------------------


def _split(n: int, val_fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train rows, validation rows): a seeded random ``val_fraction`` (at least 2 rows) held out."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(2, round(n * val_fraction))
    if n - n_val < 2:
        raise DataError(f"{what} has {n} items; holding out {n_val} for validation leaves fewer than 2 to train on")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _rows(triple: Triple, rows: np.ndarray) -> Triple:
    old, side, new = triple
    return old[rows], None if side is None else side[rows], new[rows]


def _folder_triple(registry: ModelRegistry, models: FitModels, folder: ImageFolder, name: str,
                   progress: FeatureProgress | None) -> tuple[Triple, list[Features], str]:
    fingerprint = folder_fingerprint(folder)
    found = {}
    for key, version in (("old", models.source), ("side", models.side_info), ("new", models.target)):
        if version is not None:
            found[key] = image_features(registry, version, folder, f"{version.ref.label} {name}", progress=progress,
                                        fingerprint=fingerprint)
    side = found["side"].vectors if "side" in found else None
    return (found["old"].vectors, side, found["new"].vectors), list(found.values()), fingerprint


def image_data(registry: ModelRegistry, models: FitModels, train: str | os.PathLike,
               val: str | os.PathLike | None = None, val_fraction: float = 0.1, seed: int = 0,
               progress: FeatureProgress | None = None) -> FitData:
    """Training pairs from a folder of images; validation on ``val`` or on a held-out ``val_fraction`` of it.

    Both folders are scanned before any model runs. Features come from
    :func:`fct_registry.usecases.features.image_features` (cached per model and folder).

    Args:
        registry: The model registry (its root holds the feature cache).
        models: Source, target and side-info models.
        train: Image folder, ``DIR/<class>/<image>`` or flat (see :mod:`fct_registry.onnx_boundary.image_folder`).
        val: Validation image folder; labelled by class folders for CMC / mAP; None: hold out part of ``train``.
        val_fraction: Fraction of ``train`` held out when ``val`` is None.
        seed: Seeds the hold-out.
        progress: Optional feature-extraction callback (see :data:`~fct_registry.usecases.features.FeatureProgress`).

    Raises:
        DataError: a folder is missing, empty, mixes layouts, or an image cannot be decoded; too few items.
        RegistryError, RuntimeInputError: a model's ONNX file cannot be fetched or loaded.
    """
    from fct_registry.onnx_boundary.image_folder import scan_image_folder  # Pillow, loaded only to read images

    train_folder = scan_image_folder(train)
    val_folder = scan_image_folder(val) if val is not None else None
    triple, used, fingerprint = _folder_triple(registry, models, train_folder, "train", progress)
    inputs: dict[str, Any] = {"train": str(Path(train).resolve()), "train_items": len(train_folder)}
    if val_folder is None:
        if len(train_folder) < 2:
            raise DataError(f"image folder {train} has {len(train_folder)} image; at least 2 are needed to train")
        rows, val_rows = _split(len(train_folder), val_fraction, seed, f"image folder {train}")
        train_triple, val_triple = _rows(triple, rows), _rows(triple, val_rows)
        labels = train_folder.labels[val_rows] if train_folder.labelled else None
        train_labels = train_folder.labels[rows] if train_folder.labelled else None
        inputs["val_fraction"] = val_fraction
        data_hash = fingerprint
    else:
        train_triple = triple
        train_labels = train_folder.labels if train_folder.labelled else None
        val_triple, val_used, val_fingerprint = _folder_triple(registry, models, val_folder, "val", progress)
        used += val_used
        labels = val_folder.labels if val_folder.labelled else None
        inputs |= {"val": str(Path(val).resolve()), "val_items": len(val_folder)}
        data_hash = hashlib.sha256(f"{fingerprint}\n{val_fingerprint}".encode()).hexdigest()
    if len(train_triple[0]) < 2 or len(val_triple[0]) < 2:
        raise DataError(f"a fit needs at least 2 training and 2 validation images; got {len(train_triple[0])} and "
                        f"{len(val_triple[0])}")
    return FitData(train_triple, val_triple, labels, f"images-sha256:{data_hash}", inputs, tuple(used), train_labels)


def _embedding_dim(version: RegisteredVersion) -> int | None:
    value = version.tags.get("fct.embedding_dim")
    return int(value) if value is not None and value.isdigit() else None


def _vector_column(table: pa.Table, name: str, path: Path) -> np.ndarray:
    """A list<float> or fixed_size_list<float> column -> (N, d) float32; every row the same length, no nulls."""
    if name not in table.column_names:
        raise DataError(f"pairs file {path} has no column {name!r}; columns: {', '.join(table.column_names)}")
    column = table.column(name).combine_chunks()
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        raise DataError(f"pairs file {path}: column {name!r} is {kind}; expected a list of floats per row")
    if column.null_count:
        raise DataError(f"pairs file {path}: column {name!r} has {column.null_count} null rows")
    import pyarrow.compute as pc  # loaded only to read a pairs file

    lengths = np.unique(pc.list_value_length(column).to_numpy(zero_copy_only=False))
    values = column.flatten()
    if len(lengths) != 1 or values.null_count or not (pa.types.is_floating(values.type)
                                                      or pa.types.is_integer(values.type)):
        raise DataError(f"pairs file {path}: column {name!r} must hold vectors of one length without nulls; "
                        f"got lengths {lengths.tolist()[:5]} of {values.type}")
    vectors = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), int(lengths[0]))
    if not np.isfinite(vectors).all():
        raise DataError(f"pairs file {path}: column {name!r} holds NaN or infinite values")
    return vectors


def pairs_data(path: str | os.PathLike, models: FitModels, val_fraction: float = 0.1, seed: int = 0) -> FitData:
    """Training and held-out validation pairs from a Parquet file of vectors (no images needed).

    Columns: ``old`` (N, d_old) and ``new`` (N, d_new) as list or fixed-size-list of floats; ``side_info``
    (N, d_side), required when ``models.side_info`` is set (ignored otherwise); optional integer ``label`` (CMC / mAP
    are measured when every held-out label is >= 0). Widths must equal the registered models' ``fct.embedding_dim``.

    Args:
        path: The Parquet file.
        models: Source, target and side-info models.
        val_fraction: Fraction of rows held out (seeded random, at least 2 rows).
        seed: Seeds the hold-out.

    Raises:
        DataError: missing file or column, ragged/null/non-finite vectors, widths that differ from the models', too
            few rows.
        ConfigError: ``val_fraction`` not in (0, 1).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file {path} does not exist")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"pairs file {path} is not a Parquet file: {exc}".splitlines()[0]) from None
    columns = [("old", models.source), ("new", models.target)]
    if models.side_info is not None:
        columns.append(("side_info", models.side_info))
    vectors = {}
    for name, version in columns:
        vectors[name] = _vector_column(table, name, path)
        expected = _embedding_dim(version)
        if expected is not None and vectors[name].shape[1] != expected:
            raise DataError(f"pairs file {path}: column {name!r} has {vectors[name].shape[1]}-d vectors but "
                            f"{version} embeds into {expected} dims")
    labels = None
    if "label" in table.column_names:
        column = table.column("label").combine_chunks()
        if not pa.types.is_integer(column.type) or column.null_count:
            raise DataError(f"pairs file {path}: column 'label' must be integers without nulls, got {column.type}")
        labels = column.to_numpy(zero_copy_only=False).astype(np.int64)
    rows, val_rows = _split(table.num_rows, val_fraction, seed, f"pairs file {path}")
    triple = (vectors["old"], vectors.get("side_info"), vectors["new"])
    val_labels = labels[val_rows] if labels is not None and (labels[val_rows] >= 0).all() else None
    train_labels = labels[rows] if labels is not None and (labels[rows] >= 0).all() else None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    inputs = {"pairs": str(path.resolve()), "pairs_rows": table.num_rows, "val_fraction": val_fraction}
    return FitData(_rows(triple, rows), _rows(triple, val_rows), val_labels, f"pairs-sha256:{digest.hexdigest()}",
                   inputs, train_labels=train_labels)
