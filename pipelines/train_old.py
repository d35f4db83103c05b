"""Stage train_old: the old backbone (v1) on the old task (class subset or coarse labels), and its head."""

import json
from pathlib import Path

import torch

from fct_registry.core.config import load_params
from fct_registry.core.errors import report_errors_in_one_line
from fct_registry.method.data import load_prepared, old_task
from fct_registry.method.training import train_backbone
from fct_registry.onnx_boundary.model_files import write_model_dir

report_errors_in_one_line()
params = load_params()
torch.set_num_threads(params.threads)
train = load_prepared(Path("data/prepared"), "train")
task, n_classes = old_task(train, params.protocol.name, params.protocol.old_classes)


def log_epoch(epoch: int, values: dict) -> None:
    left = values["seconds"] / (epoch + 1) * (params.old.epochs - epoch - 1)
    print(f"train_old epoch {epoch + 1}/{params.old.epochs}: loss {values['train_loss']:.4f}, accuracy "
          f"{values['train_accuracy']:.4f}, {values['seconds']:.0f} s (~{left:.0f} s left)", flush=True)


model, metrics = train_backbone(task, n_classes, params.old, params.seed, on_epoch=log_epoch)
out = Path("models/old")
write_model_dir(model.backbone, out, "backbone", params.old.version, metrics, train.images.shape[1:])
torch.save(model.head.state_dict(), out / "head.pt")
Path("metrics").mkdir(exist_ok=True)
Path("metrics/train_old.json").write_text(json.dumps(metrics, indent=2) + "\n")
print(f"train_old: {len(task)} images, {params.old.epochs} epochs in {metrics['seconds']:.0f} s -> {out}", flush=True)
