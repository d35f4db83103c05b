"""``fit_transformation``: h fitted on images or vector pairs, validated and registered in a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import factories
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from fct_registry.core.config import TransformationParams
from fct_registry.core.errors import ChainError, ConfigError, DataError, RegistryError
from fct_registry.method.training import cached_features, train_transformation
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.onnx_boundary.image_folder import scan_image_folder
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.registry.versions import input_contract
from fct_registry.usecases import fit, fit_data, upgrade
from fct_registry.usecases.features import CACHE_DIR
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.flips import negative_flips
from fct_registry.vectors.metrics import knn_overlap, retrieval_metrics, top1_correct

PARAMS = TransformationParams(hidden_dim=16, epochs=3, batch_size=8, lr=1e-3)


def write_images(split, folder: Path, labelled: bool = True) -> Path:
    """PNG files of a split: ``folder/class<c>/<id>.png`` (labelled) or ``folder/<id>.png``."""
    for image, label, item in zip(split.images, split.labels, split.item_ids, strict=True):
        path = folder / f"class{label}" / f"{item}.png" if labelled else folder / f"{item}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(path)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> factories.World:
    """A world of its own without transformations (v1, v2, v3, s1 and the v1 gallery)."""
    return factories.fresh_world(tmp_path_factory, keys=["v1", "v2", "v3", "s1"])


@pytest.fixture(scope="module")
def folders(world: factories.World) -> dict[str, Path]:
    splits = world.zoo.splits
    return {"train": write_images(splits["train"], world.root / "images" / "train"),
            "val": write_images(splits["test"], world.root / "images" / "val"),
            "flat": write_images(splits["test"], world.root / "images" / "flat", labelled=False)}


@pytest.fixture(scope="module")
def fitted(world, folders) -> fit.FitResult:
    with pytest.raises(ChainError):  # no transformation is registered yet
        upgrade.plan_upgrade(world.registry, EmbeddingSet.open(world.gallery), world.versions["v2"])
    return fit.fit_transformation(world.registry, "v1", "v2", "s1", train=folders["train"], val=folders["val"],
                                  params=PARAMS)


def features(world: factories.World, key: str, folder: Path) -> np.ndarray:
    """A registered model's features of an image folder, recomputed without the cache."""
    version = world.versions[key]
    model = OnnxModel(world.registry.onnx_path(version))
    contract = input_contract(version, model.input_shapes[model.input_names[0]])
    scanned = scan_image_folder(folder)
    return np.concatenate([embed_images(model, images, contract) for _, images in scanned.iter_decoded(contract)])


def transformations(world: factories.World) -> int:
    return len(world.registry.versions("transformation"))


def test_fit_from_images_registers_the_edge_with_metrics_that_a_recomputation_reproduces(world, folders, fitted):
    version = world.registry.get("transformation", fitted.version.version)
    tags, v = version.tags, world.versions
    assert version.ref.label == "h-v1-v2"
    assert (tags["fct.source_label"], tags["fct.target_label"], tags["fct.side_info_label"]) == ("v1", "v2", "s1")
    assert (tags["fct.source_sha256"], tags["fct.target_sha256"], tags["fct.side_info_sha256"]) == (
        v["v1"].ref.sha256, v["v2"].ref.sha256, v["s1"].ref.sha256)
    assert tags["fct.metric"] == "l2" and tags["fct.data_hash"].startswith("images-sha256:")
    assert fitted.labelled and (fitted.n_train, fitted.n_val) == (20, 50)

    old, side, new = (features(world, key, folders["val"]) for key in ("v1", "s1", "v2"))
    transformed = fit.apply_onnx(world.registry.onnx_path(version), old, side)
    labels, ids = scan_image_folder(folders["val"]).labels, np.arange(50)
    expected = retrieval_metrics(new, labels, transformed, labels, "l2", ids, ids)
    for key in ("cmc_top1", "cmc_top5", "map"):
        assert float(tags[f"fct.{key}"]) == pytest.approx(expected[key], abs=1e-6)
        assert fitted.metrics[key] == pytest.approx(expected[key], abs=1e-6)
    reference = retrieval_metrics(old, labels, old, labels, "l2", ids, ids)
    assert fitted.metrics["old_old_map"] == pytest.approx(reference["map"], abs=1e-6)
    flips = negative_flips(top1_correct(old, labels, old, labels, "l2", ids, ids),
                           top1_correct(new, labels, transformed, labels, "l2", ids, ids))
    assert float(tags["fct.negative_flips"]) == pytest.approx(flips.negative_rate, abs=1e-9)
    assert float(tags["fct.positive_flips"]) == pytest.approx(flips.positive_rate, abs=1e-9)
    assert fitted.metrics["positive_flips"] - fitted.metrics["negative_flips"] == pytest.approx(
        fitted.metrics["cmc_top1"] - fitted.metrics["old_old_cmc_top1"], abs=1e-9)
    assert 0 <= float(tags["fct.knn_overlap"]) <= 1
    assert float(tags["fct.knn_overlap"]) == pytest.approx(knn_overlap(new, transformed, "l2"), abs=1e-6)


def test_features_are_cached_per_model_and_folder_and_reused_by_a_second_fit(world, folders, fitted):
    cache = world.root.resolve() / CACHE_DIR
    assert sorted(f.path.parent.name for f in fitted.features) == sorted(
        world.versions[k].ref.sha256 for k in ("v1", "s1", "v2") for _ in ("train", "val"))
    assert all(f.path.is_file() and f.path.is_relative_to(cache) for f in fitted.features)
    np.testing.assert_array_equal(np.load(fitted.features[0].path), fitted.features[0].vectors)
    mtimes = {f.path: f.path.stat().st_mtime_ns for f in fitted.features}

    extracted, epochs = [], []
    again = fit.fit_transformation(
        world.registry, "v1", "v2", "s1", train=folders["train"], val=folders["val"], label="h-v1-v2-e2",
        params=PARAMS.model_copy(update={"epochs": 2}),
        on_features=lambda what, done, total, cached: extracted.append((what, cached)),
        on_epoch=lambda epoch, total, mse: epochs.append((epoch, total)))
    assert all(f.from_cache for f in again.features) and not any(cached is False for _, cached in extracted)
    assert {f.path: f.path.stat().st_mtime_ns for f in again.features} == mtimes
    assert epochs == [(1, 2), (2, 2)]
    assert again.version.ref.label == "h-v1-v2-e2" and again.version.version != fitted.version.version


def test_unlabelled_validation_reports_the_knn_overlap_and_no_cmc(world, folders):
    before = transformations(world)
    result = fit.fit_transformation(world.registry, "v1", "v2", None, train=folders["train"], val=folders["flat"],
                                    params=PARAMS)
    tags = result.version.tags
    assert not result.labelled and result.version.ref.label == "h-v1-v2-noside"
    assert "fct.side_info_label" not in tags and "fct.cmc_top1" not in tags and "fct.map" not in tags
    assert "fct.negative_flips" not in tags
    assert 0 <= float(tags["fct.knn_overlap"]) <= 1
    assert transformations(world) == before + 1


def write_pairs(world: factories.World, folders, path: Path, drop: str | None = None, old_dim: int | None = None
                ) -> Path:
    old, side, new = (features(world, key, folders["val"]) for key in ("v1", "s1", "v2"))
    old = old[:, :old_dim] if old_dim else old
    columns = {"old": pa.FixedSizeListArray.from_arrays(pa.array(old.reshape(-1)), old.shape[1]),
               "new": pa.array(list(new)), "side_info": pa.array(list(side)),
               "label": pa.array(scan_image_folder(folders["val"]).labels)}
    columns.pop(drop, None)
    pq.write_table(pa.table(columns), path)
    return path


def test_fit_from_pairs_needs_no_images_and_validates_on_held_out_rows(world, folders, tmp_path):
    path = write_pairs(world, folders, tmp_path / "pairs.parquet")
    result = fit.fit_transformation(world.registry, "v1", "v2", "s1", pairs=path, val_fraction=0.2, params=PARAMS,
                                    label="h-v1-v2-pairs")
    assert (result.n_train, result.n_val, result.labelled, result.features) == (40, 10, True, ())
    tags = result.version.tags
    assert tags["fct.data_hash"].startswith("pairs-sha256:") and tags["fct.side_info_label"] == "s1"
    data = fit_data.pairs_data(path, fit_data.resolve_models(world.registry, "v1", "v2", "s1"), 0.2, PARAMS.seeds[0])
    old, side, new = data.val
    transformed = fit.apply_onnx(world.registry.onnx_path(result.version), old, side)
    ids = np.arange(10)
    expected = retrieval_metrics(new, data.val_labels, transformed, data.val_labels, "l2", ids, ids)
    assert float(tags["fct.map"]) == pytest.approx(expected["map"], abs=1e-6)
    assert float(tags["fct.cmc_top1"]) == pytest.approx(expected["cmc_top1"], abs=1e-6)


def test_bad_inputs_are_one_line_errors_and_register_nothing(world, folders, tmp_path):
    before = transformations(world)
    pairs = write_pairs(world, folders, tmp_path / "pairs.parquet")
    cases = [
        (RegistryError, "unknown fct-backbone version 'v9'", dict(source="v9", pairs=pairs)),
        (RegistryError, "same backbone", dict(target="v1", pairs=pairs)),
        (DataError, "column 'side_info'", dict(pairs=write_pairs(world, folders, tmp_path / "a.parquet", "side_info"))),
        (DataError, "'old' has 5-d vectors but fct-backbone", dict(pairs=write_pairs(world, folders,
                                                                                    tmp_path / "b.parquet",
                                                                                    old_dim=5))),
        (DataError, "does not exist", dict(pairs=tmp_path / "missing.parquet")),
        (DataError, "holds no PNG", dict(train=tmp_path)),
        (ConfigError, "exactly one", dict()),
        (ConfigError, "exactly one", dict(train=folders["train"], pairs=pairs)),
    ]
    for error, phrase, kwargs in cases:
        arguments = dict(source="v1", target="v2", side_info="s1") | kwargs
        with pytest.raises(error, match=phrase) as raised:
            fit.fit_transformation(world.registry, arguments.pop("source"), arguments.pop("target"),
                                   arguments.pop("side_info"), params=PARAMS, **arguments)
        assert "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match="transformation.epochs"):
        fit.transformation_params(world.root, epochs=0)
    assert transformations(world) == before


def test_an_interrupted_fit_registers_nothing(world, folders):
    before = transformations(world)

    def interrupt(epoch: int, epochs: int, mse: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit.fit_transformation(world.registry, "v1", "v2", "s1", train=folders["train"], params=PARAMS,
                               label="h-interrupted", on_epoch=interrupt)
    assert transformations(world) == before


def test_upgrade_plans_a_fitted_edge(world, fitted, tmp_path):
    gallery = EmbeddingSet.open(world.gallery)
    done = upgrade.run_upgrade(world.registry, gallery, world.versions["v2"], tmp_path / "gallery_v1@v2")
    steps, output = done.steps, done.output
    fitted_edges = {f"{v.name}/{v.version}": v for v in world.registry.versions("transformation")}
    (step,) = steps
    chosen = fitted_edges[step.name]  # the best-mAP one-hop edge among those this module fitted
    assert chosen.tags["fct.map"] == max((v.tags["fct.map"] for v in fitted_edges.values() if "fct.map" in v.tags),
                                         key=float)
    stored = gallery.read()
    np.testing.assert_allclose(output.read().embeddings,
                               fit.apply_onnx(world.registry.onnx_path(chosen), stored.embeddings, stored.side_info),
                               atol=1e-5)


def test_the_epoch_callback_leaves_training_unchanged():
    rng = np.random.default_rng(1)
    old, side, new = (rng.normal(size=(40, d)).astype(np.float32) for d in (8, 6, 16))
    seen = []
    plain, plain_metrics = train_transformation(cached_features(old, side, new), PARAMS, 3)
    watched, watched_metrics = train_transformation(cached_features(old, side, new), PARAMS, 3,
                                                    on_epoch=lambda epoch, values: seen.append((epoch, values)))
    for a, b in zip(plain.state_dict().values(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [epoch for epoch, _ in seen] == [0, 1, 2]
    assert seen[-1][1]["train_mse"] == plain_metrics["train_mse"] == watched_metrics["train_mse"]


def test_fastfill_fit_registers_an_h_with_an_uncertainty_output_and_says_what_its_classifier_is(world, folders):
    """FastFill's loss (Jaeckle et al., ICLR 2023) needs W_new: a registered backbone has none, so fit fits a linear
    classifier on the target's training embeddings and records it; unlabelled data is refused in one line."""
    params = PARAMS.model_copy(update={"loss": "fastfill"})
    result = fit.fit_transformation(world.registry, "v1", "v2", "s1", train=folders["train"], val=folders["val"],
                                    params=params, label="h-v1-v2-fastfill")
    assert OnnxModel(world.registry.onnx_path(result.version)).has_uncertainty
    assert 0.0 <= result.metrics["classifier_accuracy"] <= 1.0 and "map" in result.metrics
    assert result.version.tags["fct.transformation_kind"] == "fastfill"
    with pytest.raises(ConfigError, match="the fastfill loss needs a class label on every training item"):
        fit.fit_transformation(world.registry, "v1", "v2", "s1", train=folders["flat"], params=params,
                               label="h-unlabelled")
