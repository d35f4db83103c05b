"""Save and load trained modules as ``.pt`` checkpoints: class name, constructor arguments and weights."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fct_registry.core.errors import DataError
from fct_registry.method.models.backbone import Backbone
from fct_registry.method.models.side_info import SideInfoModel
from fct_registry.method.models.transformation import ForwardTransformation

_CLASSES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (Backbone, SideInfoModel, ForwardTransformation)
}


def save_checkpoint(module: nn.Module, path: str | Path) -> None:
    """Write ``module`` (one of Backbone, SideInfoModel, ForwardTransformation) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"class": type(module).__name__, "init": module.init_kwargs, "state_dict": module.state_dict()}, path)


def load_checkpoint(path: str | Path) -> nn.Module:
    """Rebuild a module saved by :func:`save_checkpoint`, in eval mode.

    Raises:
        DataError: the file is missing or is not a checkpoint of a known class.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("class") not in _CLASSES:
        raise DataError(f"{path} is not an fct-registry checkpoint (expected one of {sorted(_CLASSES)})")
    module = _CLASSES[saved["class"]](**saved["init"])
    module.load_state_dict(saved["state_dict"])
    return module.eval()
