"""Embedding images with exported (ONNX) models, following each model's input contract.

Everything that crosses the registry boundary runs through ONNX Runtime, so the vectors stored in an
embedding set come from exactly the file whose sha256 the set's manifest names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from fct_registry.onnx_boundary.contract import InputContract, contract_from_tags, prepare

if TYPE_CHECKING:  # the caller loads the model, and with it onnxruntime
    from fct_registry.onnx_boundary.runtime import OnnxModel


def default_contract(model: OnnxModel) -> InputContract:
    """The contract of a model folder's file that carries none: the project's grayscale [0, 1] input at its (H, W).

    Raises:
        DataError: the model's single input is not (B, 1, H, W).
    """
    return contract_from_tags({}, model.input_shapes[model.input_names[0]], str(model.path))


def embed_images(model: OnnxModel, images: np.ndarray, contract: InputContract | None = None,
                 batch_size: int = 1024, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Embed decoded images with an image model, prepared as its input contract says.

    Args:
        model: An image model with one input (B, ...) and one output (B, d).
        images: (N, C, H, W) uint8, C and (H, W) as the contract says.
        contract: The model's input contract; None: :func:`default_contract` (grayscale, scaled to [0, 1]).
        batch_size: Images per ONNX Runtime call.
        progress: Optional callback given the number of images done after each batch.

    Returns:
        (N, d) float32.

    Raises:
        DataError: ``images`` do not match the contract.
    """
    contract = contract if contract is not None else default_contract(model)
    chunks = []
    for start in range(0, len(images), batch_size):
        chunks.append(model.run(prepare(images[start:start + batch_size], contract)))
        if progress is not None:
            progress(min(start + batch_size, len(images)))
    return np.concatenate(chunks) if chunks else np.zeros((0, model.output_dim), np.float32)
