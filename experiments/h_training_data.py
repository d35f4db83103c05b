"""Which data should h be trained on: features cached once, or features of freshly augmented images each epoch?

FCT (Ramanujan et al., CVPR 2022, Sec. 3) trains h on the new model's training set; the issue asks whether
image augmentations pay over features computed once. Both variants train h(v1, side-info) -> v2 with the same
params.yaml settings and seeds, from the pipeline's trained models (run ``dvc repro`` first), and are scored
new/h(old) on the test split. Writes ``metrics/h_training_data.json`` and prints a markdown table.

Usage: ``python experiments/h_training_data.py [--seeds 0] [--threads 2]``.
"""

import json
import time
from pathlib import Path

import torch
import typer

from fct_registry.core.config import load_params
from fct_registry.method.data import load_prepared
from fct_registry.method.models.checkpoint import load_checkpoint
from fct_registry.method.training import augmented_features, cached_features, embed, train_transformation
from fct_registry.vectors.metrics import retrieval_metrics


def main(seeds: list[int] = typer.Option([0], help="seeds of h"),  # noqa: B008
         threads: int = typer.Option(2, help="torch threads")) -> None:
    params = load_params()
    torch.set_num_threads(threads)
    train, test = load_prepared(Path("data/prepared"), "train"), load_prepared(Path("data/prepared"), "test")
    old, side, new = (load_checkpoint(f"models/{name}/model.pt") for name in ("old", "side_info", "new"))
    cached = cached_features(embed(old, train.images), embed(side, train.images), embed(new, train.images))
    sources = {"cached_features": lambda seed: cached,
               "augmented": lambda seed: augmented_features(train.images, old, side, new, seed)}
    query, gallery_old, gallery_side = embed(new, test.images), embed(old, test.images), embed(side, test.images)
    rows = []
    for mode, source in sources.items():
        for seed in seeds:
            start = time.perf_counter()
            h, metrics = train_transformation(source(seed), params.transformation, seed)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                upgraded = h(torch.from_numpy(gallery_old), torch.from_numpy(gallery_side)).numpy()
            scores = retrieval_metrics(query, test.labels, upgraded, test.labels, params.evaluation.metric,
                                       query_ids=test.item_ids, gallery_ids=test.item_ids,
                                       top_k=params.evaluation.top_k)
            rows.append({"training_data": mode, "seed": seed, "seconds": seconds, "train_mse": metrics["train_mse"],
                         **scores})
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/h_training_data.json").write_text(json.dumps({"threads": threads, "runs": rows}, indent=2) + "\n")
    print("| h trained on | seed | new/h(old) top-1 | top-5 | mAP | train MSE | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['training_data']} | {r['seed']} | {r['cmc_top1']:.4f} | {r['cmc_top5']:.4f} | {r['map']:.4f} | "
              f"{r['train_mse']:.4f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    typer.run(main)
