"""Register models in the registry with their compatibility metadata: the pipeline's model folders and user files.

Each backbone, side-info model and forward transformation becomes a model version whose tags make it
self-describing: role, embedding dim, inputs, metric and normalisation, where it came from (``fct.origin``:
``pipeline`` or ``user``); the pipeline's models also the DVC hash of their training data, the git commit and the
params they were trained with; a transformation also gets its source, target and side-info versions, its kind
(:data:`TRANSFORMATION_KIND_TAG`: ``fct`` or ``fastfill``) and its measured cross-model CMC top-1/top-5 and mAP.
Every image model (backbone, side-info) carries its input contract (``fct.input_contract``, see
:mod:`fct_registry.onnx_boundary.contract`): both paths go through :func:`register_image_model`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from fct_registry.core.errors import RegistryError
from fct_registry.core.refs import ModelRef
from fct_registry.onnx_boundary.contract import CONTRACT_TAG, InputContract, contract_from_tags, parse_contract
from fct_registry.onnx_boundary.model_card import ModelCard, read_model_card
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import RegisteredVersion, transformation_tags

IMAGE_ROLES = ("backbone", "side-info")
METRICS = ("l2", "cosine")
Origin = Literal["pipeline", "user"]


def image_model_tags(contract: InputContract, embedding_dim: int, inputs: Mapping[str, Sequence[int]], metric: str,
                     normalized: bool, origin: Origin) -> dict[str, Any]:
    """The tags every registered image model carries (keys without the ``fct.`` prefix that ``register`` adds).

    Args:
        contract: How images are prepared for the model (stored as JSON under ``fct.input_contract``).
        embedding_dim: d of its (B, d) output.
        inputs: ONNX input name -> trailing shape after the batch axis, e.g. ``{"image": [3, 224, 224]}``.
        metric: ``l2`` or ``cosine``, the distance its embeddings are searched with.
        normalized: Whether its output rows have unit L2 norm.
        origin: ``pipeline`` (trained by this project's DVC pipeline) or ``user`` (``fct-registry models add``).

    Raises:
        RegistryError: ``metric`` is not ``l2`` or ``cosine``.
    """
    if metric not in METRICS:
        raise RegistryError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    return {"input_contract": contract.to_json(), "embedding_dim": embedding_dim,
            "inputs": {name: list(shape) for name, shape in inputs.items()}, "output": "embedding", "metric": metric,
            "normalized": normalized, "origin": origin}


def register_image_model(registry: ModelRegistry, onnx_path: str | Path, role: str, ref: ModelRef,
                         contract: InputContract, embedding_dim: int, inputs: Mapping[str, Sequence[int]],
                         metric: str, normalized: bool, origin: Origin, tags: Mapping[str, Any] | None = None,
                         params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None
                         ) -> RegisteredVersion:
    """Register a checked image model (backbone or side-info) with :func:`image_model_tags` plus ``tags``.

    The file must already be validated (the pipeline's exports by their parity checks, a user's file by
    :func:`fct_registry.onnx_boundary.validation.validate_image_model`). Idempotent by content: the same bytes
    return the version already registered; when that version predates input contracts, the contract tag is added.

    Args:
        registry: The model registry.
        onnx_path: Self-contained ``.onnx`` file whose sha256 is ``ref.sha256``.
        role: ``backbone`` or ``side-info``.
        ref: Its identity (label + sha256).
        contract, embedding_dim, inputs, metric, normalized, origin: See :func:`image_model_tags`.
        tags: Further tags (e.g. ``data_hash``, ``description``).
        params: Training params (``fct.params``), if any.
        metrics: Measured metrics, if any.

    Returns:
        The new or already registered version.

    Raises:
        RegistryError: ``role`` is not an image role, ``metric`` is unknown, the bytes are registered under another
            label or with a different input contract, or MLflow refuses the version (see
            :meth:`ModelRegistry.register`).
    """
    if role not in IMAGE_ROLES:
        raise RegistryError(f"role {role!r} is not an image model role; expected one of {', '.join(IMAGE_ROLES)}")
    all_tags = image_model_tags(contract, embedding_dim, inputs, metric, normalized, origin) | dict(tags or {})
    version = registry.register(onnx_path, role, ref, tags=all_tags, params=params, metrics=metrics)
    if CONTRACT_TAG not in version.tags:
        return registry.set_tags(version, {CONTRACT_TAG: contract.to_json()})
    registered = parse_contract(version.tags[CONTRACT_TAG], str(version))
    if registered != contract:
        raise RegistryError(f"these ONNX bytes are already registered as {version} with input contract "
                            f"{registered.to_json()}; refusing a different contract {contract.to_json()}")
    return version


def _base_tags(card: ModelCard, metric: str, data_hash: str, git_commit: str) -> dict[str, Any]:
    return {"embedding_dim": card.embedding_dim, "inputs": card.inputs, "output": "embedding",
            "metric": metric, "normalized": False, "data_hash": data_hash, "git_commit": git_commit,
            "parity_max_abs_diff": max(card.parity_max_abs_diff.values()), "origin": "pipeline"}


def publish_model(registry: ModelRegistry, model_dir: str | Path, metric: str, data_hash: str, git_commit: str,
                  params: Mapping[str, Any], metrics: Mapping[str, float] | None = None,
                  extra_tags: Mapping[str, Any] | None = None) -> RegisteredVersion:
    """Register ``<model_dir>/model.onnx`` described by its ``model.json`` card (idempotent by content hash).

    A backbone or side-info model goes through :func:`register_image_model` with the project's own input contract
    (grayscale at the card's (H, W), pixels scaled to [0, 1]; see
    :func:`~fct_registry.onnx_boundary.contract.contract_from_tags`). A transformation's ``links`` (source, target,
    side-info refs) must already be registered: their MLflow versions go into its tags so the chain planner can use
    it.

    Args:
        registry: the model registry.
        model_dir: a folder written by :func:`fct_registry.onnx_boundary.model_files.write_model_dir`.
        metric: ``l2`` or ``cosine``, the distance its embeddings are searched with.
        data_hash: DVC md5 of the training data folder (``dvc.lock``).
        git_commit: commit of the code that trained it.
        params: the params.yaml sections it was trained with.
        metrics: measured metrics (fractions) of these very bytes, e.g. cross-model ``cmc_top1``, ``cmc_top5``,
            ``map``; stored as ``fct.<key>`` tags.
        extra_tags: more version tags (e.g. ``seed``, and ``seed_spread``: the same metrics over every seed
            trained, which describe the recipe rather than this file).

    Raises:
        RegistryError: a linked model is not registered, or MLflow refuses the version.
        DataError: the model card is missing, or an image model's input is not (B, 1, H, W).
    """
    card = read_model_card(model_dir)
    tags = _base_tags(card, metric, data_hash, git_commit) | dict(extra_tags or {})
    onnx_path = Path(model_dir) / "model.onnx"
    all_metrics = dict(card.metrics) | dict(metrics or {})
    if card.role in IMAGE_ROLES:
        contract = contract_from_tags({}, ("batch", *card.inputs["image"]), str(card.ref))
        return register_image_model(registry, onnx_path, card.role, card.ref, contract, card.embedding_dim,
                                    card.inputs, metric, False, "pipeline", tags=tags, params=params,
                                    metrics=all_metrics)
    linked = {key: registry.find("side-info" if key == "side_info" else "backbone", ref)
              for key, ref in card.links.items()}
    tags |= transformation_tags(linked["source"], linked["target"], linked.get("side_info"))
    tags[TRANSFORMATION_KIND_TAG] = transformation_kind(onnx_path)
    return registry.register(onnx_path, card.role, card.ref, tags=tags, params=params, metrics=all_metrics)


TRANSFORMATION_KIND_TAG = "fct.transformation_kind"
"""Tag of a registered transformation saying its kind: ``fastfill`` (its ONNX file also outputs ``uncertainty``
(B, 1), FastFill's per-item log-variance: Jaeckle et al., ICLR 2023, arXiv 2303.04766) or ``fct`` (the embedding
only: FCT, Ramanujan et al., CVPR 2022)."""


def transformation_kind(onnx_path: str | Path) -> Literal["fastfill", "fct"]:
    """``fastfill`` when the transformation's ONNX file has the ``uncertainty`` output, else ``fct``.

    Raises:
        RuntimeInputError: the file does not load as an embedding model (see
            :class:`~fct_registry.onnx_boundary.runtime.OnnxModel`).
    """
    from fct_registry.onnx_boundary.runtime import OnnxModel  # onnxruntime, loaded only to register

    return "fastfill" if OnnxModel(onnx_path, providers=["CPUExecutionProvider"]).has_uncertainty else "fct"
