"""The card of a trained model's folder (``model.json``): identity, role, shapes, export parity, training metrics.

Read without torch, so the registry and the upgrade engines can describe a model folder cheaply.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from fct_registry.core.errors import DataError
from fct_registry.core.refs import ModelRef

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
