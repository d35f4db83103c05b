"""Stage backfill_curve: FastFill's backfill curves on the test split (Jaeckle et al., ICLR 2023, Sec. 5).

The stored v1 gallery is upgraded by h, then backfilled with the new backbone's vectors in each order; curves of
FCT's MSE h (random order) and FastFill's h (random, uncertainty, distance oracle), with and without side-info, with
negative flips against old/old. See :mod:`fct_registry.usecases.backfill_curves`.
"""

import json
from pathlib import Path

import numpy as np

from fct_registry.core.config import load_params
from fct_registry.core.errors import report_errors_in_one_line
from fct_registry.method.data import load_prepared
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.usecases.backfill_curves import measure_curves, query_sample, reference_metrics
from fct_registry.vectors.backfill_report import summarise, targets, write_backfill_reports
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.plots import protocol_title

report_errors_in_one_line()
params = load_params()
bf, metric, top_k = params.backfill, params.evaluation.metric, params.evaluation.top_k
test = load_prepared(Path("data/prepared"), "test")
gallery = EmbeddingSet.open("embeddings/gallery_v1").read()
if not np.array_equal(gallery.ids, test.item_ids):
    raise SystemExit("embeddings/gallery_v1 must hold the test split in order; re-run embed_gallery")
new = embed_images(OnnxModel("models/new/model.onnx"), test.images)
rows = query_sample(len(new), bf.queries, bf.seed)
reference, before = reference_metrics(gallery, new, embed_images(OnnxModel("models/old/model.onnx"),
                                                                 test.images[rows]), rows, metric, top_k)
base = f"models/transformations/h-{params.old.version}-{params.new.version}"
mse, ff = ("-mse", "") if params.transformation.loss == "fastfill" else ("", "-fastfill")
seeds = params.transformation.seeds
h_dirs = {f"{kind}{side.replace('-', '_')}": [Path(f"{base}{side}{suffix}/seed{s}") for s in seeds]
          for kind, suffix in (("fct", mse), ("fastfill", ff)) for side in ("", "-noside")}


def log(name, i, curve):
    print(f"backfill_curve: {name} seed {params.transformation.seeds[i]}: mAP {curve[0]['map']:.4f} at 0 %, "
          f"{curve[len(curve) // 2]['map']:.4f} at {curve[len(curve) // 2]['fraction']:.0%}", flush=True)


curves = measure_curves(gallery, new, rows, before, h_dirs, metric, top_k, bf.points, bf.seed, bf.oracle_seeds, log)
summary = summarise(curves)
result = {"auc": {name: entry["auc"] for name, entry in summary.items()}, "reference": reference,
          "targets": targets(summary, reference), "queries": len(rows), "points": bf.points}
Path("metrics/backfill.json").write_text(json.dumps(result, indent=2) + "\n")
write_backfill_reports(summary, reference, protocol_title(params.data.source, params.protocol.name, metric, len(new))
                       + f"; {len(rows)} queries", "reports")
print("backfill_curve: " + ", ".join(f"{k} {v:.4f}" for k, v in result["targets"].items()), flush=True)
