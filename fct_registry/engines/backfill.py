"""Partial backfill of an upgraded set: the order, the items' images, and the re-embedding/merge loop.

FastFill (Jaeckle, Faghri, Farhadi, Tuzel, Pouransari, ICLR 2023, arXiv 2303.04766, Sec. 3-4): after the cheap
upgrade h(old, side-info) of a stored gallery, its items are re-embedded with the new backbone *gradually*, in an
order; the mixed gallery (some vectors transformed, some computed by the backbone) approaches new/new retrieval
after a small fraction of the backfill when the order is the transformation's predicted uncertainty sigma,
descending. This module orders the items (``uncertainty``: sigma descending; ``random``: a seeded permutation; ties
and the permutation both keyed on item ids, so the order does not depend on how the set is stored), reads the
chosen items' images (:class:`FolderImages`, :class:`PreparedImages`, each checking that the images are the ones
the set was embedded from) and streams the set into a new one where those items carry the backbone's vectors.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from fct_registry.core.errors import DataError, UpgradeError, VersionMismatchError
from fct_registry.engines.chain import check_finite, check_stored_finite
from fct_registry.onnx_boundary.contract import InputContract
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.registry.versions import file_sha256
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.set_writer import write_embedding_set

if TYPE_CHECKING:
    from fct_registry.onnx_boundary.runtime import OnnxModel

Order = Literal["uncertainty", "random"]
ORDERS: tuple[str, ...] = ("uncertainty", "random")
Progress = Callable[[int, int], None]
"""``progress(images_done, images_total)``, called after each chunk of images is embedded."""


def backfill_order(ids: np.ndarray, order: Order, uncertainty: np.ndarray | None = None, seed: int = 0
                   ) -> np.ndarray:
    """The items of a set in the order they are backfilled.

    Args:
        ids: (n,) int64 item ids (unique; any storage order).
        order: ``uncertainty`` (sigma descending, ties by item id ascending: FastFill's order) or ``random`` (the
            ids sorted ascending, then permuted by ``numpy.random.default_rng(seed)``).
        uncertainty: (n,) float32 sigma of each item (the set's ``uncertainty`` column), for ``uncertainty``.
        seed: the permutation's seed, for ``random``.

    Returns:
        (n,) int64 item ids, the first to backfill first.

    Raises:
        DataError: unknown order, or ``uncertainty`` order without sigma.
    """
    ids = np.asarray(ids, np.int64)
    if order == "uncertainty":
        if uncertainty is None:
            raise DataError("order 'uncertainty' needs the set's uncertainty column")
        return ids[np.lexsort((ids, -np.asarray(uncertainty, np.float64)))]
    if order == "random":
        ranked = np.sort(ids)
        return ranked[np.random.default_rng(seed).permutation(len(ranked))]
    raise DataError(f"unknown backfill order {order!r}; expected one of {', '.join(ORDERS)}")


def items_to_backfill(ordered: np.ndarray, backfilled: np.ndarray, goal: int) -> np.ndarray:
    """The items to re-embed now so that ``goal`` items are backfilled: the first of ``ordered`` not yet backfilled.

    Items already backfilled stay so (a second run continues where the first stopped).

    Args:
        ordered: (n,) int64 item ids in backfill order (:func:`backfill_order`).
        backfilled: (k,) int64 ids of the items already backfilled.
        goal: how many items are to be backfilled once done.

    Returns:
        (max(goal - k, 0),) int64 item ids, in backfill order.
    """
    fresh = ordered[~np.isin(ordered, backfilled)]
    return fresh[:max(goal - len(backfilled), 0)]


class ItemImages(Protocol):
    """Where a set's images are: decoded images of items, by item id."""

    def check(self) -> None:
        """Fail before anything is embedded when the images are missing or not the ones the set was made from."""

    def read(self, ids: np.ndarray, contract: InputContract) -> np.ndarray:
        """(n, C, H, W) uint8 images of ``ids`` (n,) int64, decoded as ``contract`` says."""


class FolderImages:
    """The images of a set embedded from an image folder (``sources.json`` of kind ``image_folder``).

    Each file is checked against the sha256 recorded when the set was embedded as it is read.

    Args:
        folder: the image folder (the recorded one, or where it is now).
        files: item id -> the image's path relative to ``folder``.
        sha256: item id -> sha256 (hex) of the file's bytes when the set was embedded.
    """

    def __init__(self, folder: str | os.PathLike, files: Mapping[int, str], sha256: Mapping[int, str]) -> None:
        self.folder, self.files, self.sha256 = Path(folder), files, sha256

    def check(self) -> None:
        """Raises DataError: the folder does not exist."""
        if not self.folder.is_dir():
            raise DataError(f"image folder {self.folder} of the set is missing (pass --images for where it is now)")

    def read(self, ids: np.ndarray, contract: InputContract) -> np.ndarray:
        """Read, check and decode the images of ``ids``.

        Raises:
            DataError: an item has no recorded image, or its file is missing or cannot be decoded (named).
            VersionMismatchError: a file's bytes differ from those the set was embedded from (named).
        """
        from fct_registry.onnx_boundary.images import decode_image  # Pillow, loaded only to read images

        decoded = []
        for item in map(int, ids):
            if item not in self.files or item not in self.sha256:
                raise DataError(f"item_id {item} has no recorded image and sha256 in the set's sources.json")
            path = self.folder / self.files[item]
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DataError(f"image {path} of item_id {item} is missing or unreadable: {exc.strerror}") from None
            digest = hashlib.sha256(data).hexdigest()
            if digest != self.sha256[item]:
                raise VersionMismatchError(f"image {path} of item_id {item} changed since the set was embedded "
                                           f"(sha256 {digest[:12]}, recorded {self.sha256[item][:12]})")
            try:
                decoded.append(decode_image(data, contract))
            except DataError as exc:
                raise DataError(f"{path}: {exc}") from None
        return np.concatenate(decoded)


class PreparedImages:
    """The images of a gallery built from a prepared split (``sources.json`` of kind ``prepared``).

    Args:
        path: the split's file (``<data_dir>/<split>.npz``, :func:`fct_registry.method.data.save_prepared`).
        data_version: sha256 (hex) of that file when the gallery was built.
        rows: item id -> row of the split.
        load: reads the split's images (N, C, H, W) uint8 from ``path`` (e.g. ``load_prepared(...).images``),
            called once the file's bytes are checked.
    """

    def __init__(self, path: str | os.PathLike, data_version: str, rows: Mapping[int, int],
                 load: Callable[[], np.ndarray]) -> None:
        self.path, self.data_version, self.rows, self._load = Path(path), data_version, rows, load
        self._images: np.ndarray | None = None

    def check(self) -> None:
        """Load the split once its bytes are checked.

        Raises:
            DataError: the split file is missing or unreadable.
            VersionMismatchError: its sha256 differs from the recorded data version.
        """
        if self._images is not None:
            return
        if not self.path.is_file():
            raise DataError(f"prepared split {self.path} of the set is missing (pass --images for the data folder)")
        digest = file_sha256(self.path)
        if digest != self.data_version:
            raise VersionMismatchError(f"prepared split {self.path} changed since the set was embedded (sha256 "
                                       f"{digest[:12]}, recorded data version {self.data_version[:12]})")
        self._images = self._load()

    def read(self, ids: np.ndarray, contract: InputContract) -> np.ndarray:
        """The split's rows of ``ids`` (as stored: (n, C, H, W) uint8; the contract's size must match them).

        Raises:
            DataError: an item has no recorded row, or the split file is missing or changed (see :meth:`check`).
        """
        self.check()
        missing = [int(item) for item in ids if int(item) not in self.rows]
        if missing:
            raise DataError(f"item_id {missing[0]} has no recorded row of {self.path} in the set's sources.json")
        return self._images[[self.rows[int(item)] for item in ids]]


def embed_items(model: OnnxModel, contract: InputContract, images: ItemImages, ids: np.ndarray,
                image_batch: int = 256, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """The backbone's vectors of items' images: ``ids`` (n,) int64 -> (n, d) float32, ``image_batch`` at a time.

    Raises:
        DataError, VersionMismatchError: an image is missing, changed or undecodable (see the readers).
        UpgradeError: the backbone outputs NaN/inf (first bad item id named).
    """
    chunks = []
    for start in range(0, len(ids), image_batch):
        part = ids[start:start + image_batch]
        vectors = embed_images(model, images.read(part, contract), contract, batch_size=image_batch)
        check_finite(vectors, part, f"backbone {model.path}")
        chunks.append(vectors)
        if progress is not None:
            progress(start + len(part))
    return np.concatenate(chunks) if chunks else np.zeros((0, model.output_dim), np.float32)


def iter_backfilled(source: EmbeddingSet, chosen: np.ndarray, model: OnnxModel, contract: InputContract,
                    images: ItemImages, batch_rows: int = 65536, image_batch: int = 256,
                    progress: Progress | None = None) -> Iterator[EmbeddingBatch]:
    """Yield ``source`` batch by batch in row order, the ``chosen`` items carrying the backbone's vectors.

    Args:
        source: the stored set at the backbone's model (embeddings (count, d) float32).
        chosen: (k,) int64 item ids to re-embed (not yet backfilled).
        model: the backbone's ONNX Runtime session; d outputs; ``contract`` its input contract.
        images: where the items' images are.
        batch_rows: set rows per batch (bounds memory with ``image_batch``).
        image_batch: images decoded and embedded at a time.
        progress: ``progress(images_done, len(chosen))``.

    Yields:
        EmbeddingBatch: ids, labels, side_info and uncertainty as stored; embeddings (n, d) float32 with the
        chosen rows replaced; backfilled (n,) bool, True for those rows and for rows backfilled before.
    """
    done = 0
    for batch in source.iter_batches(batch_rows):
        check_stored_finite(batch, source.path)
        backfilled = np.zeros(len(batch), bool) if batch.backfilled is None else batch.backfilled.copy()
        rows = np.flatnonzero(np.isin(batch.ids, chosen))
        embeddings = batch.embeddings
        if len(rows):
            embeddings = embeddings.copy()
            report = None if progress is None else (lambda n, base=done: progress(base + n, len(chosen)))
            embeddings[rows] = embed_items(model, contract, images, batch.ids[rows], image_batch, report)
            backfilled[rows] = True
            done += len(rows)
        yield EmbeddingBatch(batch.ids, batch.labels, embeddings, batch.side_info, model=source.manifest.model,
                             uncertainty=batch.uncertainty, backfilled=backfilled)


def backfill_set(source: EmbeddingSet, chosen: np.ndarray, model: OnnxModel, contract: InputContract,
                 images: ItemImages, dest: str | os.PathLike, lineage: str, extra_files: Mapping[str, bytes],
                 batch_rows: int = 65536, image_batch: int = 256, progress: Progress | None = None) -> EmbeddingSet:
    """Write ``source`` with the ``chosen`` items re-embedded by the backbone to ``dest`` (which may be the source
    itself: a new version of the set), atomically.

    The set is streamed through :func:`iter_backfilled` into
    :func:`~fct_registry.vectors.set_writer.write_embedding_set`, which writes a temp folder beside ``dest`` and
    renames it into place only once complete: an error or a kill at any point leaves ``dest`` as it was. The new
    set keeps the source's model, side-info, metric, normalisation and shard size; its lineage is the source's plus
    ``lineage``; its manifest counts the backfilled items.

    Args:
        source: the verified source set, at the backbone's model.
        chosen: (k,) int64 ids to re-embed now.
        model, contract: the backbone's session (output width = the set's d) and its input contract.
        images: where the items' images are; checked before anything is embedded.
        dest: the new set's folder.
        lineage: the line added to the lineage.
        extra_files: sidecars written with the set (file name -> bytes).
        batch_rows, image_batch, progress: see :func:`iter_backfilled`.

    Raises:
        UpgradeError: the backbone's output width differs from the set's, or it outputs NaN/inf.
        DataError, VersionMismatchError: an image is missing, changed or cannot be decoded.
        EmbeddingSetError: a write problem (see ``write_embedding_set``).
    """
    m = source.manifest
    if model.output_dim != m.dim:
        raise UpgradeError(f"backbone {model.path} outputs {model.output_dim}-d vectors, but set {source.path} "
                           f"holds {m.dim}-d vectors")
    images.check()
    dest = Path(dest)
    batches = iter_backfilled(source, np.asarray(chosen, np.int64), model, contract, images, batch_rows,
                              image_batch, progress)
    return write_embedding_set(dest, batches, m.model, m.side_info_model, metric=m.metric, normalized=m.normalized,
                               lineage=[*m.lineage, lineage], shard_rows=max(s.rows for s in m.shards),
                               overwrite=dest.exists(), extra_files=extra_files)
