"""A trained model's folder: ``model.pt`` (PyTorch checkpoint), ``model.onnx`` (verified export) and
``model.json`` (its :class:`ModelCard`), written by the training stages and read by the later ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from fct_registry.embedding_set import ModelRef
from fct_registry.errors import DataError
from fct_registry.export import export_onnx
from fct_registry.models.checkpoint import save_checkpoint
from fct_registry.upgrade import ChainStep

Role = Literal["backbone", "side-info", "transformation"]


class ModelCard(BaseModel):
    """What a model is: identity, role, shapes, the export's parity and its training metrics.

    ``inputs`` maps each ONNX input name to its trailing shape (after the batch axis);
    ``parity_max_abs_diff`` maps a batch size to max |ONNX Runtime - PyTorch| (float32 units).
    """

    model_config = ConfigDict(extra="forbid")

    ref: ModelRef
    role: Role
    embedding_dim: int
    inputs: dict[str, list[int]]
    parity_max_abs_diff: dict[int, float]
    metrics: dict[str, float]
    links: dict[str, ModelRef] = {}


def example_inputs(module: nn.Module, image_shape: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
    """Example inputs (batch 2) of a backbone/side-info model (``image_shape`` = (C, H, W)) or a transformation."""
    if image_shape is not None:
        return {"image": torch.rand(2, *image_shape)}
    inputs = {"old_embedding": torch.randn(2, module.d_old)}
    if module.d_side:
        inputs["side_info"] = torch.randn(2, module.d_side)
    return inputs


def write_model_dir(module: nn.Module, out_dir: str | Path, role: Role, label: str, metrics: dict[str, float],
                    image_shape: tuple[int, ...] | None = None, links: dict[str, ModelRef] | None = None
                    ) -> ModelCard:
    """Save the checkpoint, export and verify ONNX, and write the card.

    Args:
        module: the trained module in eval mode.
        out_dir: folder to fill (created).
        role: backbone, side-info or transformation.
        label: the project's version label (``v1``, ``s1``, ``h-v1-v2``...).
        metrics: training metrics to keep on the card.
        image_shape: (C, H, W) for image models; None for a transformation.
        links: for a transformation, ``source``, ``target`` and optionally ``side_info`` model refs.

    Raises:
        ExportError: the ONNX export failed its checks (see :func:`fct_registry.export.export_onnx`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(module, out_dir / "model.pt")
    inputs = example_inputs(module.eval(), image_shape)
    report = export_onnx(module, inputs, out_dir / "model.onnx")
    card = ModelCard(
        ref=ModelRef(label=label, sha256=report.sha256), role=role, embedding_dim=report.output_dim,
        inputs={name: list(t.shape[1:]) for name, t in inputs.items()},
        parity_max_abs_diff=report.max_abs_diff, metrics=metrics, links=links or {},
    )
    (out_dir / "model.json").write_text(card.model_dump_json(indent=2) + "\n")
    return card


def read_model_card(model_dir: str | Path) -> ModelCard:
    """Read ``<model_dir>/model.json``.

    Raises:
        DataError: the card is missing or invalid (names the path).
    """
    path = Path(model_dir) / "model.json"
    if not path.is_file():
        raise DataError(f"model card not found: {path} (run the stage that trains this model)")
    try:
        return ModelCard.model_validate(json.loads(path.read_text()))
    except ValueError as exc:
        raise DataError(f"invalid model card {path}: {str(exc).splitlines()[0]}") from None


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
