"""The backfill use case (FastFill's partial backfill, Jaeckle et al., ICLR 2023) over a real MLflow SQLite registry,
real ONNX models and the real prepared split of the tiny world (``backfill_world``)."""

from __future__ import annotations

import json
from pathlib import Path

import backfill_world
import factories
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from fct_registry.core.errors import DataError, UpgradeError, VersionMismatchError
from fct_registry.engines.backfill import backfill_order
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.registry.versions import file_sha256
from fct_registry.usecases import backfill
from fct_registry.usecases.project import PreparedSources, item_sources
from fct_registry.usecases.sets import embed_folder, set_models
from fct_registry.usecases.upgrade import run_upgrade
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.metrics import retrieval_metrics


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> factories.World:
    return backfill_world.fastfill_world(tmp_path_factory)


@pytest.fixture
def sets_root(world: factories.World, tmp_path: Path) -> Path:
    return factories.copy_sets(world, tmp_path / "sets")


def run(world: factories.World, path: Path, fraction: float, order: str = "uncertainty", to: str = "v2", **options):
    plan = backfill.plan_backfill(EmbeddingSet.open(path), world.versions[to], fraction, order,
                                  world.root, **options)
    return backfill.run_backfill(world.registry, plan)


def v2_of_test_images(world: factories.World, ids: np.ndarray) -> np.ndarray:
    """v2's ONNX embedding of the prepared test images of ``ids``, computed here (rows by item id)."""
    split = world.zoo.splits["test"]
    rows = np.searchsorted(split.item_ids, ids)
    return embed_images(OnnxModel(world.zoo.dirs["v2"] / "model.onnx"), split.images[rows])


def test_the_upgrade_carries_sources_and_sigma_and_h_is_tagged_fastfill(world, tmp_path_factory):
    upgraded = EmbeddingSet.open(world.sets_root / "gallery_v1@v2")
    assert (upgraded.path / "sources.json").read_bytes() == (world.gallery / "sources.json").read_bytes()
    sources = item_sources(upgraded)
    assert isinstance(sources, PreparedSources) and sources.data_dir == Path("data/prepared")
    assert sources.data_version == file_sha256(world.root / "data" / "prepared" / "test.npz")
    assert sources.rows == {1000 + i: i for i in range(50)}
    assert upgraded.manifest.uncertainty and upgraded.manifest.backfilled is None
    assert world.versions[backfill_world.FASTFILL].tags["fct.transformation_kind"] == "fastfill"
    assert factories.shared_world(tmp_path_factory).versions["h-v1-v2"].tags["fct.transformation_kind"] == "fct"


def test_uncertainty_order_backfills_exactly_the_top_sigma_items(world, sets_root):
    path = sets_root / "gallery_v1@v2"
    before = EmbeddingSet.open(path).read()
    result = run(world, path, 0.2)
    after = EmbeddingSet.open(path).read()
    top = np.lexsort((before.ids, -before.uncertainty.astype(np.float64)))[:10]  # sigma descending, ties by id
    assert result.state == "written" and result.output.manifest.backfilled == 10
    np.testing.assert_array_equal(result.plan.chosen, before.ids[top])
    chosen = np.isin(after.ids, before.ids[top])
    np.testing.assert_array_equal(after.backfilled, chosen)
    np.testing.assert_allclose(after.embeddings[chosen], v2_of_test_images(world, after.ids[chosen]), rtol=1e-5,
                               atol=1e-6)
    assert after.embeddings[~chosen].tobytes() == before.embeddings[~chosen].tobytes()
    for column in ("ids", "labels", "side_info", "uncertainty"):
        assert getattr(after, column).tobytes() == getattr(before, column).tobytes(), column
    assert after.embeddings[chosen].tobytes() != before.embeddings[chosen].tobytes()
    assert result.output.manifest.model == world.versions["v2"].ref
    assert result.output.manifest.lineage[-1].startswith(f"backfilled 10 items with {world.versions['v2'].ref} "
                                                         "(uncertainty order, now 10 of 50) from prepared split")
    assert sorted(p.name for p in path.iterdir()) == ["backfill.json", "manifest.json", "part-00000.parquet",
                                                      "sources.json"]


def test_the_run_and_sidecar_record_the_backfill_and_the_mixed_gallery(world, sets_root):
    path = sets_root / "gallery_v1@v2"
    before = EmbeddingSet.open(path).read()  # the set is replaced in place
    upgrade_record = json.loads((path / "upgrade.json").read_text())
    input_sha = file_sha256(path / "manifest.json")
    result = run(world, path, 0.1, order="random", seed=7)
    record = json.loads((path / "backfill.json").read_text())
    assert {k: record[k] for k in ("order", "seed", "fraction", "goal", "count", "backfilled")} == {
        "order": "random", "seed": 7, "fraction": 0.1, "goal": 5, "count": 50, "backfilled": 5}
    assert record["upgrade"] == upgrade_record and len(record["runs"]) == 1
    assert record["runs"][0]["input_manifest_sha256"] == input_sha and record["runs"][0]["re_embedded"] == 5
    client = MlflowClient(world.registry.tracking_uri)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("fct-registry").experiment_id],
                                       f"params.output_set = '{path.resolve()}'")
    params, metrics = mlflow_run.data.params, mlflow_run.data.metrics
    assert (params["order"], params["seed"], params["fraction"], params["goal"]) == ("random", "7", "0.1", "5")
    assert params["output_manifest_sha256"] == file_sha256(path / "manifest.json")
    assert params["input_manifest_sha256"] == input_sha and mlflow_run.data.tags["fct.kind"] == "backfill"
    assert metrics["re_embedded"] == 5 and metrics["backfilled"] == 5 and metrics["backfilled_fraction"] == 0.1
    # every labelled item (50 <= 1000) as a v2 query, against the mixed gallery and against the set before
    queries = v2_of_test_images(world, np.arange(1000, 1050))
    labels = world.zoo.splits["test"].labels
    for prefix, gallery in (("", result.output.read()), ("input_", before)):
        expected = retrieval_metrics(queries, labels, gallery.embeddings, gallery.labels, "l2",
                                     query_ids=np.arange(1000, 1050), gallery_ids=gallery.ids)
        for key, value in expected.items():
            assert metrics[prefix + key] == pytest.approx(value, abs=1e-5), prefix + key
            assert result.metrics[prefix + key] == pytest.approx(value, abs=1e-5)
    assert metrics["cmc_top1"] != metrics["input_cmc_top1"] or metrics["map"] != metrics["input_map"]


def test_a_second_run_continues_and_a_smaller_fraction_does_nothing(world, sets_root):
    path = sets_root / "gallery_v1@v2"
    first = run(world, path, 0.2)
    vectors = EmbeddingSet.open(path).read()
    second = run(world, path, 0.5)
    after = EmbeddingSet.open(path).read()
    ordered = backfill_order(vectors.ids, "uncertainty", vectors.uncertainty)
    np.testing.assert_array_equal(first.plan.chosen, ordered[:10])
    np.testing.assert_array_equal(second.plan.chosen, ordered[10:25])
    assert second.plan.already == 10 and after.backfilled.sum() == 25
    np.testing.assert_array_equal(np.sort(after.ids[after.backfilled]), np.sort(ordered[:25]))
    kept = np.isin(after.ids, ordered[:10]) | ~after.backfilled
    assert after.embeddings[kept].tobytes() == vectors.embeddings[kept].tobytes()
    assert [r["re_embedded"] for r in json.loads((path / "backfill.json").read_text())["runs"]] == [10, 15]
    untouched = factories.tree(path)
    for fraction in (0.3, 0.5):
        again = run(world, path, fraction)
        assert again.state == "unchanged" and not again.recorded and len(again.plan.chosen) == 0
    assert factories.tree(path) == untouched


def test_random_order_is_a_reproducible_seeded_permutation(world, sets_root, tmp_path):
    path = sets_root / "gallery_v1@v2"
    results = [run(world, path, 0.3, order="random", seed=5, dest=tmp_path / f"copy{i}") for i in range(2)]
    assert results[0].plan.chosen.tolist() == results[1].plan.chosen.tolist()
    np.testing.assert_array_equal(results[0].plan.chosen,
                                  np.arange(1000, 1050)[np.random.default_rng(5).permutation(50)][:15])
    shards = [factories.tree(r.output.path)["part-00000.parquet"] for r in results]
    assert shards[0] == shards[1]
    # the seed is recorded with the set: a later run without --seed continues the same permutation
    more = run(world, tmp_path / "copy0", 0.4, order="random")
    assert more.plan.seed == 5
    np.testing.assert_array_equal(more.plan.chosen,
                                  np.arange(1000, 1050)[np.random.default_rng(5).permutation(50)][15:20])


def test_bad_requests_are_refused_before_anything_is_written(world, sets_root):
    path = sets_root / "gallery_v1@v2"
    before = factories.tree(sets_root)
    for fraction in (0.0, -0.1, 1.5):
        with pytest.raises(DataError, match=rf"fraction {fraction} is outside \(0, 1\]"):
            run(world, path, fraction)
    with pytest.raises(VersionMismatchError, match=rf"holds vectors of {world.versions['v2'].ref}, not of --to "
                                                   rf"{world.versions['v3'].ref}"):
        run(world, path, 0.2, to="v3")
    with pytest.raises(DataError, match="has no uncertainty column .* use --order random"):
        run(world, sets_root / "gallery_v1", 0.2, to="v1")
    with pytest.raises(DataError, match="unknown backfill order 'distance'"):
        run(world, path, 0.2, order="distance")
    (sets_root / "elsewhere").mkdir()
    with pytest.raises(UpgradeError, match="already exists and is not this backfill"):
        run(world, path, 0.2, dest=sets_root / "elsewhere")
    assert factories.tree(sets_root) == before


def test_changed_or_missing_prepared_images_are_refused(world, sets_root, tmp_path):
    path = sets_root / "gallery_v1@v2"
    before = factories.tree(sets_root)
    data = tmp_path / "data"
    data.mkdir()
    split = world.zoo.splits["test"]
    np.savez(data / "test.npz", images=255 - split.images, labels=split.labels, item_ids=split.item_ids)
    with pytest.raises(VersionMismatchError, match=rf"prepared split {data / 'test.npz'} changed since the set was "
                                                   "embedded"):
        run(world, path, 0.2, images=data)
    with pytest.raises(DataError, match="prepared split .*missing .*pass --images"):
        run(world, path, 0.2, images=tmp_path / "nowhere")
    assert factories.tree(sets_root) == before
    # the very same file elsewhere is accepted
    (data / "test.npz").write_bytes((world.root / "data" / "prepared" / "test.npz").read_bytes())
    assert run(world, path, 0.2, images=data).output.manifest.backfilled == 10


@pytest.fixture
def folder_set(world: factories.World, tmp_path: Path) -> tuple[Path, Path]:
    """A class-folder gallery of 24 test images, embedded by v1 + s1 and upgraded by the FastFill h to v2."""
    split = world.zoo.splits["test"]
    for i in range(24):
        folder = tmp_path / "images" / f"class{split.labels[i * 2]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(split.images[i * 2, 0]).save(folder / f"{i:02d}.png")
    embedded = embed_folder(world.registry, tmp_path / "images", set_models(world.registry, "v1", "s1"),
                            tmp_path / "sets" / "folder_v1")
    upgraded = tmp_path / "sets" / "folder_v1@v2"
    run_upgrade(world.registry, embedded, world.versions["v2"], upgraded)
    return tmp_path / "images", upgraded


def test_a_folder_set_is_backfilled_from_its_images(world, folder_set, tmp_path):
    images, path = folder_set
    sources = item_sources(EmbeddingSet.open(path))
    moved = tmp_path / "moved"
    images.rename(moved)
    result = run(world, path, 0.25, images=moved)
    after = EmbeddingSet.open(path).read()
    chosen = after.backfilled
    assert chosen.sum() == 6 and result.plan.where == f"image folder {moved}"
    pixels = np.stack([np.asarray(Image.open(moved / sources.files[int(i)]))[None] for i in after.ids[chosen]])
    np.testing.assert_allclose(after.embeddings[chosen],
                               embed_images(OnnxModel(world.zoo.dirs["v2"] / "model.onnx"), pixels), rtol=1e-5,
                               atol=1e-6)


def test_a_run_failing_or_interrupted_midway_leaves_the_set_byte_identical(world, folder_set):
    images, path = folder_set
    sources = item_sources(EmbeddingSet.open(path))
    before = factories.tree(path.parent)
    plan = backfill.plan_backfill(EmbeddingSet.open(path), world.versions["v2"], 1.0, "uncertainty",
                                  world.root)
    late = images / sources.files[int(plan.chosen[-1])]  # the last image in order, read after 23 others
    original = late.read_bytes()
    late.write_bytes(original[:-20] + b"\0" * 20)
    with pytest.raises(VersionMismatchError, match=rf"image {late} of item_id {int(plan.chosen[-1])} changed since"):
        backfill.run_backfill(world.registry, plan, batch_rows=4, image_batch=2, eval_queries=0)
    late.unlink()
    with pytest.raises(DataError, match=rf"image {late} of item_id {int(plan.chosen[-1])} is missing"):
        backfill.run_backfill(world.registry, plan, batch_rows=4, image_batch=2, eval_queries=0)
    late.write_bytes(original)

    def interrupt(done: int, total: int) -> None:
        if done >= 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        backfill.run_backfill(world.registry, plan, batch_rows=4, image_batch=2, eval_queries=0, progress=interrupt)
    assert factories.tree(path.parent) == before
    assert not list(path.parent.glob(".tmp-*"))


def backfill_runs(world: factories.World, path: Path) -> list:
    client = MlflowClient(world.registry.tracking_uri)
    return client.search_runs([client.get_experiment_by_name("fct-registry").experiment_id],
                              f"params.output_set = '{path.resolve()}'")


def test_a_rerun_after_a_kill_between_rename_and_record_writes_the_missing_record(world, sets_root):
    path, out = sets_root / "gallery_v1@v2", sets_root / "out"
    for dest in (out, None):  # into a new set, then in place
        run(world, path, 0.2, dest=dest)
        target = dest or path
        (recorded,) = backfill_runs(world, target)
        MlflowClient(world.registry.tracking_uri).delete_run(recorded.info.run_id)  # the state such a kill leaves
        written = factories.tree(target)
        again = run(world, path, 0.2, dest=dest)
        assert again.state == ("unchanged" if dest is None else "completed") and again.recorded
        (rerecorded,) = backfill_runs(world, target)
        assert rerecorded.data.params["output_manifest_sha256"] == file_sha256(target / "manifest.json")
        assert rerecorded.data.metrics["re_embedded"] == 10 and factories.tree(target) == written
        assert not run(world, path, 0.2, dest=dest).recorded
