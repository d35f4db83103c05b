"""Register the pipeline's model folders in the registry with their compatibility metadata.

Each backbone, side-info model and forward transformation becomes a model version whose tags make it
self-describing: role, embedding dim, inputs, metric and normalisation, the DVC hash of its training data,
the git commit and the params it was trained with; a transformation also gets its source, target and
side-info versions and its measured cross-model CMC top-1/top-5 and mAP.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fct_registry.onnx_boundary.model_card import ModelCard, read_model_card
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import RegisteredVersion, transformation_tags


def _base_tags(card: ModelCard, metric: str, data_hash: str, git_commit: str) -> dict[str, Any]:
    return {"embedding_dim": card.embedding_dim, "inputs": card.inputs, "output": "embedding",
            "metric": metric, "normalized": False, "data_hash": data_hash, "git_commit": git_commit,
            "parity_max_abs_diff": max(card.parity_max_abs_diff.values())}


def publish_model(registry: ModelRegistry, model_dir: str | Path, metric: str, data_hash: str, git_commit: str,
                  params: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> RegisteredVersion:
    """Register ``<model_dir>/model.onnx`` described by its ``model.json`` card (idempotent by content hash).

    A transformation's ``links`` (source, target, side-info refs) must already be registered: their
    MLflow versions go into its tags so the chain planner can use it.

    Args:
        registry: the model registry.
        model_dir: a folder written by :func:`fct_registry.onnx_boundary.model_files.write_model_dir`.
        metric: ``l2`` or ``cosine``, the distance its embeddings are searched with.
        data_hash: DVC md5 of the training data folder (``dvc.lock``).
        git_commit: commit of the code that trained it.
        params: the params.yaml sections it was trained with.
        metrics: measured metrics (fractions), e.g. cross-model ``cmc_top1``, ``cmc_top5``, ``map``.

    Raises:
        RegistryError: a linked model is not registered, or MLflow refuses the version.
        DataError: the model card is missing.
    """
    card = read_model_card(model_dir)
    tags = _base_tags(card, metric, data_hash, git_commit)
    if card.role == "transformation":
        linked = {key: registry.find("side-info" if key == "side_info" else "backbone", ref)
                  for key, ref in card.links.items()}
        tags |= transformation_tags(linked["source"], linked["target"], linked.get("side_info"))
    all_metrics = dict(card.metrics) | dict(metrics or {})
    return registry.register(Path(model_dir) / "model.onnx", card.role, card.ref, tags=tags, params=params,
                             metrics=all_metrics)
