"""Stage upgrade: bring the stored v1 gallery to the champion backbone through the registry's chain of forward
transformations (ONNX Runtime, vectors only: no image is read), then score champion queries against it."""

import json
from pathlib import Path

from fct_registry.core.config import load_params
from fct_registry.core.errors import report_errors_in_one_line
from fct_registry.usecases.evaluate import evaluate_gallery
from fct_registry.usecases.project import open_registry
from fct_registry.usecases.upgrade import default_output, run_upgrade
from fct_registry.vectors.embedding_set import EmbeddingSet

report_errors_in_one_line()
params = load_params()
registry = open_registry(".")
champion = registry.resolve_alias("backbone", params.registry.champion_alias)
source = EmbeddingSet.open("embeddings/gallery_v1", verify=False)  # run_upgrade verifies its shards once
done = run_upgrade(registry, source, champion, default_output("embeddings", source, champion),
                   on_plan=lambda steps: print("\n".join(f"plan: {step}" for step in steps)))
steps, upgraded = done.steps, done.output
result = evaluate_gallery(registry, str(champion.version), upgraded, "data/prepared", top_k=params.evaluation.top_k)
report = {"source": str(source.path), "target": str(champion), "chain": [step.name for step in steps],
          "output": str(upgraded.path), "count": upgraded.manifest.count,
          f"{champion.ref.label}_vs_stored_upgraded": result.metrics}
Path("reports/upgrade.json").write_text(json.dumps(report, indent=2) + "\n")
# The metrics file holds numbers only, so that `dvc metrics show` stays narrow; the report above names the chain.
# Keys shared with metrics/fct.json (top1, map): one column each in `dvc metrics show`, one row per file.
metrics = {"rows": upgraded.manifest.count, "top1": result.metrics["cmc_top1"], "top5": result.metrics["cmc_top5"],
           "map": result.metrics["map"]}
Path("metrics/upgrade.json").write_text(json.dumps(metrics, indent=2) + "\n")
print(json.dumps(report, indent=2))
