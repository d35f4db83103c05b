"""A tiny world for the backfill tests: the factories' backbones v1, v2, v3 and side-info s1, and a FastFill
transformation h v1 + s1 -> v2 with an ``uncertainty`` output (Jaeckle et al., ICLR 2023) as the only link to v2.

Sets (under ``world.sets_root``):
- ``gallery_v1``: the prepared test split (50 items, labels 0..4) embedded by v1 with s1 side-info, built with
  ``prepared_from=("data/prepared", "test")`` from the project root, so its ``sources.json`` records a relative
  data folder;
- ``gallery_v1@v2``: that gallery upgraded by the FastFill h: v2 vectors plus sigma per item.

Shared by ``tests/usecases/test_backfill.py`` and ``tests/faces/test_cli_backfill.py`` (one build per session, ~5 s);
read-only: copy the sets (``factories.copy_sets``) before writing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import factories
import pytest
import torch

from fct_registry.method.models.transformation import ForwardTransformation
from fct_registry.onnx_boundary.model_files import write_model_dir
from fct_registry.registry.publishing import publish_model
from fct_registry.usecases.sets import build_gallery
from fct_registry.usecases.upgrade import run_upgrade
from fct_registry.vectors.embedding_set import EmbeddingSet

FASTFILL = "h-ff-v1-v2"


def fastfill_world(tmp_path_factory: pytest.TempPathFactory) -> factories.World:
    """The session's backfill world (see the module docstring); ``world.versions[FASTFILL]`` is the h."""
    return factories._cached(tmp_path_factory, "backfill-world", lambda: _build(tmp_path_factory))


def _build(tmp_path_factory: pytest.TempPathFactory) -> factories.World:
    world = factories.fresh_world(tmp_path_factory, keys=["v1", "v2", "v3", "s1"])
    zoo = world.zoo
    torch.manual_seed(3)
    h = ForwardTransformation(factories.DIMS["v1"], factories.DIMS["v2"], factories.DIMS["s1"], hidden_dim=16,
                              uncertainty=True).eval()
    links = {"source": zoo.cards["v1"].ref, "target": zoo.cards["v2"].ref, "side_info": zoo.cards["s1"].ref}
    folder = tmp_path_factory.mktemp("fastfill") / FASTFILL
    write_model_dir(h, folder, "transformation", FASTFILL, {}, links=links)
    world.versions[FASTFILL] = publish_model(world.registry, folder, "l2", "test-data-md5", "test-commit", {},
                                             metrics={"cmc_top1": 0.7, "cmc_top5": 0.9, "map": 0.6})
    with contextlib.chdir(world.root):
        build_gallery(zoo.splits["test"], zoo.dirs["v1"] / "model.onnx", zoo.cards["v1"].ref,
                      zoo.dirs["s1"] / "model.onnx", zoo.cards["s1"].ref, Path("embeddings/gallery_v1"), "l2",
                      prepared_from=(Path("data/prepared"), "test"))
    run_upgrade(world.registry, EmbeddingSet.open(world.gallery), world.versions["v2"],
                world.sets_root / "gallery_v1@v2")
    return world
