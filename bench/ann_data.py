"""Galleries for the serving benchmark: vectors with real structure (the v2 backbone's embeddings of the 70,000
Fashion-MNIST images, replicated with small noise to the size) and i.i.d. standard-normal vectors, written as
embedding sets in batches (memory flat in the size).

Noise of the replicas: isotropic Gaussian with per-coordinate sigma = (median 1-NN distance among the 70,000
embeddings) / sqrt(d), so a replica lies about one typical neighbour distance from its original and the replicas of
one image are as far from each other as its ~10th real neighbour: the true top-10 of a query mixes replicas and
other images, instead of being 10 copies of itself (which would flatter every index).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fct_registry.core.refs import ModelRef
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.set_writer import write_embedding_set

BATCH_ROWS = 65536


@dataclass(frozen=True)
class Base:
    """The 70,000 Fashion-MNIST images (N, 1, 28, 28) uint8, their labels and the backbone's embeddings (N, d)."""

    images: np.ndarray
    labels: np.ndarray
    embeddings: np.ndarray
    noise_sigma: float
    median_nn: float


def fashion_mnist_base(data_dir: Path, model_onnx: Path, seed: int = 0) -> Base:
    """Embed train + test of ``data_dir`` (the prepare stage's ``{train,test}.npz``) with ``model_onnx``."""
    from fct_registry.method.data import load_prepared
    from fct_registry.onnx_boundary.embedding import embed_images
    from fct_registry.onnx_boundary.runtime import OnnxModel
    from fct_registry.vectors.search import GalleryIndex

    splits = [load_prepared(data_dir, name) for name in ("train", "test")]
    images = np.concatenate([s.images for s in splits])
    labels = np.concatenate([s.labels for s in splits])
    embeddings = embed_images(OnnxModel(model_onnx, providers=["CPUExecutionProvider"]), images)
    sample = np.random.default_rng(seed).choice(len(embeddings), 2000, replace=False)
    nearest = GalleryIndex(embeddings, "l2").search(embeddings[sample], 1, exclude_self=True, query_ids=sample)
    median_nn = float(np.median(-nearest.scores[:, 0]))
    return Base(images, labels, embeddings, median_nn / np.sqrt(embeddings.shape[1]), median_nn)


def replicas(base: Base, positions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(len(positions), d) float32: the base embeddings at ``positions`` plus fresh noise of ``base.noise_sigma``."""
    noise = rng.standard_normal((len(positions), base.embeddings.shape[1]), dtype=np.float32)
    return base.embeddings[positions] + noise * np.float32(base.noise_sigma)


def structured_set(path: Path, rows: int, base: Base, model: ModelRef, seed: int = 0) -> EmbeddingSet:
    """``rows`` items: the 70,000 embeddings themselves, then replicas of uniformly drawn ones; labels: their class."""
    rng = np.random.default_rng(seed)

    def batches() -> Iterator[EmbeddingBatch]:
        for start in range(0, rows, BATCH_ROWS):
            stop = min(rows, start + BATCH_ROWS)
            positions = np.arange(start, stop)
            copies = positions >= len(base.embeddings)
            positions[copies] = rng.integers(0, len(base.embeddings), int(copies.sum()))
            vectors = base.embeddings[positions].copy()
            vectors[copies] = replicas(base, positions[copies], rng)
            yield EmbeddingBatch(np.arange(start, stop), base.labels[positions], vectors, model=model)

    return write_embedding_set(path, batches(), model, lineage=[f"bench: {rows} Fashion-MNIST embeddings + replicas"],
                               shard_rows=BATCH_ROWS, overwrite=path.exists())


def gaussian_set(path: Path, rows: int, dim: int, model: ModelRef, seed: int = 0) -> EmbeddingSet:
    """``rows`` i.i.d. standard-normal (rows, dim) float32 vectors, labels -1."""
    rng = np.random.default_rng(seed)

    def batches() -> Iterator[EmbeddingBatch]:
        for start in range(0, rows, BATCH_ROWS):
            n = min(BATCH_ROWS, rows - start)
            yield EmbeddingBatch(np.arange(start, start + n), np.full(n, -1),
                                 rng.standard_normal((n, dim), dtype=np.float32), model=model)

    return write_embedding_set(path, batches(), model, lineage=[f"bench: {rows} standard-normal rows"],
                               shard_rows=BATCH_ROWS, overwrite=path.exists())


def png(pixels: np.ndarray) -> bytes:
    """(H, W) uint8 -> PNG bytes."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()
