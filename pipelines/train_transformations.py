"""Stage train_transformations: forward transformations h on the new training set (FCT, Sec. 3).

Trains h(v1, side-info) -> v2 and the ablation h(v1) -> v2 for every seed, then h(v2, side-info) -> v3 and
the direct h(v1, side-info) -> v3 with the first seed, all with ``transformation.loss``; then, for the
backfill curves, h(v1[, side-info]) -> v2 with the other loss (label suffix ``-mse`` or ``-fastfill``) for every
seed. FastFill's loss reads the target backbone's classifier (``models/<target>/classifier.npz``). Cached features
come from each model's ONNX file through ONNX Runtime and h is trained and exported by ``train_to_model_dir``: the
same path as ``fct-registry fit``.
"""

import time
from pathlib import Path

import torch

from fct_registry.core.config import load_params
from fct_registry.core.errors import report_errors_in_one_line
from fct_registry.method.classifier import LinearClassifier
from fct_registry.method.data import load_prepared
from fct_registry.method.models.checkpoint import load_checkpoint
from fct_registry.method.training import augmented_features, cached_features
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.onnx_boundary.model_card import read_model_card
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.usecases.fit import train_to_model_dir

report_errors_in_one_line()
params = load_params()
torch.set_num_threads(params.threads)
train = load_prepared(Path("data/prepared"), "train")
names = ("old", "side_info", "new", "v3")
cards = {name: read_model_card(f"models/{name}") for name in names}
if params.transformation.training_data == "cached_features":
    start = time.perf_counter()
    features = {name: embed_images(OnnxModel(f"models/{name}/model.onnx"), train.images) for name in names}
    print(f"train_transformations: features of {len(train)} images under {', '.join(names)} in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    source = lambda old, side, new: cached_features(features[old], features.get(side), features[new])  # noqa: E731
else:
    models = {name: load_checkpoint(f"models/{name}/model.pt") for name in names}
    source = lambda old, side, new: augmented_features(  # noqa: E731
        train.images, models[old], models.get(side), models[new], params.seed)
seeds, epochs, loss = params.transformation.seeds, params.transformation.epochs, params.transformation.loss
other = "mse" if loss == "fastfill" else "fastfill"
jobs = [("old", "new", True, seeds, loss), ("old", "new", False, seeds, loss), ("new", "v3", True, seeds[:1], loss),
        ("old", "v3", True, seeds[:1], loss), ("old", "new", True, seeds, other), ("old", "new", False, seeds, other)]
for src, dst, with_side, job_seeds, job_loss in jobs:
    label = (f"h-{cards[src].ref.label}-{cards[dst].ref.label}" + ("" if with_side else "-noside")
             + ("" if job_loss == loss else f"-{job_loss}"))
    job_params = params.transformation.model_copy(update={"loss": job_loss})
    fastfill = (train.labels, LinearClassifier.load(f"models/{dst}")) if job_loss == "fastfill" else None
    links = {"source": cards[src].ref, "target": cards[dst].ref}
    if with_side:
        links["side_info"] = cards["side_info"].ref
    for seed in job_seeds:
        def log_epoch(epoch: int, values: dict, label: str = label, seed: int = seed) -> None:
            print(f"{label} seed {seed} epoch {epoch + 1}/{epochs}: train MSE {values['train_mse']:.4f}, "
                  f"{values['seconds']:.0f} s", flush=True)

        card, metrics = train_to_model_dir(source(src, "side_info" if with_side else None, dst), job_params, seed,
                                           label, links, Path(f"models/transformations/{label}/seed{seed}"),
                                           log_epoch, fastfill)
        print(f"{label} seed {seed}: train MSE {metrics['train_mse']:.4f} in {metrics['seconds']:.0f} s -> {card.ref}",
              flush=True)
