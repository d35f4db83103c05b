"""Registry descriptions show a transformation's negative flip rate (pure functions of tags; no MLflow needed)."""

from __future__ import annotations

import json

from fct_registry.registry.descriptions import Catalog, describe, describe_model
from fct_registry.registry.versions import version_from_tags

SHA = {"v1": "a1" * 32, "v2": "b2" * 32}
NAMES = {"backbone": "fct-backbone", "side-info": "fct-side-info", "transformation": "fct-transformation"}


def backbone(label: str, number: int):
    return version_from_tags("fct-backbone", number, {"fct.role": "backbone", "fct.label": label,
                                                     "fct.sha256": SHA[label], "fct.embedding_dim": "8"})


def transformation(extra: dict[str, str]):
    tags = {"fct.role": "transformation", "fct.label": "h-v1-v2", "fct.sha256": "c3" * 32,
            "fct.source_label": "v1", "fct.source_sha256": SHA["v1"], "fct.target_label": "v2",
            "fct.target_sha256": SHA["v2"], "fct.cmc_top1": "0.8665", "fct.map": "0.8", **extra}
    return version_from_tags("fct-transformation", 1, tags)


def catalog(h) -> Catalog:
    return Catalog(NAMES, {"backbone": [backbone("v1", 1), backbone("v2", 2)], "transformation": [h]})


def test_the_negative_flip_rate_is_described_with_its_before_and_after_and_its_seed_spread():
    spread = {"seeds": [0, 1, 2], "negative_flips_mean": 0.052, "negative_flips_std": 0.0022,
              "cmc_top1_mean": 0.8644}
    h = transformation({"fct.negative_flips": "0.05", "fct.positive_flips": "0.2369",
                        "fct.seed_spread": json.dumps(spread)})
    text = describe(h, catalog(h))
    assert ("Negative flip rate **0.050**: the share of queries whose nearest neighbour had the right class before the "
            "update (v1 searching its own gallery) and the wrong one after it (v2 queries against the upgraded "
            "gallery) (and 0.237 the other way, wrong before and right after)") in text
    assert "Over seeds 0, 1, 2 of the same recipe: CMC top-1 0.864, negative flip rate 0.052 ± 0.002." in text
    assert ": v1 -> v2, mAP 0.800, negative flips 0.050" in describe_model("transformation", catalog(h))


def test_a_transformation_without_flips_says_nothing_about_them():
    h = transformation({})
    assert "flip" not in describe(h, catalog(h)) and "flip" not in describe_model("transformation", catalog(h))
