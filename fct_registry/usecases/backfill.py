"""Use case of ``fct-registry backfill``: re-embed part of an upgraded set with its backbone, in FastFill's order.

FastFill (Jaeckle, Faghri, Farhadi, Tuzel, Pouransari, ICLR 2023, arXiv 2303.04766): after the cheap upgrade
(forward transformations only), the gallery is backfilled gradually, most uncertain items first (the last
transformation's predicted log-variance sigma, stored as the set's ``uncertainty`` column), and the mixed gallery
approaches new/new retrieval after a small fraction. Each run writes a new version of the set (in place, or at
``dest``) where the first ``round(F * count)`` items of the order carry the backbone's vectors of their images, read
again through the set's ``sources.json`` (:func:`~fct_registry.usecases.project.item_sources`); a later run with a
larger fraction continues where this one stopped. A :data:`BACKFILL_FILE` sidecar and an MLflow run record it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fct_registry.core.errors import DataError, EmbeddingSetError, UpgradeError, VersionMismatchError
from fct_registry.engines.backfill import (
    ORDERS,
    FolderImages,
    ItemImages,
    Order,
    PreparedImages,
    Progress,
    backfill_order,
    backfill_set,
    embed_items,
    items_to_backfill,
)
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import RegisteredVersion, input_contract
from fct_registry.usecases.project import SOURCES_FILE, ImageSources, item_sources
from fct_registry.vectors.embedding_set import MANIFEST, EmbeddingSet

BACKFILL_FILE = "backfill.json"
"""Sidecar of a backfilled set: ``{"model", "order", "seed", "fraction", "goal", "count", "backfilled", "runs":
[...], "upgrade": {...}}``: the latest run's order, seed and fraction, how many items are backfilled, every run so far
(order, seed, fraction, goal, items before, items re-embedded, input set and its manifest sha256, images) and the
record of the upgrade that made the set (its ``upgrade.json``, which the backfilled set no longer carries: it is not
that upgrade's output any more)."""
EVAL_MEMORY_BYTES = 256 << 20
"""Bound on the evaluation's working memory beyond the gallery (queries are ranked in batches that fit)."""
UPGRADE_RECORD = "upgrade.json"
"""The sidecar ``fct-registry upgrade`` writes (``fct_registry.usecases.upgrade.PROVENANCE_FILE``)."""


def backfill_goal(fraction: float, count: int) -> int:
    """How many of ``count`` items a fraction backfills: ``round(fraction * count)``, halves rounded up.

    Raises:
        DataError: ``fraction`` is not in (0, 1].
    """
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise DataError(f"fraction {fraction} is outside (0, 1]; expected the share of the set's items to backfill, "
                        "e.g. 0.1")
    return min(count, math.floor(fraction * count + 0.5))


@dataclass(frozen=True)
class BackfillPlan:
    """What a backfill will do, checked before anything is embedded (:func:`plan_backfill`).

    Attributes:
        source: the set (at ``backbone``); dest: where the new version goes (the source's own folder by default).
        backbone: the registered backbone that re-embeds the images.
        order, seed, fraction: the backfill order, the random order's seed, the fraction asked for.
        goal: ``round(fraction * count)`` items backfilled once done; already: items backfilled before.
        chosen: (goal - already,) int64 ids to re-embed now, in backfill order (empty: nothing to do).
        images: where the items' images are; where: that place in words.
        ids, labels: (count,) int64 of the set, for the evaluation's query sample.
    """

    source: EmbeddingSet
    dest: Path
    backbone: RegisteredVersion
    order: Order
    seed: int
    fraction: float
    goal: int
    already: int
    chosen: np.ndarray
    images: ItemImages
    where: str
    ids: np.ndarray
    labels: np.ndarray

    @property
    def in_place(self) -> bool:
        """Whether the new version replaces the set in its own folder."""
        return self.dest.resolve() == self.source.path.resolve()

    @property
    def embeds(self) -> bool:
        """Whether running the plan re-embeds images: there are items to backfill and ``dest`` does not already
        hold this backfill."""
        return bool(len(self.chosen)) and (self.in_place or not self.dest.exists())


@dataclass(frozen=True)
class BackfillResult:
    """What :func:`run_backfill` did.

    Attributes:
        plan: the plan it ran.
        output: the set now at ``plan.dest``.
        state: ``written`` (items re-embedded now), ``unchanged`` (``goal`` items or more were already
            backfilled: nothing re-embedded) or ``completed`` (``dest`` already held this very backfill, e.g. from
            a run killed before its record was written).
        recorded: whether an MLflow run was written by this call (for ``unchanged``/``completed``: the missing
            record of the backfill that made the set).
        metrics: ``cmc_top<k>``/``map`` of the sampled new-backbone queries against the mixed gallery and
            ``input_*`` against the set before (fractions), when the set has labels; else empty.
    """

    plan: BackfillPlan
    output: EmbeddingSet
    state: Literal["written", "unchanged", "completed"]
    recorded: bool
    metrics: dict[str, float]


def _columns(source: EmbeddingSet) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    ids, labels, sigma, backfilled = [], [], [], []
    for batch in source.iter_batches():
        ids.append(batch.ids)
        labels.append(batch.labels)
        sigma.append(batch.uncertainty)
        backfilled.append(batch.ids[batch.backfilled] if batch.backfilled is not None else batch.ids[:0])
    uncertainty = np.concatenate(sigma) if source.manifest.uncertainty else None
    return np.concatenate(ids), np.concatenate(labels), uncertainty, np.concatenate(backfilled)


def _images(source: EmbeddingSet, root: str | os.PathLike, override: str | os.PathLike | None
            ) -> tuple[ItemImages, str]:
    sources = item_sources(source)
    if sources is None:
        raise DataError(f"set {source.path} records no images ({SOURCES_FILE} missing: its vectors were imported, "
                        "not embedded from images), so it cannot be backfilled")
    if isinstance(sources, ImageSources):
        if not sources.sha256:
            raise DataError(f"{source.path / SOURCES_FILE} records no sha256 of the images (written by an older "
                            "fct-registry); embed the set again with `sets embed` to backfill it")
        folder = Path(override) if override is not None else sources.folder
        return FolderImages(folder, sources.files, sources.sha256), f"image folder {folder}"
    from fct_registry.method.data import load_prepared  # numpy only; the module loads torchvision lazily

    data_dir = Path(override) if override is not None else sources.data_dir
    data_dir = data_dir if override is not None or data_dir.is_absolute() else Path(root) / data_dir
    images = PreparedImages(data_dir / f"{sources.split}.npz", sources.data_version, sources.rows,
                            lambda: load_prepared(data_dir, sources.split).images)
    return images, f"prepared split {images.path}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise EmbeddingSetError(f"cannot read {path}: {exc}") from None


def plan_backfill(source: EmbeddingSet, backbone: RegisteredVersion, fraction: float, order: str,
                  root: str | os.PathLike = ".", dest: str | os.PathLike | None = None, seed: int | None = None,
                  images: str | os.PathLike | None = None) -> BackfillPlan:
    """Check everything a backfill needs and choose the items, before any image is read.

    Args:
        source: the set to backfill (upgraded into ``backbone``'s space first).
        backbone: the backbone whose vectors the set holds (``--to``).
        fraction: share of the set's items backfilled once done, in (0, 1].
        order: ``uncertainty`` (sigma descending, the set's uncertainty column) or ``random`` (seeded).
        root: the project root (a prepared split's relative data folder is relative to it).
        dest: where the new version goes; None: the source's own folder (a new version of the same set).
        seed: the random order's seed; None: the one recorded with the set by an earlier backfill, else 0.
        images: where the set's images are now (an image folder, or a prepared data folder), overriding the
            recorded place; the images must still be the recorded ones.

    Raises:
        DataError: fraction outside (0, 1], unknown order, ``uncertainty`` order on a set without the column, or
            a set that records no images.
        VersionMismatchError: ``backbone`` is not the set's model (both named).
        UpgradeError: ``dest`` exists and is not this very backfill of ``source``.
        EmbeddingSetError: ``sources.json`` or ``backfill.json`` is unreadable.
    """
    m = source.manifest
    goal = backfill_goal(fraction, m.count)
    if order not in ORDERS:
        raise DataError(f"unknown backfill order {order!r}; expected one of {', '.join(ORDERS)}")
    if backbone.ref != m.model:
        raise VersionMismatchError(f"set {source.path} holds vectors of {m.model}, not of --to {backbone.ref}; "
                                   f"upgrade it to {backbone.ref.label} first, or backfill it with {m.model.label}")
    if order == "uncertainty" and not m.uncertainty:
        raise DataError(f"set {source.path} has no uncertainty column (the last transformation of its upgrade is "
                        "not a FastFill one); use --order random")
    item_images, where = _images(source, root, images)
    previous = _read_json(source.path / BACKFILL_FILE)
    seed = int(previous.get("seed", 0)) if seed is None else seed
    ids, labels, sigma, backfilled = _columns(source)
    chosen = items_to_backfill(backfill_order(ids, order, sigma, seed), backfilled, goal)
    target = Path(dest) if dest is not None else source.path
    plan = BackfillPlan(source, target, backbone, order, seed, fraction, goal, len(backfilled), chosen, item_images,
                        where, ids, labels)
    if not plan.in_place and target.exists() and not _holds(plan):
        raise UpgradeError(f"destination {target} already exists and is not this backfill of {source.path}; "
                           "choose a new --out")
    return plan


def _holds(plan: BackfillPlan) -> bool:
    """Whether ``plan.dest`` (not the source) is a set written by this very backfill of ``plan.source``."""
    if not (plan.dest / MANIFEST).is_file():
        return False
    runs = _read_json(plan.dest / BACKFILL_FILE).get("runs") or [{}]
    last = runs[-1]
    return (last.get("input_manifest_sha256") == _manifest_sha256(plan.source)
            and (last.get("order"), last.get("seed"), last.get("goal")) == (plan.order, plan.seed, plan.goal))


def _manifest_sha256(embedding_set: EmbeddingSet) -> str:
    return hashlib.sha256((embedding_set.path / MANIFEST).read_bytes()).hexdigest()


def run_backfill(registry: ModelRegistry, plan: BackfillPlan, batch_rows: int = 65536, image_batch: int = 256,
                 eval_queries: int = 1000, top_k: Sequence[int] = (1, 5), progress: Progress | None = None
                 ) -> BackfillResult:
    """Re-embed ``plan.chosen`` with the backbone and write the new version of the set; record it in MLflow.

    The source's shards are verified, the images checked (data version; each file's sha256 as it is read), then the
    set is streamed into :func:`~fct_registry.engines.backfill.backfill_set`: written beside ``plan.dest`` and
    renamed into place only when complete, so an error or a kill leaves the set as it was. The new version keeps
    ids, labels, side-info and uncertainty; the re-embedded items carry the backbone's vectors and ``backfilled``
    True. Its sidecars: the source's ``sources.json`` and a new :data:`BACKFILL_FILE`. The run of experiment
    ``fct-registry`` records the fraction, order, seed, items re-embedded and, when the set has labels, CMC top-k
    and mAP of up to ``eval_queries`` labelled items (a seeded sample) embedded by the backbone as queries against
    the mixed gallery and against the set before (``input_*``), own item excluded. With nothing to re-embed (or
    ``dest`` already holding this backfill), only a missing record of the backfill that made the set is written.

    Args:
        registry: the model registry.
        plan: from :func:`plan_backfill`.
        batch_rows: set rows per batch; image_batch: images decoded and embedded at a time (bound memory).
        eval_queries: queries of the evaluation (0: none).
        top_k: CMC ranks.
        progress: ``progress(images_done, images_total)`` while re-embedding.

    Raises:
        EmbeddingSetError: a shard of the set does not match its manifest.
        DataError, VersionMismatchError: an image is missing, changed since the set was embedded, or undecodable.
        UpgradeError: the backbone's width differs from the set's, or it outputs NaN/inf.
        RegistryError: the backbone's ONNX file cannot be fetched.
    """
    from fct_registry.onnx_boundary.runtime import OnnxModel  # onnxruntime, loaded only to embed

    if not plan.in_place and plan.dest.exists():  # plan_backfill checked that it holds this very backfill
        output = EmbeddingSet.open(plan.dest, verify=True)
        return BackfillResult(plan, output, "completed", _record_if_missing(registry, plan, output), {})
    if not len(plan.chosen):
        return BackfillResult(plan, plan.source, "unchanged", _record_if_missing(registry, plan, plan.source), {})
    plan.source.verify()
    model = OnnxModel(registry.onnx_path(plan.backbone))
    contract = input_contract(plan.backbone, model.input_shapes[model.input_names[0]])
    plan.images.check()
    queries = _query_sample(plan, eval_queries)
    total = len(queries) + len(plan.chosen)
    query_vectors = embed_items(model, contract, plan.images, queries, image_batch,
                                None if progress is None else (lambda done: progress(done, total)))
    metrics = {f"input_{k}": v for k, v in _retrieval(plan, plan.source, queries, query_vectors, top_k).items()}
    run = {"order": plan.order, "seed": plan.seed, "fraction": plan.fraction, "goal": plan.goal,
           "backfilled_before": plan.already, "re_embedded": len(plan.chosen), "input_set": str(plan.source.path),
           "input_manifest_sha256": _manifest_sha256(plan.source), "images": plan.where}
    started = time.perf_counter()
    output = backfill_set(plan.source, plan.chosen, model, contract, plan.images, plan.dest,
                          f"backfilled {len(plan.chosen)} items with {plan.backbone.ref} ({plan.order} order, now "
                          f"{plan.goal} of {plan.source.manifest.count}) from {plan.where}",
                          _sidecars(plan, run), batch_rows, image_batch,
                          None if progress is None else (lambda done, _: progress(len(queries) + done, total)))
    seconds = time.perf_counter() - started
    metrics |= _retrieval(plan, output, queries, query_vectors, top_k)
    _record(registry, plan, output, run, metrics, seconds)
    return BackfillResult(plan, output, "written", True, metrics)


def _record_if_missing(registry: ModelRegistry, plan: BackfillPlan, output: EmbeddingSet) -> bool:
    """Record the backfill that made ``output`` (its :data:`BACKFILL_FILE`'s last run) if no run records it yet, e.g.
    after a kill between the rename and the record; returns whether a run was written."""
    runs = _read_json(output.path / BACKFILL_FILE).get("runs")
    if not runs or registry.find_runs({"output_set": str(output.path.resolve()),
                                       "output_manifest_sha256": _manifest_sha256(output)}):
        return False
    _record(registry, plan, output, runs[-1], {}, 0.0)
    return True


def _sidecars(plan: BackfillPlan, run: dict) -> dict[str, bytes]:
    source = plan.source.path
    previous = _read_json(source / BACKFILL_FILE)
    upgrade = _read_json(source / UPGRADE_RECORD) or previous.get("upgrade")
    record = {"model": str(plan.backbone.ref), "order": plan.order, "seed": plan.seed, "fraction": plan.fraction,
              "goal": plan.goal, "count": plan.source.manifest.count, "backfilled": plan.already + len(plan.chosen),
              "runs": [*previous.get("runs", []), run], **({"upgrade": upgrade} if upgrade else {})}
    return {SOURCES_FILE: (source / SOURCES_FILE).read_bytes(),
            BACKFILL_FILE: json.dumps(record, indent=2, sort_keys=True).encode()}


def _query_sample(plan: BackfillPlan, n: int) -> np.ndarray:
    """Up to ``n`` labelled item ids, a sample seeded by the plan's seed, sorted."""
    labelled = np.sort(plan.ids[plan.labels >= 0])
    if n <= 0 or not len(labelled):
        return labelled[:0]
    return np.sort(labelled[np.random.default_rng(plan.seed).choice(len(labelled), min(n, len(labelled)),
                                                                     replace=False)])


def _retrieval(plan: BackfillPlan, gallery: EmbeddingSet, queries: np.ndarray, vectors: np.ndarray,
               top_k: Sequence[int]) -> dict[str, float]:
    if not len(queries):
        return {}
    from fct_registry.vectors.metrics import retrieval_metrics  # faiss, loaded only to evaluate

    stored = gallery.read()
    order = np.argsort(plan.ids)
    labels = plan.labels[order[np.searchsorted(plan.ids, queries, sorter=order)]]
    batch = max(1, min(1024, EVAL_MEMORY_BYTES // (50 * len(stored.ids))))  # ~50 B per query x gallery item
    return retrieval_metrics(vectors, labels, stored.embeddings, stored.labels, gallery.manifest.metric,
                             query_ids=queries, gallery_ids=stored.ids, top_k=top_k, batch_size=batch)


def _record(registry: ModelRegistry, plan: BackfillPlan, output: EmbeddingSet, run: dict, metrics: dict[str, float],
            seconds: float) -> str:
    """Log the backfill as a run named after its output (``seconds`` 0: recorded after the fact, not timed)."""
    count = output.manifest.count
    backfilled = output.manifest.backfilled or 0
    params = {"input_set": run["input_set"], "input_manifest_sha256": run["input_manifest_sha256"],
              "output_set": str(output.path.resolve()), "output_manifest_sha256": _manifest_sha256(output),
              "model": str(output.manifest.model), "order": run["order"], "seed": run["seed"],
              "fraction": run["fraction"], "goal": run["goal"], "count": count,
              "backfilled_before": run["backfilled_before"], "images": run["images"]}
    timing = {"seconds": seconds, "images_per_second": run["re_embedded"] / seconds} if seconds > 0 else {}
    values = {"re_embedded": run["re_embedded"], "backfilled": backfilled, "backfilled_fraction": backfilled / count,
              **timing, **metrics}
    tags = {"kind": "backfill", "order": run["order"], "target_label": output.manifest.model.label}
    name = (f"{output.path.name}: backfill of {Path(run['input_set']).name} to {backfilled}/{count} items "
            f"({run['order']} order)")
    return registry.log_run(name, params=params, tags=tags, artifacts=[output.path / BACKFILL_FILE], metrics=values)
