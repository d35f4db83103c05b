"""Stage train_backbone@{new,v3}: a new backbone on all classes with no compatibility constraint."""

import json
from pathlib import Path
from typing import Literal

import torch
import typer

from fct_registry.core.config import load_params
from fct_registry.core.errors import report_errors_in_one_line
from fct_registry.method.data import load_prepared
from fct_registry.method.training import train_backbone
from fct_registry.onnx_boundary.model_files import write_model_dir


def main(section: Literal["new", "v3"]) -> None:
    params = load_params()
    torch.set_num_threads(params.threads)
    backbone = getattr(params, section)
    train = load_prepared(Path("data/prepared"), "train")
    model, metrics = train_backbone(train, int(train.labels.max()) + 1, backbone, params.seed)
    write_model_dir(model.backbone, Path(f"models/{section}"), "backbone", backbone.version, metrics,
                    train.images.shape[1:])
    Path("metrics").mkdir(exist_ok=True)
    Path(f"metrics/train_{section}.json").write_text(json.dumps(metrics, indent=2) + "\n")


if __name__ == "__main__":
    report_errors_in_one_line()
    typer.run(main)
