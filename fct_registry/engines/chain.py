"""The chain shared by every upgrade engine: its steps, their validation against a set, and one batch through it.

Each step is one forward transformation h(old_embedding, side_info) -> embedding (FCT: Ramanujan et al., CVPR
2022, arXiv 2112.02805, Sec. 3), exported to ONNX. Engines (``local``, ``ray_engine``) import this module and
never each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fct_registry.core.errors import DataError, RuntimeInputError, UpgradeError
from fct_registry.core.refs import ModelRef
from fct_registry.onnx_boundary.model_card import read_model_card
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import EmbeddingSet

if TYPE_CHECKING:  # onnxruntime is loaded when a chain is loaded (_load), not with this module
    from fct_registry.onnx_boundary.runtime import OnnxModel

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
    from fct_registry.onnx_boundary.runtime import OnnxModel

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
                side_info: np.ndarray | None, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Run one batch through every step of a validated chain.

    Args:
        models: Loaded sessions from :func:`validate_chain`, one per step.
        steps: The chain, in order.
        embeddings: (B, d) float32 vectors of the chain's first source model.
        side_info: (B, d_side) float32 stored side-info, fed to every step that takes it; None if the set has none.
        ids: (B,) int64 item ids; when given, each step's output is checked for NaN/inf. Without ids (a Ray
            actor, whose driver checks the output), a row that holds or becomes NaN/inf skips the remaining
            steps (ONNX Runtime refuses NaN/inf input) and comes out as NaN.

    Returns:
        (B, d_new) float32 vectors of the last step's target model, and the last step's uncertainty sigma (B,)
        float32 when it is a FastFill transformation with an ``uncertainty`` output (Jaeckle et al., ICLR 2023),
        else None. Only the last step's sigma is kept: it is the uncertainty of the vectors the set stores.

    Raises:
        UpgradeError: ``ids`` given and a step outputs NaN or inf (step and first bad item_id named).
    """
    x, sigma = embeddings, None
    ok = None if ids is not None else _finite_rows(x) & (side_info is None or _finite_rows(side_info))
    for i, (model, step) in enumerate(zip(models, steps, strict=False), start=1):
        last = i == len(steps) and model.has_uncertainty
        if ok is None or ok.all():
            x, sigma = _run_step(model, step, x, side_info, last)
        else:
            out = np.full((len(x), model.output_dim), np.nan, dtype=np.float32)
            sigma = np.full(len(x), np.nan, dtype=np.float32) if last else None
            if ok.any():
                out[ok], part = _run_step(model, step, x[ok], None if side_info is None else side_info[ok], last)
                if last:
                    sigma[ok] = part
            x = out
        if ok is None:
            check_finite(x, ids, f"step {i} ({step.name})")
        else:
            ok &= _finite_rows(x)
    return x, sigma


def _run_step(model: OnnxModel, step: ChainStep, x: np.ndarray, side_info: np.ndarray | None, with_sigma: bool
              ) -> tuple[np.ndarray, np.ndarray | None]:
    inputs = _step_inputs(step, x, side_info)
    if with_sigma:
        return model.run_with_uncertainty(**inputs)
    return model.run(**inputs), None


def _step_inputs(step: ChainStep, x: np.ndarray, side_info: np.ndarray | None) -> dict[str, np.ndarray]:
    return {OLD_INPUT: x} if step.side_info is None else {OLD_INPUT: x, SIDE_INPUT: side_info}


def _finite_rows(vectors: np.ndarray) -> np.ndarray:
    return np.isfinite(vectors).all(axis=1)


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


def chain_step(model_dir: str | Path) -> ChainStep:
    """The upgrade-chain step of a transformation folder, named by its label (before it is registered).

    Raises:
        DataError: the model card is missing, or the folder is not a transformation with source and target links.
    """
    card = read_model_card(model_dir)
    if card.role != "transformation" or not {"source", "target"} <= card.links.keys():
        raise DataError(f"{model_dir} is a {card.role} without source/target links, expected a transformation")
    return ChainStep(onnx_path=Path(model_dir) / "model.onnx", source=card.links["source"],
                     target=card.links["target"], side_info=card.links.get("side_info"), name=card.ref.label)
