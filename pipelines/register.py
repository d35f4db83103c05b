"""Stage register: every model in the MLflow registry with its compatibility metadata, then promote the newest backbone.

The promotion goes through the same gate as ``fct-registry promote``: every stored gallery under ``embeddings/``
must reach v3 by registered transformations whose mAP is at least ``registry.promote_map_floor`` (and, when
``registry.promote_negative_flip_ceiling`` is set, whose negative flip rate is at most it).

Idempotent: a model whose ONNX content is already registered gets no new version.
"""

import json
import subprocess
from pathlib import Path

import yaml

from fct_registry.core.config import load_params
from fct_registry.core.errors import report_errors_in_one_line
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.publishing import publish_model
from fct_registry.usecases.promote import promote

report_errors_in_one_line()
params = load_params()
registry = ModelRegistry(root=".", tracking_uri=params.registry.tracking_uri)
lock = yaml.safe_load(Path("dvc.lock").read_text())
data_hash = next(o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared")
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
cases = json.loads(Path("metrics/retrieval.json").read_text())["cases"]
per_seed = json.loads(Path("reports/per_seed.json").read_text())
seed = params.transformation.seeds[0]
v1, v2, v3 = params.old.version, params.new.version, params.v3.version
# The BCT baseline goes in before v2 and v3, so that fct-backbone's newest version is the newest backbone.
sections = {"models/old": ["protocol", "old"], "models/bct": ["protocol", "bct"], "models/side_info": ["side_info"],
            "models/new": ["new"], "models/v3": ["v3"]}
# The direct h-v1-v3 stays an evaluation baseline: the registry's graph upgrades v1 galleries through v2.
transformations = {f"h-{v1}-{v2}": "new_vs_upgraded", f"h-{v1}-{v2}-noside": "new_vs_upgraded_noside",
                   f"h-{v2}-{v3}": "v3_vs_upgraded_from_v2"}
dump = params.model_dump(mode="json")
published = {}
descriptions = {"models/bct": f"BCT baseline (Shen et al., CVPR 2020): trained to embed into {v1}'s space, so a "
                               f"gallery stored by {v1} is searched with its queries directly; not in the upgrade "
                               "chain"}
for folder, keys in sections.items():
    extra = {"description": descriptions[folder]} if folder in descriptions else None
    version = publish_model(registry, folder, params.evaluation.metric, data_hash, commit, {k: dump[k] for k in keys},
                            extra_tags=extra)
    published[folder] = {"name": version.name, "version": version.version, "label": version.ref.label}
keys = ("cmc_top1", "cmc_top5", "map", "negative_flips", "positive_flips")  # flips: vs the source model's own search
for label, case in transformations.items():
    # The registered file is seed `seed`: its tags carry that seed's own scores; the spread over seeds goes apart.
    own = per_seed[case][str(seed)] if case in per_seed else cases[case]
    spread = {"seeds": params.transformation.seeds if case in per_seed else [seed],
              **{f"{k}_mean": cases[case][k] for k in keys if k in cases[case]},
              **{f"{k}_std": cases[case][f"{k}_std"] for k in keys if f"{k}_std" in cases[case]}}
    version = publish_model(registry, f"models/transformations/{label}/seed{seed}", params.evaluation.metric,
                            data_hash, commit, {"transformation": dump["transformation"], "seed": seed},
                            {k: own[k] for k in keys if k in own}, extra_tags={"seed": seed, "seed_spread": spread})
    published[label] = {"name": version.name, "version": version.version, "label": version.ref.label}
promotion = promote(registry, published["models/v3"]["version"], "embeddings", params.registry.champion_alias,
                    params.registry.promote_map_floor,
                    negative_flip_ceiling=params.registry.promote_negative_flip_ceiling)
print(f"{params.registry.champion_alias} -> {promotion.version}")
Path("registry/published.json").write_text(json.dumps(published, indent=2) + "\n")
