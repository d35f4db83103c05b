"""Use case of the ``backfill_curve`` stage: FastFill's backfill curves of a stored gallery (Jaeckle et al., ICLR
2023, arXiv 2303.04766, Sec. 5).

The stored gallery is upgraded by each h over its stored vectors only (the upgrade engine's ``apply_chain``), then
backfilled with the new backbone's vectors of the same items in each order (see
:mod:`fct_registry.vectors.backfill_curve`); queries are a seeded sample of the items embedded by the new backbone,
the gallery all of them (own item excluded); negative flips are counted against the old model's own search.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from fct_registry.engines.chain import apply_chain, chain_step
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.vectors.backfill_curve import backfill_curve, backfill_order
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.metrics import retrieval_metrics, top1_correct
from fct_registry.vectors.search import Metric

Curves = dict[str, list[list[dict[str, float]]]]


def query_sample(n: int, queries: int, seed: int) -> np.ndarray:
    """Sorted positions (min(queries, n),) int64 of the items used as queries, drawn without replacement."""
    return np.sort(np.random.default_rng(seed).choice(n, min(queries, n), replace=False))


def reference_metrics(gallery: EmbeddingBatch, new: np.ndarray, old_queries: np.ndarray, rows: np.ndarray,
                      metric: Metric, top_k: Sequence[int]) -> tuple[dict[str, dict[str, float]], np.ndarray]:
    """``old_vs_old`` and ``new_vs_new`` of the sampled queries, and old/old's per-query top-1 correctness (the
    "before" of negative flips).

    Args:
        gallery: the stored old gallery (ids, labels, embeddings (n, d_old)).
        new: (n, d_new) float32 the new backbone's embeddings of the same items, in the same order.
        old_queries: (len(rows), d_old) float32 the old backbone's embeddings of the query items.
        rows: positions of the query items (:func:`query_sample`).
    """
    labels, ids = gallery.labels[rows], gallery.ids[rows]
    old = (old_queries, labels, gallery.embeddings, gallery.labels, metric, ids, gallery.ids)
    reference = {"old_vs_old": retrieval_metrics(*old, top_k=top_k),
                 "new_vs_new": retrieval_metrics(new[rows], labels, new, gallery.labels, metric, ids, gallery.ids,
                                                 top_k=top_k)}
    return reference, top1_correct(*old)


def measure_curves(gallery: EmbeddingBatch, new: np.ndarray, rows: np.ndarray, before: np.ndarray,
                   h_dirs: Mapping[str, Sequence[Path]], metric: Metric, top_k: Sequence[int], points: int,
                   seed: int, oracle_seeds: int, on_curve: Callable[[str, int, list], None] | None = None) -> Curves:
    """Every backfill curve, per seed of h.

    Args:
        gallery: the stored old gallery (embeddings (n, d_old), side_info (n, d_side) or None).
        new: (n, d_new) float32 new-backbone embeddings of the gallery items (the backfilled vectors and queries).
        rows: query positions; before: (len(rows),) bool old/old top-1 correctness.
        h_dirs: model folders of h per seed, keyed ``fct``, ``fastfill``, ``fct_noside``, ``fastfill_noside`` (the
            FastFill h must output its uncertainty).
        metric, top_k, points: the curves' protocol.
        seed: of the random order (plus the seed index, so each seed of h gets its own permutation).
        oracle_seeds: the first seeds that also get the ``fastfill_random`` and ``distance_oracle`` curves.
        on_curve: called with (curve name, seed index, curve) after each curve.

    Returns:
        Curve name (``fct_random``, ``fastfill_uncertainty``, ``fastfill_random``, ``distance_oracle``, each also
        ``_noside``) -> one curve per seed.
    """
    curves: Curves = {}
    query = (new[rows], gallery.labels[rows], gallery.ids[rows])
    for side in ("", "_noside"):
        for i, (fct_dir, ff_dir) in enumerate(zip(h_dirs[f"fct{side}"], h_dirs[f"fastfill{side}"], strict=True)):
            fct, _ = _transform(fct_dir, gallery)
            ff, sigma = _transform(ff_dir, gallery)
            random = backfill_order("random", len(new), seed=seed + i)
            runs = {"fct_random": (fct, random),
                    "fastfill_uncertainty": (ff, backfill_order("uncertainty", len(new), sigma=sigma))}
            if i < oracle_seeds:
                distance = np.linalg.norm(new - ff, axis=1)
                runs |= {"fastfill_random": (ff, random),
                         "distance_oracle": (ff, backfill_order("distance", len(new), distance=distance))}
            for kind, (vectors, order) in runs.items():
                curve = backfill_curve(*query, vectors, new, gallery.labels, gallery.ids, order, metric, top_k,
                                       before, points)
                curves.setdefault(kind + side, []).append(curve)
                if on_curve is not None:
                    on_curve(kind + side, i, curve)
    return curves


def _transform(model_dir: Path, gallery: EmbeddingBatch) -> tuple[np.ndarray, np.ndarray | None]:
    step = chain_step(model_dir)
    return apply_chain([OnnxModel(step.onnx_path)], [step], gallery.embeddings, gallery.side_info)
