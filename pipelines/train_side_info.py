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
model, metrics = train_side_info(train, params.side_info, params.seed)
write_model_dir(model, Path("models/side_info"), "side-info", params.side_info.version, metrics, train.images.shape[1:])
Path("metrics").mkdir(exist_ok=True)
Path("metrics/train_side_info.json").write_text(json.dumps(metrics, indent=2) + "\n")
