"""A trained model's folder: ``model.pt`` (PyTorch checkpoint), ``model.onnx`` (verified export) and
``model.json`` (its :class:`ModelCard`), written by the training stages and read by the later ones."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fct_registry.core.refs import ModelRef
from fct_registry.method.models.checkpoint import save_checkpoint
from fct_registry.onnx_boundary.export import export_onnx
from fct_registry.onnx_boundary.model_card import ModelCard, Role


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
        ExportError: the ONNX export failed its checks (see :func:`fct_registry.onnx_boundary.export.export_onnx`).
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
