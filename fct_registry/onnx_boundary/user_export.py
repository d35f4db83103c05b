"""Export a user's PyTorch image embedding model to an ONNX file that ``fct-registry models add`` accepts.

The file gets the project's conventions: one input ``image`` (B, C, H, W) or (B, H, W, C) float32 as the input
contract prepares it, one output ``embedding`` (B, d) float32, a symbolic batch axis, all weights inside the file.
It passes :func:`~fct_registry.onnx_boundary.export.export_onnx`'s parity checks (ONNX Runtime vs eager PyTorch at
batch sizes 1, 3 and 1024) and then :func:`~fct_registry.onnx_boundary.validation.validate_image_model` (the checks
``models add`` runs), and only then appears at ``path``.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fct_registry.core.errors import ModelValidationError
from fct_registry.onnx_boundary.contract import InputContract, prepare
from fct_registry.onnx_boundary.export import ExportReport, export_onnx
from fct_registry.onnx_boundary.validation import ValidationResult, validate_image_model

INPUT_NAME = "image"
OUTPUT_NAME = "embedding"


@dataclass(frozen=True)
class EmbeddingExport:
    """A user's model exported and validated.

    Attributes:
        export: The export's report (path, sha256, input shapes, d, parity max abs diff per batch size).
        validation: What the registration checks measured (batch consistency, norm error).
    """

    export: ExportReport
    validation: ValidationResult


class _ImageInput(nn.Module):
    """Names the wrapped module's single positional input ``image`` (export_onnx binds inputs by parameter name)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.inner(image)


def export_embedding_model(module: nn.Module, contract: InputContract, path: str | os.PathLike[str],
                           normalized: bool = False, opset: int | None = None) -> EmbeddingExport:
    """Export an image embedding ``nn.Module`` to a registrable ONNX file, checked for parity and consistency.

    Example::

        import torch
        import torchvision
        from fct_registry.onnx_boundary.contract import IMAGENET_MEAN, IMAGENET_STD, InputContract
        from fct_registry.onnx_boundary.user_export import export_embedding_model

        net = torchvision.models.resnet18(weights="DEFAULT")
        net.fc = torch.nn.Identity()  # (B, 512) pooled features
        contract = InputContract(height=224, width=224, color="rgb", resize="center_crop",
                                 mean=IMAGENET_MEAN, std=IMAGENET_STD)
        result = export_embedding_model(net.eval(), contract, "resnet18.onnx")
        print(result.export.sha256, result.export.output_dim)  # ... 512

    then register it with the same contract: ``fct-registry models add backbone resnet18.onnx --label r18
    --preset imagenet --metric cosine`` (the ``imagenet`` preset is this contract).

    Args:
        module: In eval mode; its ``forward`` takes one float32 tensor, the prepared images (B, C, H, W) for an
            ``nchw`` contract or (B, H, W, C) for ``nhwc`` (values ``(x / pixel_range - mean) / std``), and
            returns float32 (B, d). Its parameter may have any name; the ONNX input is named ``image``.
        contract: The input contract the model was trained with (register the file with the same one).
        path: Destination ``.onnx`` file; written atomically, only after every check has passed.
        normalized: The module's output rows have unit L2 norm (checked on the probe batch).
        opset: ONNX opset version; None uses the exporter's default.

    Returns:
        The export report (``export.path`` is ``path``) and the validation result.

    Raises:
        ExportError: ``module`` is not in eval mode, the exporter fails, or ONNX Runtime differs from PyTorch by
            more than 1e-4 at batch size 1, 3 or 1024 (see :func:`~fct_registry.onnx_boundary.export.export_onnx`).
        ModelValidationError: the exported file fails
            :func:`~fct_registry.onnx_boundary.validation.validate_image_model` (e.g. batch-dependent or
            non-finite output, or rows not unit-norm while ``normalized``).
    """
    wrapper = _ImageInput(module)
    wrapper.training = False  # not .eval(), which would also switch the user's module (export_onnx refuses it)
    images = np.random.default_rng(0).integers(0, 256, (2, contract.channels, contract.height, contract.width),
                                               dtype=np.uint8)
    example = {INPUT_NAME: torch.from_numpy(prepare(images, contract))}
    path = Path(path)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        report = export_onnx(wrapper, example, tmp, output_name=OUTPUT_NAME, opset=opset)
        try:
            validation = validate_image_model(tmp, contract, normalized=normalized)
        except ModelValidationError as exc:  # name the destination, not the temporary file
            raise ModelValidationError(str(exc).replace(str(tmp), str(path))) from None
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return EmbeddingExport(export=replace(report, path=path), validation=replace(validation, path=path))
