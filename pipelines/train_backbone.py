"""Stage train_backbone@{new,v3}: a new backbone on all classes with no compatibility constraint."""

import json
from pathlib import Path
from typing import Literal

import torch
import typer

from fct_registry.core.config import load_params
from fct_registry.core.errors import report_errors_in_one_line
from fct_registry.method.classifier import LinearClassifier
from fct_registry.method.data import load_prepared
from fct_registry.method.training import train_backbone
from fct_registry.onnx_boundary.model_files import write_model_dir


def main(section: Literal["new", "v3"]) -> None:
    params = load_params()
    torch.set_num_threads(params.threads)
    backbone = getattr(params, section)
    train = load_prepared(Path("data/prepared"), "train")

    def log_epoch(epoch: int, values: dict) -> None:
        left = values["seconds"] / (epoch + 1) * (backbone.epochs - epoch - 1)
        print(f"train_backbone@{section} epoch {epoch + 1}/{backbone.epochs}: loss {values['train_loss']:.4f}, "
              f"accuracy {values['train_accuracy']:.4f}, {values['seconds']:.0f} s (~{left:.0f} s left)", flush=True)

    model, metrics = train_backbone(train, int(train.labels.max()) + 1, backbone, params.seed, on_epoch=log_epoch)
    write_model_dir(model.backbone, Path(f"models/{section}"), "backbone", backbone.version, metrics,
                    train.images.shape[1:])
    LinearClassifier.of(model.head).save(f"models/{section}")  # W_new, for FastFill's loss (train_transformations)
    Path("metrics").mkdir(exist_ok=True)
    Path(f"metrics/train_{section}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"train_backbone@{section}: {len(train)} images, {backbone.epochs} epochs in {metrics['seconds']:.0f} s "
          f"-> models/{section}", flush=True)


if __name__ == "__main__":
    report_errors_in_one_line()
    typer.run(main)
