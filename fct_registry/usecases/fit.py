"""Use case of ``fct-registry fit``: train, verify, evaluate and register a forward transformation between two
registered backbones.

The forward transformation h(old embedding, side-info) -> new embedding is FCT's (Ramanujan et al., CVPR 2022,
arXiv 2112.02805, Sec. 3; reference code apple/ml-fct), trained with MSE on cached features by the same function as
the ``train_transformations`` pipeline stage (:func:`fct_registry.method.training.train_transformation`). Its
training pairs come either from a folder of images, embedded through ONNX Runtime by each registered model with its
own input contract and cached (:mod:`fct_registry.usecases.features`), or from a Parquet file of vectors (any
modality: the images are not needed).

Validation (what is registered as the version's ``fct.*`` metric tags):

- labelled items (class folders, or a ``label`` column >= 0): FCT's cross-model retrieval (Sec. 5): queries are the
  NEW model's embeddings, the gallery is h(old[, side-info]) of the same items, each query's own item excluded;
  CMC top-k (``cmc_top1``, ``cmc_top5``, ...) and ``map`` (:func:`fct_registry.vectors.metrics.retrieval_metrics`),
  plus ``old_old_*`` and ``new_new_*`` (each model against itself) for reference, and ``negative_flips`` (the
  share of validation items whose top-1 neighbour is right under old/old and wrong under new-vs-h(old); Yan et al.,
  CVPR 2021) with ``positive_flips`` (the reverse);
- always, the label-free ``knn_overlap``: for each validation item i, the set A_i of its k nearest neighbours among
  the other items' NEW embeddings and the set B_i of its k nearest among the other items' h(old) vectors, both
  searched with the new embedding of i; ``knn_overlap = mean_i |A_i ∩ B_i| / k`` in [0, 1], with k = min(10, N_val -
  1). 1 means h(old) reproduces the new model's neighbourhoods; a random h scores about k / (N_val - 1).

Nothing is registered until everything else has succeeded: h is exported (with ONNX Runtime parity checks) into a
temp folder that is removed afterwards, and the registration (:func:`fct_registry.registry.publishing.publish_model`)
is the last step, so a failed or interrupted fit leaves the registry unchanged (only the feature cache may be filled).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from fct_registry.core.config import TransformationParams, load_params
from fct_registry.core.errors import ConfigError
from fct_registry.core.refs import ModelRef
from fct_registry.onnx_boundary.model_card import ModelCard
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.publishing import publish_model
from fct_registry.registry.versions import RegisteredVersion
from fct_registry.usecases.features import FeatureProgress, Features
from fct_registry.usecases.fit_data import FitData, FitModels, image_data, pairs_data, resolve_models
from fct_registry.usecases.project import PARAMS_FILE, load_settings

if TYPE_CHECKING:
    from fct_registry.method.classifier import LinearClassifier
    from fct_registry.method.training import FeatureEpoch

OVERLAP_K = 10
EpochProgress = Callable[[int, int, float], None]
"""``(epoch, epochs, train_mse)`` after each training epoch, epoch counted from 1."""

@dataclass(frozen=True)
class FitResult:
    """A registered transformation and what was measured.

    Attributes:
        version: The registered transformation version (tags ``fct.source_*``, ``fct.target_*``,
            ``fct.side_info_*`` and one ``fct.<metric>`` per key of ``metrics``).
        metrics: Registered metrics: ``train_mse``, ``seconds``, ``knn_overlap``, and with labels ``cmc_top<k>``,
            ``map``, ``old_old_*``, ``new_new_*``, ``negative_flips``, ``positive_flips``.
        labelled: Whether CMC / mAP were measured.
        n_train: Training rows.
        n_val: Validation rows.
        features: The cached feature files used (image folders only); ``from_cache`` tells whether each was reused.
    """

    version: RegisteredVersion
    metrics: dict[str, float]
    labelled: bool
    n_train: int
    n_val: int
    features: tuple[Features, ...] = field(default=())


def transformation_params(root: str | os.PathLike, params_file: str = PARAMS_FILE, **overrides: Any
                          ) -> TransformationParams:
    """The ``transformation:`` section of ``<root>/<params_file>`` (defaults without the file), with ``overrides``
    (e.g. ``epochs=5``; None values are ignored) applied and validated.

    Raises:
        ConfigError: the params file is invalid, or an override is unknown or out of range (names it).
    """
    path = Path(root) / params_file
    params = load_params(path).transformation if path.is_file() else TransformationParams()
    changes = {key: value for key, value in overrides.items() if value is not None}
    try:
        return TransformationParams.model_validate(params.model_dump() | changes)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"transformation.{where}: {first['msg']} (got {first.get('input')!r})") from None


def current_commit(root: str | os.PathLike) -> str:
    """The git commit checked out at ``root`` (recorded as ``fct.git_commit``), or ``"unknown"``."""
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


# ----- evaluation -----------------------------------------------------------------------------------------------


def apply_onnx(onnx_path: str | os.PathLike, old: np.ndarray, side_info: np.ndarray | None,
               batch_rows: int = 65536) -> np.ndarray:
    """Run an exported transformation: old (N, d_old) [+ side-info (N, d_side)] float32 -> (N, d_new) float32.

    Raises:
        RuntimeInputError: the file does not load or the widths differ from its inputs.
    """
    from fct_registry.onnx_boundary.runtime import OnnxModel  # onnxruntime, loaded only to run it

    model = OnnxModel(onnx_path)
    chunks = []
    for start in range(0, len(old), batch_rows):
        feed = {"old_embedding": old[start:start + batch_rows]}
        if side_info is not None:
            feed["side_info"] = side_info[start:start + batch_rows]
        chunks.append(model.run(**feed))
    return np.concatenate(chunks)


def validation_metrics(onnx_path: str | os.PathLike, data: FitData, metric: str, top_k: Sequence[int] = (1, 5)
                       ) -> dict[str, float]:
    """Measure an exported h on the validation rows (see the module docstring for the protocol).

    Returns:
        ``knn_overlap`` and, with labels, ``cmc_top<k>`` and ``map`` of new-vs-h(old), ``old_old_*``,
        ``new_new_*``, and ``negative_flips`` / ``positive_flips`` (validation items whose top-1 neighbour was
        right under old/old and is wrong under new-vs-h(old), and the reverse; Yan et al., CVPR 2021); fractions
        in [0, 1].

    Raises:
        SearchError: non-finite vectors (e.g. a diverged h).
    """
    from fct_registry.vectors.flips import negative_flips
    from fct_registry.vectors.metrics import knn_overlap, retrieval_metrics, top1_correct  # faiss: only to validate

    old, side, new = data.val
    transformed = apply_onnx(onnx_path, old, side)
    metrics = {"knn_overlap": knn_overlap(new, transformed, metric, OVERLAP_K)}
    if data.val_labels is not None:
        labels, ids = data.val_labels, np.arange(len(new), dtype=np.int64)
        score = lambda query, gallery: retrieval_metrics(query, labels, gallery, labels, metric, ids, ids,  # noqa: E731
                                                         top_k=top_k)
        metrics |= score(new, transformed)
        metrics |= {f"old_old_{key}": value for key, value in score(old, old).items()}
        metrics |= {f"new_new_{key}": value for key, value in score(new, new).items()}
        top1 = lambda query, gallery: top1_correct(query, labels, gallery, labels, metric, ids, ids)  # noqa: E731
        metrics |= negative_flips(top1(old, old), top1(new, transformed)).metrics()
    return metrics


# ----- the use case ---------------------------------------------------------------------------------------------


def fit_transformation(registry: ModelRegistry, source: str, target: str, side_info: str | None = None, *,
                       train: str | os.PathLike | None = None, val: str | os.PathLike | None = None,
                       pairs: str | os.PathLike | None = None, val_fraction: float = 0.1,
                       params: TransformationParams | None = None, seed: int | None = None, label: str | None = None,
                       metric: str | None = None, top_k: Sequence[int] | None = None,
                       git_commit: str | None = None, on_features: FeatureProgress | None = None,
                       on_epoch: EpochProgress | None = None) -> FitResult:
    """Fit h(source[, side-info]) -> target (FCT Sec. 3), export it with parity checks, validate and register it.

    Give exactly one of ``train`` (image folder) and ``pairs`` (Parquet file of vectors). Training is
    :func:`fct_registry.method.training.train_transformation` on cached features, as in the pipeline.

    Args:
        registry: The model registry (its root holds params.yaml and the feature cache).
        source: Source backbone (number, label or ``@alias``); its embeddings (N, d_old) are h's input.
        target: Target backbone; h maps into its space (N, d_new).
        side_info: Side-info model whose (N, d_side) vectors h also reads; None fits the ablation without it.
        train: Training image folder (see :func:`image_data`).
        val: Validation image folder; None holds out ``val_fraction`` of the training items.
        pairs: Parquet file of vectors (see :func:`pairs_data`).
        val_fraction: Held-out fraction when there is no ``val`` folder.
        params: Hyperparameters; None: ``transformation:`` of params.yaml (see :func:`transformation_params`).
        seed: Seeds training and the hold-out; None: ``params.seeds[0]``.
        label: Project label of the new version; None: :meth:`FitModels.default_label` (``h-v1-v2``).
        metric: ``l2`` or ``cosine`` for validation and the ``fct.metric`` tag; None: ``evaluation.metric``.
        top_k: CMC ranks; None: ``evaluation.top_k``.
        git_commit: Recorded as ``fct.git_commit``; None: the commit checked out at the registry's root.
        on_features: Feature-extraction progress callback.
        on_epoch: Training progress callback, ``(epoch from 1, epochs, train_mse)``.

    Returns:
        The registered version and its metrics.

    Raises:
        ConfigError: neither or both of ``train`` and ``pairs``, ``val`` with ``pairs``, invalid params.
        RegistryError: unknown model version, source == target, or registration refused.
        DataError: bad image folder or pairs file (missing column, widths differing from the models', too few rows).
        ExportError: the ONNX export of h fails its parity checks.
    """
    if (train is None) == (pairs is None):
        raise ConfigError("give exactly one source of training pairs: an image folder (--train) or a Parquet file "
                          "(--pairs)")
    if pairs is not None and val is not None:
        raise ConfigError("--val is an image folder; with --pairs the validation rows are held out (--val-fraction)")
    settings = load_settings(registry.root)
    params = params if params is not None else transformation_params(registry.root)
    seed = seed if seed is not None else params.seeds[0]
    metric = metric or settings.evaluation.metric
    models = resolve_models(registry, source, target, side_info)
    label = label or models.default_label()
    if pairs is not None:
        data = pairs_data(pairs, models, val_fraction, seed)
    else:
        data = image_data(registry, models, train, val, val_fraction, seed, on_features)
    return _train_and_register(registry, models, data, params, seed, label, metric,
                               list(top_k or settings.evaluation.top_k),
                               git_commit or current_commit(registry.root), on_epoch)


def train_to_model_dir(features: FeatureEpoch, params: TransformationParams, seed: int, label: str,
                       links: dict[str, ModelRef], out_dir: str | os.PathLike,
                       on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                       fastfill: tuple[np.ndarray, LinearClassifier] | None = None
                       ) -> tuple[ModelCard, dict[str, float]]:
    """Train h (FCT Sec. 3) and write its model folder: the one training path of ``fit`` and the DVC pipeline.

    Args:
        features: Training rows per epoch, e.g. ``cached_features(old (N, d_old), side (N, d_side) or None,
            new (N, d_new))`` (:mod:`fct_registry.method.training`).
        params: Hyperparameters (``transformation:`` of params.yaml).
        seed: Seeds initialisation and batch order.
        label: The transformation's project label, e.g. ``h-v1-v2``.
        links: ``source``, ``target`` and optionally ``side_info`` model refs.
        out_dir: The model folder to write (``model.pt``, ``model.onnx`` checked against torch, ``model.json``).
        on_epoch: Optional ``(epoch from 0, {"train_mse": ...})`` callback.
        fastfill: With ``params.loss == "fastfill"``: the training rows' labels (N,) int64 and the target backbone's
            classifier (FastFill, Jaeckle et al., ICLR 2023); h then also outputs its uncertainty.

    Returns:
        The folder's model card and the training metrics (``train_mse``, ``seconds``).

    Raises:
        ExportError: the ONNX export fails its parity checks.
    """
    from fct_registry.method.training import train_transformation  # torch, loaded only to train
    from fct_registry.onnx_boundary.model_files import write_model_dir

    h, train_metrics = train_transformation(features, params, seed, on_epoch=on_epoch, fastfill=fastfill)
    return write_model_dir(h, out_dir, "transformation", label, train_metrics, links=links), train_metrics


def _train_and_register(registry: ModelRegistry, models: FitModels, data: FitData, params: TransformationParams,
                        seed: int, label: str, metric: str, top_k: list[int], git_commit: str,
                        on_epoch: EpochProgress | None) -> FitResult:
    from fct_registry.method.training import cached_features  # torch, loaded only to fit

    epoch_callback = None
    if on_epoch is not None:
        epoch_callback = lambda epoch, values: on_epoch(epoch + 1, params.epochs, values["train_mse"])  # noqa: E731
    links = {"source": models.source.ref, "target": models.target.ref}
    if models.side_info is not None:
        links["side_info"] = models.side_info.ref
    fastfill, probe = _fastfill_targets(data, params, seed)
    with tempfile.TemporaryDirectory(prefix="fct-fit-") as tmp:
        model_dir = Path(tmp) / label
        _, train_metrics = train_to_model_dir(cached_features(*data.train), params, seed, label, links, model_dir,
                                              epoch_callback, fastfill)
        train_metrics = dict(train_metrics) | probe
        metrics = validation_metrics(model_dir / "model.onnx", data, metric, top_k)
        run_params = {"transformation": params.model_dump(mode="json"), "seed": seed,
                      "source": str(models.source.ref), "target": str(models.target.ref),
                      "side_info": str(models.side_info.ref) if models.side_info else None,
                      "overlap_k": min(OVERLAP_K, len(data.val[0]) - 1), **data.inputs,
                      **({"classifier": CLASSIFIER_NOTE} if fastfill is not None else {})}
        version = publish_model(registry, model_dir, metric, data.data_hash, git_commit, run_params, metrics)
    return FitResult(version, train_metrics | metrics, data.val_labels is not None, len(data.train[0]),
                     len(data.val[0]), data.features)


CLASSIFIER_NOTE = "linear classifier fitted on the target backbone's embeddings of the labelled training items"
"""What FastFill's W_new is in ``fit``: registered backbones carry no classification head, so one is fitted."""


def _fastfill_targets(data: FitData, params: TransformationParams, seed: int
                      ) -> tuple[tuple[np.ndarray, LinearClassifier] | None, dict[str, float]]:
    """For the FastFill loss, the training labels and W_new (a linear probe, see :data:`CLASSIFIER_NOTE`) with its
    training accuracy as ``classifier_accuracy``; (None, {}) for MSE.

    Raises:
        ConfigError: the FastFill loss without a label >= 0 on every training item.
    """
    if params.loss != "fastfill":
        return None, {}
    if data.train_labels is None:
        raise ConfigError("the fastfill loss needs a class label on every training item (class folders, or a label "
                          "column >= 0); use --loss mse for unlabelled data")
    from fct_registry.method.classifier import fit_linear_classifier  # torch, loaded only to fit

    classifier, accuracy = fit_linear_classifier(data.train[2], data.train_labels, seed)
    return (data.train_labels, classifier), {"classifier_accuracy": accuracy}
