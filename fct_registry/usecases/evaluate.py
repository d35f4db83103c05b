"""Use cases of ``fct-registry evaluate`` and ``search``: score a query model against a stored gallery, find the
nearest gallery items of query images (with their labels, and class names and image files where the set knows them).

ONNX Runtime, faiss and Pillow are imported by the functions that use them, so that importing this module (every
command of the CLI does) stays cheap for the listings.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fct_registry.core.errors import DataError, SearchError
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import RegisteredVersion, input_contract
from fct_registry.usecases.project import image_sources, sets_under
from fct_registry.vectors.embedding_set import MANIFEST, EmbeddingSet, require_same_model

if TYPE_CHECKING:
    from fct_registry.vectors.flips import Flips
    from fct_registry.vectors.search import SearchResult

"""The sidecar that ``sets embed`` writes beside a set made from an image folder (``fct_registry.usecases.sets``,
which this use case may not import): ``{"folder", "classes", "item_ids", "files"}``."""


@dataclass(frozen=True)
class Evaluation:
    """Retrieval of one query model against one gallery set.

    Attributes:
        query: The backbone that embedded the query images.
        gallery: The gallery set.
        n_query: Number of query images.
        metrics: ``cmc_top<k>`` and ``map``, fractions in [0, 1] (protocol of :mod:`fct_registry.vectors.metrics`).
        baseline: The set the gallery was upgraded from, when negative flips were measured against it.
        flips: Negative / positive flips from (baseline model's queries vs ``baseline``) to (``query`` vs
            ``gallery``), or None without a baseline.
    """

    query: RegisteredVersion
    gallery: EmbeddingSet
    n_query: int
    metrics: dict[str, float]
    baseline: EmbeddingSet | None = None
    flips: Flips | None = None


def evaluate_gallery(registry: ModelRegistry, query_version: str, gallery: EmbeddingSet, data_dir: str | os.PathLike,
                     split: str = "test", top_k: Sequence[int] = (1, 5), baseline: EmbeddingSet | None = None
                     ) -> Evaluation:
    """CMC top-k and mAP of a split's images, embedded by a registered backbone, against a stored gallery set.

    Query images (N, C, H, W) uint8 are scaled to [0, 1] and embedded with the version's ONNX file (ONNX
    Runtime). A query's own gallery item (same item id) is excluded; distances use the set's metric.

    With a ``baseline`` (the set the gallery was upgraded from, e.g. :func:`upgrade_source`), the negative flips
    of the update are measured too (Yan et al., CVPR 2021; :mod:`fct_registry.vectors.flips`): before = the same
    images embedded by the baseline's backbone searching the baseline (old/old), after = this evaluation's queries
    (the new backbone's embeddings of the split, as the pipeline's upgrade stage scores an upgraded set) searching
    ``gallery`` (new/upgraded); per-query top-1 hits, own item excluded.

    Raises:
        RegistryError: unknown version, or the baseline's model is not a registered backbone.
        VersionMismatchError: the query model differs from the set's model (upgrade the set first).
        DataError: the prepared split is missing.
        SearchError: bad labels or top_k.
    """
    from fct_registry.method.data import load_prepared
    from fct_registry.onnx_boundary.embedding import embed_images
    from fct_registry.onnx_boundary.runtime import OnnxModel
    from fct_registry.vectors.flips import negative_flips
    from fct_registry.vectors.metrics import retrieval_metrics, top1_correct

    query = registry.get("backbone", query_version)
    require_same_model(query.ref, gallery.manifest.model)
    images = load_prepared(Path(data_dir), split)
    model = OnnxModel(registry.onnx_path(query))
    vectors = embed_images(model, images.images, input_contract(query, model.input_shapes[model.input_names[0]]))
    stored = gallery.read()
    metrics = retrieval_metrics(vectors, images.labels, stored.embeddings, stored.labels, gallery.manifest.metric,
                                query_ids=images.item_ids, gallery_ids=stored.ids, top_k=top_k)
    if baseline is None:
        return Evaluation(query, gallery, len(images), metrics)
    old = registry.find("backbone", baseline.manifest.model)
    old_model = OnnxModel(registry.onnx_path(old))
    old_vectors = embed_images(old_model, images.images,
                               input_contract(old, old_model.input_shapes[old_model.input_names[0]]))
    before_set = baseline.read()
    before = top1_correct(old_vectors, images.labels, before_set.embeddings, before_set.labels,
                          baseline.manifest.metric, query_ids=images.item_ids, gallery_ids=before_set.ids)
    after = top1_correct(vectors, images.labels, stored.embeddings, stored.labels, gallery.manifest.metric,
                         query_ids=images.item_ids, gallery_ids=stored.ids)
    return Evaluation(query, gallery, len(images), metrics, baseline, negative_flips(before, after))


UPGRADE_RECORD = "upgrade.json"
"""The sidecar an upgraded set carries (``PROVENANCE_FILE`` of :mod:`fct_registry.usecases.upgrade`, which this use
case may not import): ``{"source_manifest_sha256", "source_model", "chain"}``."""


def upgrade_source(gallery: EmbeddingSet, sets_root: str | os.PathLike) -> EmbeddingSet | None:
    """The set under ``sets_root`` that ``gallery`` was upgraded from (its manifest's sha256 is the one the
    gallery's upgrade record names), or None: not an upgraded set, or its source is not there."""
    record = gallery.path / UPGRADE_RECORD
    try:
        wanted = json.loads(record.read_text())["source_manifest_sha256"] if record.is_file() else None
    except (ValueError, KeyError, TypeError):
        return None
    if wanted is None:
        return None
    return next((s for s in sets_under(sets_root)
                 if hashlib.sha256((s.path / MANIFEST).read_bytes()).hexdigest() == wanted), None)


@dataclass(frozen=True)
class ImageSearch:
    """Top-k gallery items for query images: the backbone used, the gallery set, and ids/scores per image
    (``result.ids`` (n_query, k) int64, ``result.scores`` (n_query, k) float32, larger is better).

    Attributes:
        labels: (n_query, k) int64, the stored label of each hit (-1: unlabelled item).
        class_names: label -> class name, from the set's ``sources.json`` (a set embedded from a folder of class
            folders); empty when the set does not know them.
        files: item id -> its image, relative to ``folder`` (a set embedded from an image folder); else empty.
        folder: the image folder the set was embedded from, or None.
    """

    model: RegisteredVersion
    gallery: EmbeddingSet
    result: SearchResult
    labels: np.ndarray
    class_names: tuple[str, ...] = ()
    files: dict[int, str] = field(default_factory=dict)
    folder: Path | None = None

    def class_name(self, label: int) -> str | None:
        """The class name of a label, or None (unlabelled, or the set knows no names)."""
        return self.class_names[label] if 0 <= label < len(self.class_names) else None


def gallery_for(model: RegisteredVersion, sets_root: str | os.PathLike) -> EmbeddingSet:
    """The first set under ``sets_root`` (by path) whose vectors come from ``model``.

    Raises:
        SearchError: no set there is at ``model`` (names the sets that exist and their models).
    """
    sets = sets_under(sets_root)
    for embedding_set in sets:
        if embedding_set.manifest.model == model.ref:
            return embedding_set
    found = ", ".join(f"{s.path.name} ({s.manifest.model})" for s in sets) or "none"
    raise SearchError(f"no embedding set under {sets_root} is at {model.ref}; sets: {found} (run upgrade first)")


def search_images(registry: ModelRegistry, images: Sequence[str | os.PathLike], k: int, model_version: str,
                  sets_root: str | os.PathLike, gallery: EmbeddingSet | None = None) -> ImageSearch:
    """Embed query images with a registered backbone and search a gallery set at that backbone.

    Each hit comes with its stored label and, for a set embedded from an image folder (its ``sources.json``), its
    class name and image file (see :class:`ImageSearch`).

    Args:
        registry: The model registry.
        images: PNG/JPEG files; each is decoded and prepared as the backbone's input contract says.
        k: Neighbours per image, 1 <= k <= n_gallery.
        model_version: The backbone (number, label or ``@alias``, e.g. ``@champion``).
        sets_root: Where to look for a gallery when none is given.
        gallery: The set to search; None picks the first set under ``sets_root`` at the backbone.

    Raises:
        RegistryError: unknown version or alias.
        DataError: an image is missing or not PNG/JPEG.
        VersionMismatchError: ``gallery`` holds vectors of another model.
        SearchError: no gallery at the backbone, or bad ``k``.
        EmbeddingSetError: the set's shards or its ``sources.json`` cannot be read.
    """
    from fct_registry.onnx_boundary.embedding import embed_images
    from fct_registry.onnx_boundary.images import read_image
    from fct_registry.onnx_boundary.runtime import OnnxModel
    from fct_registry.vectors.search import GalleryIndex, search_set

    missing = [str(path) for path in images if not Path(path).is_file()]
    if missing:
        raise DataError(f"query image {missing[0]!r} is not a file" + (f" (nor {len(missing) - 1} more)"
                                                                        if len(missing) > 1 else ""))
    model = registry.get("backbone", model_version)
    if gallery is None:
        gallery = gallery_for(model, sets_root)
    require_same_model(model.ref, gallery.manifest.model)
    onnx_model = OnnxModel(registry.onnx_path(model))
    contract = input_contract(model, onnx_model.input_shapes[onnx_model.input_names[0]])
    pixels = np.concatenate([read_image(path, contract) for path in images])
    queries = embed_images(onnx_model, pixels, contract)
    stored = gallery.read()  # once, for the index and the hits' labels
    try:
        index = GalleryIndex(stored.embeddings, gallery.manifest.metric, ids=stored.ids, model=gallery.manifest.model)
    except SearchError as exc:
        raise SearchError(f"embedding set {gallery.path}: {exc}") from None
    result = search_set(index, queries, model.ref, k)
    order = np.argsort(stored.ids, kind="stable")
    labels = stored.labels[order[np.searchsorted(stored.ids, result.ids, sorter=order)]].astype(np.int64)
    sources = image_sources(gallery)
    if sources is None:
        return ImageSearch(model, gallery, result, labels, (), {}, None)
    return ImageSearch(model, gallery, result, labels, sources.classes, sources.files, sources.folder)
