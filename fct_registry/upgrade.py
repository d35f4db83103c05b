"""Upgrade a stored embedding set to a newer model by running a chain of forward transformations.

Each step is one forward transformation h(old_embedding, side_info) -> embedding (FCT: Ramanujan et al., CVPR
2022, arXiv 2112.02805, Sec. 3), exported to ONNX (see ``fct_registry.export``). The set's stored vectors are
streamed through every step in order with ONNX Runtime; no image is read again. The side-info column is fed to
every step that takes it and is copied unchanged into the new set, so a later upgrade can use it again.

Engines: ``"local"`` (default; a plain pyarrow + ONNX Runtime loop, fastest on one machine) and ``"ray"``
(Ray Data over the set's Parquet shards, see ``fct_registry.upgrade_ray``; for clusters). Both write the same set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fct_registry.embedding_set import EmbeddingBatch, EmbeddingSet, ModelRef, write_embedding_set
from fct_registry.errors import RuntimeInputError, UpgradeError
from fct_registry.runtime import OnnxModel

OLD_INPUT = "old_embedding"
SIDE_INPUT = "side_info"

Progress = Callable[[int, int], None]
"""``progress(rows_done, rows_total)``, called after each batch is handed to the writer."""


class ChainStep(BaseModel):
    """One forward transformation of an upgrade chain, with the ONNX file that implements it.

    Attributes:
        onnx_path: Exported transformation: inputs ``old_embedding`` (B, d_old) float32 and, iff ``side_info``
            is set, ``side_info`` (B, d_side) float32; output ``embedding`` (B, d_new) float32.
        source: Backbone whose embeddings the step reads.
        target: Backbone whose embedding space the step writes into.
        side_info: Side-information model whose stored vectors the step also reads, or None.
        name: Registered model version of the transformation, e.g. ``"fct-transformation/3"``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    onnx_path: Path
    source: ModelRef
    target: ModelRef
    side_info: ModelRef | None
    name: str = Field(min_length=1)

    def __str__(self) -> str:
        side = f" with side-info {self.side_info}" if self.side_info is not None else ""
        return f"{self.source} -> {self.target} via {self.name}{side}"


def validate_chain(steps: Sequence[ChainStep], embedding_set: EmbeddingSet) -> list[OnnxModel]:
    """Check that ``steps`` can run over ``embedding_set``, before anything is written.

    Checks, in order: the chain is not empty; the first step reads the set's model and each next step reads
    the previous step's target; every step that takes side-info finds the same side-info model stored in the
    set; each ONNX file loads, has inputs ``old_embedding`` (plus ``side_info`` iff the step takes side-info),
    and its input widths match the set's d / d_side and the previous step's output width.

    Args:
        steps: The chain, in application order.
        embedding_set: The set to upgrade (its manifest is read; its shards are not).

    Returns:
        One loaded OnnxModel per step, in order.

    Raises:
        UpgradeError: One line naming the first problem: empty chain (already at target), a broken link
            (both refs named), missing or different side-info in the set (set and side-info model named),
            an ONNX file that does not load (path named), or a width mismatch (both widths named).
    """
    manifest = embedding_set.manifest
    if not steps:
        raise UpgradeError(f"set {embedding_set.path} is already at target {manifest.model}: empty chain")
    models, model, dim = [], manifest.model, manifest.dim
    for i, step in enumerate(steps, start=1):
        if step.source != model:
            have = f"set {embedding_set.path} holds" if i == 1 else f"step {i - 1} outputs"
            raise UpgradeError(f"step {i} ({step.name}) reads {step.source} vectors, but {have} {model} vectors")
        _check_side_info(i, step, embedding_set)
        onnx_model = _load(i, step)
        _check_widths(i, step, onnx_model, dim, manifest.side_info_dim)
        models.append(onnx_model)
        model, dim = step.target, onnx_model.output_dim
    return models


def _check_side_info(i: int, step: ChainStep, embedding_set: EmbeddingSet) -> None:
    stored = embedding_set.manifest.side_info_model
    if step.side_info is None or step.side_info == stored:
        return
    have = "stores no side-info" if stored is None else f"stores side-info {stored}"
    raise UpgradeError(f"step {i} ({step.name}) needs side-info {step.side_info}, but set {embedding_set.path} {have}")


def _load(i: int, step: ChainStep) -> OnnxModel:
    try:
        return OnnxModel(step.onnx_path)
    except RuntimeInputError as exc:
        raise UpgradeError(f"step {i} ({step.name}): {exc}") from exc


def _check_widths(i: int, step: ChainStep, model: OnnxModel, dim: int, side_dim: int | None) -> None:
    expected = {OLD_INPUT: dim} if step.side_info is None else {OLD_INPUT: dim, SIDE_INPUT: side_dim}
    if sorted(model.input_names) != sorted(expected):
        raise UpgradeError(f"step {i} ({step.name}): {step.onnx_path} has inputs {list(model.input_names)}; "
                           f"expected {sorted(expected)}")
    for name, width in expected.items():
        shape = model.input_shapes[name]
        if len(shape) != 2 or shape[1] != width:
            what = "the set's side-info" if name == SIDE_INPUT else ("the set" if i == 1 else f"step {i - 1}")
            raise UpgradeError(f"step {i} ({step.name}): input {name!r} has shape {shape}, but {what} "
                               f"provides width {width}")


def apply_chain(models: Sequence[OnnxModel], steps: Sequence[ChainStep], embeddings: np.ndarray,
                side_info: np.ndarray | None, ids: np.ndarray | None = None) -> np.ndarray:
    """Run one batch through every step of a validated chain.

    Args:
        models: Loaded sessions from :func:`validate_chain`, one per step.
        steps: The chain, in order.
        embeddings: (B, d) float32 vectors of the chain's first source model.
        side_info: (B, d_side) float32 stored side-info, fed to every step that takes it; None if the set has none.
        ids: (B,) int64 item ids; when given, each step's output is checked for NaN/inf.

    Returns:
        (B, d_new) float32 vectors of the last step's target model.

    Raises:
        UpgradeError: ``ids`` given and a step outputs NaN or inf (step and first bad item_id named).
    """
    x = embeddings
    for i, (model, step) in enumerate(zip(models, steps, strict=False), start=1):
        inputs = {OLD_INPUT: x} if step.side_info is None else {OLD_INPUT: x, SIDE_INPUT: side_info}
        x = model.run(**inputs)
        if ids is not None:
            check_finite(x, ids, f"step {i} ({step.name})")
    return x


def check_finite(vectors: np.ndarray, ids: np.ndarray, producer: str) -> None:
    """Refuse NaN/inf in ``vectors`` (B, d) float32, naming ``producer`` and the first bad of ``ids`` (B,).

    Raises:
        UpgradeError: some row of ``vectors`` holds NaN or inf.
    """
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise UpgradeError(f"{producer} produced NaN/inf for item_id {int(ids[bad][0])} "
                           f"({int(bad.sum())} rows in this batch); nothing was written")


def check_stored_finite(batch: EmbeddingBatch, set_path: Path) -> None:
    """Refuse a batch read from a stored set whose embeddings (n, d) or side_info (n, d_side) hold NaN or inf.

    Raises:
        UpgradeError: naming the set, the column and the first bad item_id.
    """
    for column, vectors in (("embedding", batch.embeddings), ("side_info", batch.side_info)):
        bad = np.zeros(len(batch), bool) if vectors is None else ~np.isfinite(vectors).all(axis=1)
        if bad.any():
            raise UpgradeError(f"set {set_path} stores NaN/inf in column {column} for item_id "
                               f"{int(batch.ids[bad][0])}; nothing was written")


def upgrade_set(source_path: str | os.PathLike[str], steps: Sequence[ChainStep],
                dest_path: str | os.PathLike[str], batch_rows: int = 65536,
                engine: Literal["local", "ray"] = "local", progress: Progress | None = None,
                overwrite: bool = False, address: str | None = None, ray_actors: int = 2) -> EmbeddingSet:
    """Upgrade the set at ``source_path`` through ``steps`` into a new set at ``dest_path``, streaming.

    The source is verified (shard sha256s), the chain validated, then batches of at most ``batch_rows`` items
    flow through every step (memory flat in the set's size) into :func:`write_embedding_set`, which writes a temp
    dir beside ``dest_path`` and renames it into place: killed at any moment, the source is untouched, no set
    appears at ``dest_path`` and a re-run completes. The new set keeps the source's item ids, labels, row order,
    side-info column and model, metric, normalisation and shard size; its model is the last step's target and
    its lineage is the source's plus one line per step.

    Args:
        source_path: The stored set (embeddings (count, d) float32 of ``steps[0].source``).
        steps: The chain in application order (e.g. planned by ``chains.plan_chain``).
        dest_path: Where the upgraded set (embeddings (count, d_new) float32) is written.
        batch_rows: Rows per batch fed to ONNX Runtime (and per Ray batch).
        engine: ``"local"`` (pyarrow + ONNX Runtime in this process) or ``"ray"`` (Ray Data actors).
        progress: Optional ``progress(rows_done, rows_total)`` callback, e.g. to drive a progress bar.
        overwrite: Replace an existing set at ``dest_path`` (swapped out only once the new one is complete).
        address: Ray engine only: cluster address; None starts a local Ray (2 CPUs) unless one is running.
        ray_actors: Ray engine only: number of actors, each holding ONNX Runtime sessions of every step.

    Returns:
        The written set.

    Raises:
        UpgradeError: bad ``batch_rows`` or ``engine``; ``dest_path`` is (inside) the source, or exists without
            ``overwrite``; any :func:`validate_chain` problem; a step outputs NaN/inf. Nothing is written.
        EmbeddingSetError: the source set is missing or fails verification; the source is normalized but the
            chain's outputs are not unit vectors.
    """
    if batch_rows < 1:
        raise UpgradeError(f"batch_rows must be >= 1, got {batch_rows}")
    if engine not in ("local", "ray"):
        raise UpgradeError(f"engine must be 'local' or 'ray', got {engine!r}")
    source = EmbeddingSet.open(source_path, verify=True)
    dest = Path(dest_path)
    if dest.resolve() == source.path.resolve() or source.path.resolve() in dest.resolve().parents:
        raise UpgradeError(f"destination {dest} is or lies inside the source set {source.path}; choose a new path")
    if dest.exists() and not overwrite:
        raise UpgradeError(f"destination {dest} already exists; pass overwrite=True to replace it")
    models = validate_chain(steps, source)
    if engine == "local":
        batches = _iter_local(source, steps, models, batch_rows)
    else:
        from fct_registry.upgrade_ray import iter_upgraded_ray

        batches = iter_upgraded_ray(source, steps, batch_rows, address=address, actors=ray_actors)
    m = source.manifest
    with closing(batches):  # stops the Ray engine's Ray even when the writer fails early
        return write_embedding_set(
            dest, _reporting(batches, m.count, progress), model=steps[-1].target,
            side_info_model=m.side_info_model, metric=m.metric, normalized=m.normalized,
            lineage=[*m.lineage, *(f"upgraded {step}" for step in steps)],
            shard_rows=max(s.rows for s in m.shards), overwrite=overwrite)


def _iter_local(source: EmbeddingSet, steps: Sequence[ChainStep], models: Sequence[OnnxModel],
                batch_rows: int) -> Iterator[EmbeddingBatch]:
    for batch in source.iter_batches(batch_rows):
        check_stored_finite(batch, source.path)
        upgraded = apply_chain(models, steps, batch.embeddings, batch.side_info, ids=batch.ids)
        yield EmbeddingBatch(batch.ids, batch.labels, upgraded, batch.side_info)


def _reporting(batches: Iterable[EmbeddingBatch], total: int, progress: Progress | None) -> Iterator[EmbeddingBatch]:
    done = 0
    for batch in batches:
        yield batch
        done += len(batch)
        if progress is not None:
            progress(done, total)

