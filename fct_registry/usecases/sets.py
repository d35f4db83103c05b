"""Use cases of ``fct-registry sets``: list the stored embedding sets (and clean up interrupted writes), embed a
gallery or a folder of images into a new set, import the vectors a user already stores, export a set for a vector
database."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fct_registry.core.errors import DataError, RegistryError
from fct_registry.core.refs import ModelRef
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import RegisteredVersion, input_contract
from fct_registry.usecases.project import SOURCES_FILE, image_folder_sources, prepared_sources
from fct_registry.vectors.ann_store import StoredIndex, stored_indexes
from fct_registry.vectors.batch import EmbeddingBatch, with_model
from fct_registry.vectors.embedding_set import EmbeddingSet, scan_embedding_sets
from fct_registry.vectors.exporting import Export, Format, export_set
from fct_registry.vectors.importing import Columns, VectorSource, open_source
from fct_registry.vectors.set_writer import remove_path, write_embedding_set

if TYPE_CHECKING:
    from fct_registry.method.data import Split
    from fct_registry.onnx_boundary.image_folder import ImageFolder
    from fct_registry.onnx_boundary.runtime import OnnxModel

Progress = Callable[[int, int], None]
"""Called with (items done, items in all) after each batch."""


@dataclass(frozen=True)
class SetEntry:
    """An embedding set, the registered backbone version its vectors come from (None: not registered), and the
    approximate search indexes stored in it (``fct-registry sets index``; stale ones flagged)."""

    embedding_set: EmbeddingSet
    backbone: RegisteredVersion | None
    indexes: tuple[StoredIndex, ...] = ()


@dataclass(frozen=True)
class SetListing:
    """What ``sets list`` shows: the valid sets, the invalid folders with their reason, unfinished writes."""

    entries: list[SetEntry]
    invalid: list[tuple[Path, str]]
    unfinished: list[Path]


def list_sets(registry: ModelRegistry, sets_root: str | os.PathLike) -> SetListing:
    """Every embedding set under ``sets_root`` (sorted by path) with its registered backbone version; a folder
    whose manifest is invalid is listed with its reason, and the ``.tmp-*`` folders of interrupted writes are
    listed too. Reads only."""
    scan = scan_embedding_sets(sets_root)
    backbones = {version.ref: version for version in registry.versions("backbone")}
    return SetListing([SetEntry(s, backbones.get(s.manifest.model), tuple(stored_indexes(s))) for s in scan.sets],
                      scan.invalid, scan.unfinished)


def clean_unfinished(sets_root: str | os.PathLike, min_age_s: float) -> list[Path]:
    """Remove the ``.tmp-*`` folders of interrupted writes under ``sets_root`` that were last modified at least
    ``min_age_s`` seconds ago (a younger one may belong to a write still running); returns those removed.

    Raises:
        DataError: ``min_age_s`` is negative.
    """
    if min_age_s < 0:
        raise DataError(f"minimum age {min_age_s} s is negative; expected >= 0 seconds")
    now = time.time()
    stale = [p for p in scan_embedding_sets(sets_root).unfinished if now - p.stat().st_mtime >= min_age_s]
    for path in stale:
        remove_path(path)
    return stale


def build_gallery(split: Split, backbone: Path, backbone_ref: ModelRef, side_info: Path | None,
                  side_info_ref: ModelRef | None, out: Path, metric: str,
                  prepared_from: tuple[str | os.PathLike, str] | None = None) -> EmbeddingSet:
    """Embed a split with the backbone (and side-info model) and store it as an embedding set.

    Args:
        split: gallery images (N, C, H, W) uint8 with labels and item ids.
        backbone: the backbone's ``.onnx`` file; ``backbone_ref`` its identity.
        side_info: the side-info model's ``.onnx`` file or None; ``side_info_ref`` its identity.
        out: the set's folder (replaced atomically when it exists).
        metric: ``l2`` or ``cosine``, recorded in the manifest for every later search.
        prepared_from: ``(data_dir, split name)`` the split was read from with ``load_prepared``: recorded in the
            set's ``sources.json`` (data version and item -> row, see
            :func:`~fct_registry.usecases.project.prepared_sources`) so that ``backfill`` can read the images again.

    Raises:
        EmbeddingSetError: non-finite vectors or a bad output folder.
        DataError: ``prepared_from`` names no split file, or one without the split's items.
    """
    embeddings = embed_images(_onnx_model(backbone), split.images)
    side = embed_images(_onnx_model(side_info), split.images) if side_info is not None else None
    batch = EmbeddingBatch(split.item_ids, split.labels, embeddings, side, model=backbone_ref)
    lineage = [f"gallery embedded by {backbone_ref}" + (f" with side-info {side_info_ref}" if side_info_ref else "")]
    sources = None if prepared_from is None else {SOURCES_FILE: prepared_sources(*prepared_from, split.item_ids)}
    return write_embedding_set(out, [batch], backbone_ref, side_info_ref, metric=metric, lineage=lineage,
                               overwrite=out.exists(), extra_files=sources)


# ----- models of a new set ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetModels:
    """The registered models whose vectors a new set holds, and the search settings of the backbone's tags.

    Attributes:
        backbone: the backbone version; ``dim`` its ``fct.embedding_dim``.
        side_info: the side-info version or None; ``side_info_dim`` its ``fct.embedding_dim``.
        metric: ``fct.metric`` of the backbone (``l2`` when absent); normalized: ``fct.normalized``.
    """

    backbone: RegisteredVersion
    side_info: RegisteredVersion | None
    dim: int
    side_info_dim: int | None
    metric: str
    normalized: bool


def _onnx_model(path: str | os.PathLike) -> OnnxModel:
    """An ONNX Runtime session of ``path`` (onnxruntime is loaded here, when a model runs: listing needs none)."""
    from fct_registry.onnx_boundary.runtime import OnnxModel

    return OnnxModel(path)


def _embedding_dim(registry: ModelRegistry, version: RegisteredVersion) -> int:
    value = version.tags.get("fct.embedding_dim")
    if value is None:
        return _onnx_model(registry.onnx_path(version)).output_dim
    try:
        return int(value)
    except ValueError:
        raise RegistryError(f"{version} has a non-integer fct.embedding_dim tag {value!r}") from None


def set_models(registry: ModelRegistry, backbone: str, side_info: str | None) -> SetModels:
    """Look up the backbone and side-info versions (number, label or ``@alias``) a new set is for.

    The dims come from each version's ``fct.embedding_dim`` tag (the ONNX output's width when the tag is absent).

    Raises:
        RegistryError: unknown version, or a bad ``fct.embedding_dim`` / ``fct.normalized`` tag.
    """
    chosen = registry.get("backbone", backbone)
    side = registry.get("side-info", side_info) if side_info is not None else None
    normalized = chosen.tags.get("fct.normalized", "false").lower()
    if normalized not in ("true", "false"):
        raise RegistryError(f"{chosen} has an fct.normalized tag {normalized!r}; expected true or false")
    return SetModels(chosen, side, _embedding_dim(registry, chosen),
                     None if side is None else _embedding_dim(registry, side),
                     chosen.tags.get("fct.metric", "l2"), normalized == "true")


def _by_models(models: SetModels) -> str:
    side = f" with side-info {models.side_info.ref}" if models.side_info is not None else ""
    return f"{models.backbone.ref}{side}"


def _write(out: Path, batches: Iterator[EmbeddingBatch], models: SetModels, lineage: list[str], overwrite: bool,
           extra_files: dict[str, bytes] | None = None) -> EmbeddingSet:
    side_ref = models.side_info.ref if models.side_info is not None else None
    return write_embedding_set(out, batches, models.backbone.ref, side_ref, metric=models.metric,
                               normalized=models.normalized, lineage=lineage, overwrite=overwrite,
                               extra_files=extra_files)


# ----- import -------------------------------------------------------------------------------------------------


def open_vectors(source: str | os.PathLike, models: SetModels, columns: Columns | None = None) -> VectorSource:
    """Open stored vectors for ``models``: side-info is read (``columns.side_info``, default ``side_info``) iff
    ``models`` has a side-info model; the widths are checked against the models' dims.

    Args:
        source: a ``.parquet`` file or a folder of ``.npy`` files (see :mod:`fct_registry.vectors.importing`).
        models: the set's models (:func:`set_models`).
        columns: the column names (file stems for npy); None: the defaults of :class:`Columns`.

    Raises:
        DataError: invalid source, a missing column (listing those present), a side-info column without a
            side-info model, or a width other than the model's ``fct.embedding_dim``.
    """
    columns = columns or Columns()
    if models.side_info is None and columns.side_info is not None:
        raise DataError(f"a side-info column ({columns.side_info!r}) was given without a side-info model; "
                        "name the model with --side-info")
    if models.side_info is not None and columns.side_info is None:
        columns = Columns(columns.item_id, columns.embedding, "side_info", columns.label)
    vectors = open_source(source, columns)
    expected = [(vectors.columns.embedding, vectors.dim, models.backbone, models.dim)]
    if models.side_info is not None:
        expected.append((vectors.columns.side_info, vectors.side_info_dim, models.side_info, models.side_info_dim))
    for column, width, version, dim in expected:
        if width != dim:
            raise DataError(f"column {column!r} of {vectors} holds {width}-d vectors, but {version} makes "
                            f"{dim}-d vectors (fct.embedding_dim)")
    return vectors


def import_set(vectors: VectorSource, models: SetModels, out: str | os.PathLike, batch_rows: int = 65536,
               overwrite: bool = False, progress: Progress | None = None) -> EmbeddingSet:
    """Stream stored vectors into a new embedding set of the registered ``models``.

    The manifest names the backbone (and side-info model) by their registered refs, takes metric and normalisation
    from the backbone's tags and records ``imported from <source>`` as its lineage. Every batch is checked before
    it is written; any error leaves no set (nor a temp dir) at ``out``.

    Args:
        vectors: the opened source (:func:`open_vectors`).
        models: the registered models the vectors come from (:func:`set_models`).
        out: the new set's folder.
        batch_rows: items per batch read (bounds memory).
        overwrite: replace an existing set at ``out`` (only once the new one is complete).
        progress: called with (items done, items in all) after each batch.

    Returns:
        The new set.

    Raises:
        DataError: a bad row (null, NaN/inf, other width: naming the row, its item id and the column) or a
            duplicate item id (naming it).
        EmbeddingSetError: ``out`` exists (without ``overwrite``), or the backbone is tagged normalized and a
            vector is not of unit norm.
    """
    def batches() -> Iterator[EmbeddingBatch]:
        done = 0
        for batch in vectors.iter_batches(batch_rows):
            yield with_model(batch, models.backbone.ref)  # the user says these are its vectors
            done += len(batch)
            if progress is not None:
                progress(done, vectors.count)

    source = vectors.path.resolve()
    lineage = [f"imported from {source} ({vectors.kind}), vectors of {_by_models(models)}"]
    return _write(Path(out), batches(), models, lineage, overwrite)


# ----- export -------------------------------------------------------------------------------------------------


def export(embedding_set: EmbeddingSet, out: str | os.PathLike, format: Format, batch_rows: int = 65536,
           overwrite: bool = False, progress: Progress | None = None) -> Export:
    """Write a set (typically an upgraded one) as one Parquet file or a folder of ``.npy`` files for a vector
    database; streamed, atomic (temp then rename) and read-only on the set (its shards are verified first).

    Raises:
        EmbeddingSetError: a shard does not match the manifest, ``out`` exists (without ``overwrite``) or is not
            an export of that format.
    """
    embedding_set.verify()
    total = embedding_set.manifest.count
    return export_set(embedding_set, out, format, rows=batch_rows, overwrite=overwrite,
                      progress=None if progress is None else (lambda done: progress(done, total)))


# ----- embed an image folder ----------------------------------------------------------------------------------


def _images_embedded(folder: ImageFolder, models: SetModels, registry: ModelRegistry, batch_size: int,
                     progress: Progress | None) -> Iterator[EmbeddingBatch]:
    embedders = []
    for version in (models.backbone, models.side_info):
        if version is not None:
            model = _onnx_model(registry.onnx_path(version))
            embedders.append((model, input_contract(version, model.input_shapes[model.input_names[0]])))
    streams = {}
    for _, contract in embedders:
        streams.setdefault(contract, folder.iter_decoded(contract, batch_size))
    while True:
        decoded = {}
        for contract, stream in streams.items():
            step = next(stream, None)
            if step is None:
                return
            decoded[contract] = step
        rows = next(iter(decoded.values()))[0]
        vectors = [embed_images(model, decoded[contract][1], contract, batch_size) for model, contract in embedders]
        ids = np.arange(rows.start, rows.stop, dtype=np.int64)
        yield EmbeddingBatch(ids, folder.labels[rows], vectors[0], vectors[1] if len(vectors) > 1 else None,
                             model=models.backbone.ref)
        if progress is not None:
            progress(rows.stop, len(folder))


def embed_folder(registry: ModelRegistry, image_dir: str | os.PathLike, models: SetModels, out: str | os.PathLike,
                 batch_size: int = 256, overwrite: bool = False, progress: Progress | None = None) -> EmbeddingSet:
    """Embed a folder of images with the registered backbone (and side-info model) into a new set.

    Images are found and labelled by :func:`~fct_registry.onnx_boundary.image_folder.scan_image_folder` (class
    folders give labels 0, 1, ...; a flat folder -1); item ids are their positions in the sorted file list. Each
    model gets the images prepared by its own input contract (``fct.input_contract`` tag). The set records the
    folder in its lineage and every item's image and its sha256 in ``sources.json`` (read back by
    :func:`~fct_registry.usecases.project.image_sources`; ``backfill`` refuses images that changed since).

    Args:
        registry: the registry holding the models' ONNX files.
        image_dir: the image folder.
        models: the registered models (:func:`set_models`).
        out: the new set's folder.
        batch_size: images decoded and embedded at a time (bounds memory).
        overwrite: replace an existing set at ``out`` (only once the new one is complete).
        progress: called with (images done, images in all) after each batch.

    Returns:
        The new set: ids (N,), labels (N,), embeddings (N, d), side_info (N, d_side) with side-info.

    Raises:
        DataError: the folder holds no image, mixes layouts, or an image cannot be decoded (naming it).
        RegistryError: a model's ONNX file cannot be fetched; RuntimeInputError: it cannot be loaded.
        EmbeddingSetError: ``out`` exists (without ``overwrite``).
    """
    from fct_registry.onnx_boundary.image_folder import scan_image_folder  # Pillow, loaded only to embed images

    folder = scan_image_folder(image_dir)
    root = folder.root.resolve()
    layout = f"{len(folder.classes)} class folders" if folder.labelled else "unlabelled"
    lineage = [f"embedded from image folder {root} ({len(folder)} images, {layout}) by {_by_models(models)}"]
    return _write(Path(out), _images_embedded(folder, models, registry, batch_size, progress), models, lineage,
                  overwrite, {SOURCES_FILE: image_folder_sources(root, folder.classes, folder.files)})
