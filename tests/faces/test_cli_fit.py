"""``fct-registry fit`` through Typer's CliRunner, over a real MLflow SQLite store and real ONNX models."""

from __future__ import annotations

from pathlib import Path

import factories
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_checks import fails, succeeds
from PIL import Image
from typer.testing import CliRunner

from fct_registry.cli.app import app
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.usecases.features import CACHE_DIR
from fct_registry.usecases.fit import apply_onnx
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.metrics import retrieval_metrics

runner = CliRunner(env={"COLUMNS": "250"})
SMALL = ["--epochs", "2", "--hidden-dim", "16", "--batch-size", "8", "--lr", "0.001"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> factories.World:
    """A world of its own without transformations, with its splits as PNG class folders under images/."""
    world = factories.fresh_world(tmp_path_factory, keys=["v1", "v2", "v3", "s1"])
    for name, split in (("train", world.zoo.splits["train"]), ("val", world.zoo.splits["test"])):
        for image, label, item in zip(split.images, split.labels, split.item_ids, strict=True):
            path = world.root / "images" / name / f"class{label}" / f"{item}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0]).save(path)
    return world


def cli(world: factories.World, *args: str):
    return runner.invoke(app, ["--root", str(world.root), *map(str, args)])


def transformations(world: factories.World) -> list[str]:
    return [f"{v.ref.label}/{v.version}" for v in world.registry.versions("transformation")]


def test_fit_from_images_prints_epochs_registers_the_edge_and_upgrade_uses_it(world):
    stdout = succeeds(cli(world, "fit", "--from", "v1", "--to", "v2", "--side-info", "s1", "--train", "images/train",
                          "--val", "images/val", *SMALL))
    assert "features v1 train: 20 images extracted" in stdout and "features s1 val: 50 images extracted" in stdout
    assert "epoch 1/2: train MSE" in stdout and "epoch 2/2: train MSE" in stdout
    version = world.registry.get("transformation", "h-v1-v2")
    assert f"registered fct-transformation/{version.version} ({version.ref}): v1 -> v2, side-info s1" in stdout
    tags = version.tags
    assert (tags["fct.source_label"], tags["fct.target_label"], tags["fct.side_info_label"]) == ("v1", "v2", "s1")
    assert len(list((world.root / CACHE_DIR).rglob("*.npy"))) == 6  # 3 models x 2 folders

    # the registered mAP is that of the registered ONNX file on the validation images
    models = {key: OnnxModel(world.registry.onnx_path(world.versions[key])) for key in ("v1", "s1", "v2")}
    images, labels = world.zoo.splits["test"].images, world.zoo.splits["test"].labels
    order = np.argsort([f"class{label}/{item}.png" for label, item in zip(labels, world.zoo.splits["test"].item_ids,
                                                                          strict=True)])
    old, side, new = (embed_images(models[key], images[order]) for key in ("v1", "s1", "v2"))
    transformed = apply_onnx(world.registry.onnx_path(version), old, side)
    ids = np.arange(len(order))
    expected = retrieval_metrics(new, labels[order], transformed, labels[order], "l2", ids, ids)
    assert float(tags["fct.map"]) == pytest.approx(expected["map"], abs=1e-6)
    assert float(tags["fct.cmc_top1"]) == pytest.approx(expected["cmc_top1"], abs=1e-6)
    assert f"{expected['map']:.4f}" in stdout

    plan = succeeds(cli(world, "upgrade", "gallery_v1", "--to", "v2", "--dry-run"))
    assert f"fct-transformation/{version.version}" in plan and "dry run: the chain is valid" in plan
    succeeds(cli(world, "upgrade", "gallery_v1", "--to", "v2"))
    assert EmbeddingSet.open(world.sets_root / "gallery_v1@v2").manifest.model == world.versions["v2"].ref


def test_a_second_fit_reads_the_cached_features(world):
    cache = sorted((world.root / CACHE_DIR).rglob("*.npy"))
    mtimes = [p.stat().st_mtime_ns for p in cache]
    stdout = succeeds(cli(world, "fit", "--from", "v1", "--to", "v2", "--train", "images/train", "--epochs", "3",
                          "--hidden-dim", "8", "--batch-size", "8"))
    assert "features v1 train: 20 images (cached)" in stdout and "extracted" not in stdout
    assert "epoch 3/3" in stdout and "h-v1-v2-noside" in stdout
    assert [p.stat().st_mtime_ns for p in sorted((world.root / CACHE_DIR).rglob("*.npy"))] == mtimes


def write_pairs(path: Path, old_dim: int = 8, with_side: bool = True) -> Path:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 8)
    columns = {"old": pa.array(list(rng.normal(size=(40, old_dim)).astype(np.float32))),
               "new": pa.array(list(rng.normal(size=(40, 16)).astype(np.float32))),
               "label": pa.array(labels)}
    if with_side:
        columns["side_info"] = pa.array(list(rng.normal(size=(40, 6)).astype(np.float32)))
    pq.write_table(pa.table(columns), path)
    return path


def test_fit_from_pairs_and_bad_inputs(world):
    write_pairs(world.root / "pairs.parquet")
    write_pairs(world.root / "wide.parquet", old_dim=9)
    write_pairs(world.root / "noside.parquet", with_side=False)
    before = transformations(world)
    fails(cli(world, "fit", "--from", "v9", "--to", "v2", "--pairs", "pairs.parquet"),
          "unknown fct-backbone version 'v9'")
    fails(cli(world, "fit", "--from", "v1", "--to", "v2", "--side-info", "s1", "--pairs", "wide.parquet"),
          "column 'old' has 9-d vectors", "8 dims")
    fails(cli(world, "fit", "--from", "v1", "--to", "v2", "--side-info", "s1", "--pairs", "noside.parquet"),
          "no column 'side_info'")
    fails(cli(world, "fit", "--from", "v1", "--to", "v2", "--train", "images/train", "--pairs", "pairs.parquet"),
          "exactly one")
    fails(cli(world, "fit", "--from", "v1", "--to", "v2", "--train", "images/nowhere"), "does not exist")
    assert transformations(world) == before

    stdout = succeeds(cli(world, "fit", "--from", "v1", "--to", "v2", "--side-info", "s1", "--pairs",
                          "pairs.parquet", "--val-fraction", "0.25", "--label", "h-v1-v2-pairs", *SMALL))
    assert "validation of h-v1-v2-pairs on 10 items (trained on 30)" in stdout
    version = world.registry.get("transformation", "h-v1-v2-pairs")
    assert version.tags["fct.data_hash"].startswith("pairs-sha256:") and "fct.map" in version.tags
    assert transformations(world) == [*before, f"h-v1-v2-pairs/{version.version}"]
