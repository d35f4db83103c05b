"""Stage evaluate: the compatibility table over the test split (query = gallery, own item excluded).

Queries are embedded by each backbone through ONNX Runtime; old galleries come from the stored v1 embedding
set, upgraded galleries are h applied to its stored vectors only, by the upgrade engine's ``apply_chain``.
Every case after an update also gets its negative / positive flips against the per-query top-1 of the stored
gallery's own model (old/old; new/new for the gallery stored by v2).
"""

import json
from pathlib import Path

from fct_registry.core.config import load_params
from fct_registry.core.errors import report_errors_in_one_line
from fct_registry.engines.chain import apply_chain, chain_step
from fct_registry.method.data import load_prepared
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.usecases.project import open_registry
from fct_registry.vectors.compatibility import headline, mean_std, summary
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.flips import negative_flips
from fct_registry.vectors.metrics import retrieval_metrics, top1_correct
from fct_registry.vectors.plots import protocol_title, write_compatibility_reports

report_errors_in_one_line()
params = load_params()
test = load_prepared(Path("data/prepared"), "test")
gallery = EmbeddingSet.open("embeddings/gallery_v1").read()
q = {name: embed_images(OnnxModel(f"models/{name}/model.onnx"), test.images) for name in ("old", "new", "bct", "v3")}
H = Path("models/transformations")


def retrieval(queries, gallery_vectors, top1_only=False):
    args = (queries, test.labels, gallery_vectors, gallery.labels, params.evaluation.metric, test.item_ids,
            gallery.ids)
    if top1_only:
        return top1_correct(*args, batch_size=params.evaluation.batch_size)
    return retrieval_metrics(*args, top_k=params.evaluation.top_k, batch_size=params.evaluation.batch_size)


def score(queries, gallery_vectors, before="old"):
    """CMC / mAP, plus negative and positive flips against the top-1 hits of ``before`` (None: the reference)."""
    flips = {} if before is None else negative_flips(top1[before], retrieval(queries, gallery_vectors, True)).metrics()
    return retrieval(queries, gallery_vectors) | flips


def upgrade(*hops, vectors=gallery.embeddings):
    """Run the chain of (transformation label, seed) hops over ``vectors`` (the stored v1 gallery by default)."""
    steps = [chain_step(H / label / f"seed{seed}") for label, seed in hops]
    return apply_chain([OnnxModel(step.onnx_path) for step in steps], steps, vectors, gallery.side_info)[0]


v1, v2, v3, s0 = params.old.version, params.new.version, params.v3.version, params.transformation.seeds[0]
top1 = {"old": retrieval(q["old"], gallery.embeddings, True), "new": retrieval(q["new"], q["new"], True)}
cases = {"old_vs_old": score(q["old"], gallery.embeddings, before=None), "new_vs_new": score(q["new"], q["new"])}
if q["new"].shape[1] == gallery.embeddings.shape[1]:
    cases["new_vs_old"] = score(q["new"], gallery.embeddings)
cases |= {"bct_vs_old": score(q["bct"], gallery.embeddings), "bct_vs_bct": score(q["bct"], q["bct"])}
per_seed = {}  # each seed's own scores: the registered h is one seed's bytes, and its tags must be its own
for case, label in (("new_vs_upgraded_noside", f"h-{v1}-{v2}-noside"), ("new_vs_upgraded", f"h-{v1}-{v2}")):
    per_seed[case] = {str(s): score(q["new"], upgrade((label, s))) for s in params.transformation.seeds}
    cases[case] = mean_std(list(per_seed[case].values()))
cases |= {"v3_vs_v3": score(q["v3"], q["v3"]),
          "v3_vs_upgraded_from_v2": score(q["v3"], upgrade((f"h-{v2}-{v3}", s0), vectors=q["new"]), "new"),
          "v3_vs_upgraded_chain": score(q["v3"], upgrade((f"h-{v1}-{v2}", s0), (f"h-{v2}-{v3}", s0))),
          "v3_vs_upgraded_direct": score(q["v3"], upgrade((f"h-{v1}-{v3}", s0)))}
result = {"protocol": params.protocol.name, "metric": params.evaluation.metric, "cases": cases,
          "summary": summary(cases)}
Path("metrics").mkdir(exist_ok=True)
Path("metrics/retrieval.json").write_text(json.dumps(result, indent=2) + "\n")
Path("metrics/fct.json").write_text(json.dumps(headline(cases), indent=2) + "\n")  # what `dvc metrics show` prints
title = protocol_title(params.data.source, params.protocol.name, params.evaluation.metric, len(test.labels))
reports = write_compatibility_reports(cases, title, "reports")  # retrieval.md, .png and retrieval_plot.json
Path("reports/per_seed.json").write_text(json.dumps(per_seed, indent=2) + "\n")
open_registry(".").log_run(f"evaluate: compatibility table ({params.protocol.name})", tags={"kind": "evaluate"},
                           params={"protocol": params.protocol.name, "metric": params.evaluation.metric,
                                   "seeds": params.transformation.seeds, "n_items": len(test.labels)},
                           artifacts=[*reports, "metrics/retrieval.json"], metrics=result["summary"])
print(Path("reports/retrieval.md").read_text())
print(json.dumps(result["summary"], indent=2))
