"""Use cases of ``fct-registry sets``: list the stored embedding sets, embed a gallery into a new set."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fct_registry.core.refs import ModelRef
from fct_registry.method.data import Split
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import RegisteredVersion
from fct_registry.usecases.project import sets_under
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.set_writer import write_embedding_set


@dataclass(frozen=True)
class SetEntry:
    """An embedding set and the registered backbone version its vectors come from (None: not registered)."""

    embedding_set: EmbeddingSet
    backbone: RegisteredVersion | None


def list_sets(registry: ModelRegistry, sets_root: str | os.PathLike) -> list[SetEntry]:
    """Every embedding set under ``sets_root`` (sorted by path) with its registered backbone version.

    Raises:
        EmbeddingSetError: a set under ``sets_root`` has an invalid manifest.
    """
    backbones = {version.ref: version for version in registry.versions("backbone")}
    return [SetEntry(s, backbones.get(s.manifest.model)) for s in sets_under(sets_root)]


def build_gallery(split: Split, backbone: Path, backbone_ref: ModelRef, side_info: Path | None,
                  side_info_ref: ModelRef | None, out: Path, metric: str) -> EmbeddingSet:
    """Embed a split with the backbone (and side-info model) and store it as an embedding set.

    Args:
        split: gallery images (N, C, H, W) uint8 with labels and item ids.
        backbone: the backbone's ``.onnx`` file; ``backbone_ref`` its identity.
        side_info: the side-info model's ``.onnx`` file or None; ``side_info_ref`` its identity.
        out: the set's folder (replaced atomically when it exists).
        metric: ``l2`` or ``cosine``, recorded in the manifest for every later search.

    Raises:
        EmbeddingSetError: non-finite vectors or a bad output folder.
    """
    embeddings = embed_images(OnnxModel(backbone), split.images)
    side = embed_images(OnnxModel(side_info), split.images) if side_info is not None else None
    batch = EmbeddingBatch(split.item_ids, split.labels, embeddings, side)
    lineage = [f"gallery embedded by {backbone_ref}" + (f" with side-info {side_info_ref}" if side_info_ref else "")]
    return write_embedding_set(out, [batch], backbone_ref, side_info_ref, metric=metric, lineage=lineage,
                               overwrite=out.exists())
