"""FastFill's loss on the pipeline's models, before the backfill_curve stage existed (Jaeckle et al., ICLR 2023).

Trains one FastFill h (seed 0) with a linear classifier fitted on v2's training embeddings, and prints the backfill
curve (8 points, 2,000 seeded test queries) in uncertainty, random and distance order. Usage, after ``make demo``:
``python experiments/fastfill_prototype.py side`` (or ``noside``).
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

from fct_registry.core.config import load_params
from fct_registry.method.classifier import fit_linear_classifier
from fct_registry.method.data import load_prepared
from fct_registry.method.training import cached_features, train_transformation
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.vectors.backfill_curve import backfill_curve, backfill_order, curve_auc
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.metrics import top1_correct

torch.set_num_threads(2)
root = Path(__file__).resolve().parents[1]
cache = root / "experiments" / "fastfill_features.npz"  # ONNX features of the train/test splits, computed once
train = load_prepared(root / "data/prepared", "train")
test = load_prepared(root / "data/prepared", "test")
if cache.exists():
    f = dict(np.load(cache))
else:
    f = {f"{n}_train": embed_images(OnnxModel(root / f"models/{n}/model.onnx"), train.images)
         for n in ("old", "side_info", "new")}
    f["new_test"] = embed_images(OnnxModel(root / "models/new/model.onnx"), test.images)
    f["old_test"] = embed_images(OnnxModel(root / "models/old/model.onnx"), test.images)
    np.savez(cache, **f)
classifier, accuracy = fit_linear_classifier(f["new_train"], train.labels)
print("linear classifier training accuracy", accuracy, flush=True)
params = load_params(root / "params.yaml").transformation.model_copy(update={"loss": "fastfill"})
gallery = EmbeddingSet.open(root / "embeddings/gallery_v1").read()
side = sys.argv[1] == "side"
start = time.time()
features = cached_features(f["old_train"], f["side_info_train"] if side else None, f["new_train"])
h, metrics = train_transformation(features, params, 0, fastfill=(train.labels, classifier),
                                  on_epoch=lambda epoch, values: print(epoch, values, flush=True))
print("trained", metrics, flush=True)
with torch.no_grad():
    inputs = (torch.from_numpy(gallery.embeddings),) + ((torch.from_numpy(gallery.side_info),) if side else ())
    transformed, sigma = h(*inputs)
transformed, sigma, new = transformed.numpy(), sigma.numpy()[:, 0], f["new_test"]
q = np.sort(np.random.default_rng(0).choice(len(new), 2000, replace=False))
before = top1_correct(f["old_test"][q], test.labels[q], gallery.embeddings, gallery.labels, "l2", test.item_ids[q],
                      gallery.ids)
for order in ("uncertainty", "random", "distance"):
    positions = backfill_order(order, len(new), sigma=sigma, distance=np.linalg.norm(new - transformed, axis=1))
    curve = backfill_curve(new[q], test.labels[q], test.item_ids[q], transformed, new, gallery.labels, gallery.ids,
                           positions, "l2", before=before, points=8)
    print(order, [round(point["map"], 4) for point in curve], "AUC", curve_auc(curve), flush=True)
