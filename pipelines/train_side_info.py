"""Stage train_side_info: the self-supervised SimCLR side-information model, trained without labels."""

import json
from pathlib import Path

import torch

from fct_registry.core.config import load_params
from fct_registry.core.errors import report_errors_in_one_line
from fct_registry.method.data import load_prepared
from fct_registry.method.training import train_side_info
from fct_registry.onnx_boundary.model_files import write_model_dir

report_errors_in_one_line()
params = load_params()
torch.set_num_threads(params.threads)
train = load_prepared(Path("data/prepared"), "train")


def log_epoch(epoch: int, values: dict) -> None:
    left = values["seconds"] / (epoch + 1) * (params.side_info.epochs - epoch - 1)
    print(f"train_side_info epoch {epoch + 1}/{params.side_info.epochs}: loss {values['train_loss']:.4f}, "
          f"{values['seconds']:.0f} s (~{left:.0f} s left)", flush=True)


model, metrics = train_side_info(train, params.side_info, params.seed, on_epoch=log_epoch)
write_model_dir(model, Path("models/side_info"), "side-info", params.side_info.version, metrics, train.images.shape[1:])
Path("metrics").mkdir(exist_ok=True)
Path("metrics/train_side_info.json").write_text(json.dumps(metrics, indent=2) + "\n")
print(f"train_side_info: {len(train)} images, {params.side_info.epochs} epochs in {metrics['seconds']:.0f} s -> "
      "models/side_info", flush=True)
