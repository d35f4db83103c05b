"""Embedding images and stored galleries with exported (ONNX) models.

Everything that crosses the registry boundary runs through ONNX Runtime, so the vectors stored in an
embedding set come from exactly the file whose sha256 the set's manifest names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fct_registry.data import Split
from fct_registry.embedding_set import EmbeddingBatch, EmbeddingSet, ModelRef, write_embedding_set
from fct_registry.runtime import OnnxModel


def embed_images(model: OnnxModel, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Embed uint8 images (N, C, H, W) with an image model -> (N, d) float32 (pixels scaled to [0, 1])."""
    chunks = [model.run(image=images[i:i + batch_size].astype(np.float32) / 255.0)
              for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, model.output_dim), np.float32)


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
