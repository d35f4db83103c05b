"""Stage train_bct: the BCT baseline (Shen et al., CVPR 2020): CE + lambda * influence loss of the frozen old head."""

import json
from pathlib import Path

import numpy as np
import torch

from fct_registry.core.config import load_params
from fct_registry.core.errors import report_errors_in_one_line
from fct_registry.method.data import FASHION_MNIST_COARSE, load_prepared, old_task
from fct_registry.method.models.backbone import Classifier
from fct_registry.method.models.checkpoint import load_checkpoint
from fct_registry.method.training import synthesise_classifier, train_backbone
from fct_registry.onnx_boundary.model_files import write_model_dir

report_errors_in_one_line()
params = load_params()
torch.set_num_threads(params.threads)
train = load_prepared(Path("data/prepared"), "train")
n_classes = int(train.labels.max()) + 1
_, n_old = old_task(train, params.protocol.name, params.protocol.old_classes)
old = Classifier(load_checkpoint("models/old/model.pt"), n_old)
old.head.load_state_dict(torch.load("models/old/head.pt", weights_only=True))
if params.protocol.name == "class_subset":
    head, label_map = synthesise_classifier(old, train, params.protocol.old_classes, n_classes), np.arange(n_classes)
else:
    head, label_map = old.head.requires_grad_(False), np.asarray(FASHION_MNIST_COARSE, dtype=np.int64)
epochs = params.bct.backbone.epochs


def log_epoch(epoch: int, values: dict) -> None:
    left = values["seconds"] / (epoch + 1) * (epochs - epoch - 1)
    print(f"train_bct epoch {epoch + 1}/{epochs}: loss {values['train_loss']:.4f}, accuracy "
          f"{values['train_accuracy']:.4f}, {values['seconds']:.0f} s (~{left:.0f} s left)", flush=True)


model, metrics = train_backbone(train, n_classes, params.bct.backbone, params.seed,
                                influence=(head, label_map, params.bct.influence_weight), on_epoch=log_epoch)
write_model_dir(model.backbone, Path("models/bct"), "backbone", params.bct.backbone.version, metrics,
                train.images.shape[1:])
Path("metrics").mkdir(exist_ok=True)
Path("metrics/train_bct.json").write_text(json.dumps(metrics, indent=2) + "\n")
print(f"train_bct: {len(train)} images, {epochs} epochs in {metrics['seconds']:.0f} s -> models/bct", flush=True)
