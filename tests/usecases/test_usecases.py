"""Application operations (fct_registry.usecases) against a real MLflow SQLite store and real ONNX models."""

from __future__ import annotations

import dataclasses

import factories
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from fct_registry.core.errors import (
    ChainError,
    ConfigError,
    DataError,
    RegistryError,
    SearchError,
    VersionMismatchError,
)
from fct_registry.core.refs import ModelRef
from fct_registry.onnx_boundary.contract import InputContract
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.onnx_boundary.images import read_image
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.registry.mlflow_store import default_tracking_uri
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import file_sha256
from fct_registry.usecases import evaluate, models, project, promote, sets, ui, upgrade
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.flips import negative_flips
from fct_registry.vectors.metrics import retrieval_metrics, top1_correct
from fct_registry.vectors.set_writer import write_embedding_set


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> factories.World:
    return factories.shared_world(tmp_path_factory)


def test_open_registry_reads_the_tracking_uri_from_params(tmp_path, world):
    assert project.open_registry(world.root).tracking_uri == default_tracking_uri(world.root)
    assert project.load_settings(world.root).registry.promote_map_floor == factories.MAP_FLOOR
    assert project.open_registry(tmp_path).tracking_uri == default_tracking_uri(tmp_path)  # no params.yaml
    text = (world.root / "params.yaml").read_text().replace("tracking_uri: null", "tracking_uri: sqlite:///x.db")
    (tmp_path / "params.yaml").write_text(text)
    assert project.open_registry(tmp_path).tracking_uri == "sqlite:///x.db"
    (tmp_path / "params.yaml").write_text(text.replace("champion_alias", "champion_alais"))
    with pytest.raises(ConfigError, match="champion_alais"):
        project.open_registry(tmp_path)


def test_plan_maps_the_two_hop_chain_to_registered_onnx_files(world):
    gallery = EmbeddingSet.open(world.gallery)
    steps = upgrade.plan_upgrade(world.registry, gallery, world.versions["v3"])
    v = world.versions
    assert [(s.source, s.target, s.side_info) for s in steps] == [(v["v1"].ref, v["v2"].ref, v["s1"].ref),
                                                                 (v["v2"].ref, v["v3"].ref, v["s1"].ref)]
    assert [s.name for s in steps] == [f"fct-transformation/{v[k].version}" for k in ("h-v1-v2", "h-v2-v3")]
    assert [file_sha256(s.onnx_path) for s in steps] == [v["h-v1-v2"].ref.sha256, v["h-v2-v3"].ref.sha256]
    with pytest.raises(ChainError, match="already at target"):
        upgrade.plan_upgrade(world.registry, gallery, world.versions["v1"])


def test_plan_refuses_a_set_of_an_unregistered_model(world, tmp_path):
    stored = EmbeddingSet.open(world.gallery).read()
    stranger = ModelRef(label="v1", sha256="0" * 64)
    forged = dataclasses.replace(stored, model=stranger)  # the same vectors claimed by an unregistered model
    odd = write_embedding_set(tmp_path / "odd", forged, stranger, world.versions["s1"].ref)
    with pytest.raises(RegistryError, match=rf"set {tmp_path / 'odd'}: v1@000000000000 is not registered"):
        upgrade.plan_upgrade(world.registry, odd, world.versions["v3"])


def test_run_upgrade_records_input_chain_and_output(world, tmp_path):
    dest = tmp_path / "gallery_v1@v3"
    planned = []
    done = upgrade.run_upgrade(world.registry, EmbeddingSet.open(world.gallery), world.versions["v3"], dest,
                               on_plan=planned.append)
    steps, output = done.steps, done.output
    assert planned == [steps] and done.state == "written" and output.path == dest
    assert output.manifest.model == world.versions["v3"].ref
    source = EmbeddingSet.open(world.gallery).read()
    np.testing.assert_allclose(output.read().embeddings,
                               factories.upgrade_by_hand(world.zoo, ["h-v1-v2", "h-v2-v3"], source), atol=1e-4)
    client = MlflowClient(world.registry.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fct-registry").experiment_id],
                                f"params.output_set = '{dest.resolve()}'")
    assert run.data.params["input_set"] == str(world.gallery.resolve())
    assert run.data.params["input_model"] == str(world.versions["v1"].ref)
    assert run.data.params["input_count"] == "50"
    assert run.data.params["chain"] == f"{steps[0].name} -> {steps[1].name}"
    assert run.data.params["output_manifest_sha256"] == file_sha256(dest / "manifest.json")
    assert run.data.metrics["rows"] == 50.0 and run.data.tags["fct.kind"] == "upgrade"
    # negative flips of the upgraded set against its source, each set's own vectors searching it
    after = output.read()
    flips = negative_flips(*(top1_correct(batch.embeddings, batch.labels, batch.embeddings, batch.labels, "l2",
                                          batch.ids, batch.ids) for batch in (source, after)))
    assert run.data.metrics["negative_flips"] == pytest.approx(flips.negative_rate, abs=1e-12)
    assert run.data.metrics["positive_flips"] == pytest.approx(flips.positive_rate, abs=1e-12)
    assert run.data.metrics["flips_queries"] == 50.0 and 0 < flips.negative + flips.positive < 50


def test_dry_run_validates_and_writes_nothing(world, tmp_path):
    done = upgrade.run_upgrade(world.registry, EmbeddingSet.open(world.gallery), world.versions["v2"],
                               tmp_path / "out", dry_run=True)
    assert done.output is None and done.state == "planned" and len(done.steps) == 1
    assert done.note == f"{tmp_path / 'out'} would be created" and list(tmp_path.iterdir()) == []


def test_default_output_drops_the_previous_label(world, tmp_path):
    upgraded = factories.embed_set(world.zoo, "v2", tmp_path / "gallery_v1@v2")
    assert upgrade.default_output(tmp_path, upgraded, world.versions["v3"]) == tmp_path / "gallery_v1@v3"


def test_promote_gate_reachability_and_map_floor(world, tmp_path):
    sets_root = factories.copy_sets(world, tmp_path / "sets")
    promoted = promote.promote(world.registry, "v2", sets_root, alias="wf-ok", map_floor=0.5)
    (check,) = promoted.checks
    assert (check.min_map, check.problem, promoted.forced) == (0.62, None, False)
    assert "wf-ok" in promoted.version.aliases and promoted.version.ref == world.versions["v2"].ref
    with pytest.raises(ChainError, match=r"fct-transformation/2 with registered mAP 0\.450, below the floor 0\.500"):
        promote.promote(world.registry, "v3", sets_root, alias="wf-low", map_floor=0.5)
    factories.embed_set(world.zoo, "v3", sets_root / "gallery_v3")
    with pytest.raises(ChainError, match=r"gallery_v3: set at v3@\w+ is already beyond target v1"):
        promote.promote(world.registry, "v1", sets_root, alias="wf-back")
    forced = promote.promote(world.registry, "v1", sets_root, alias="wf-back", force=True)
    assert forced.forced and "wf-back" in forced.version.aliases
    with pytest.raises(RegistryError, match="alias 'wf-low'"):
        world.registry.resolve_alias("backbone", "wf-low")  # refused promotions set nothing


def test_promote_negative_flip_ceiling_reads_the_registered_link_rates(tmp_path_factory, tmp_path):
    own = factories.fresh_world(tmp_path_factory)
    h12 = own.registry.set_tags(own.versions["h-v1-v2"], {"negative_flips": 0.04})
    h23 = own.versions["h-v2-v3"]  # no registered rate
    assert promote.registered_negative_flips(own.registry) == {f"{h12.name}/{h12.version}": 0.04}
    sets_root = factories.copy_sets(own, tmp_path / "sets")
    (check,) = promote.promote(own.registry, "v2", sets_root, alias="nf-ok", negative_flip_ceiling=0.04).checks
    assert (check.max_negative_flips, check.problem) == (0.04, None)  # at the ceiling passes
    with pytest.raises(ChainError, match=r"negative flip rate 0\.040, above the ceiling 0\.039 \(--force overrides"):
        promote.promote(own.registry, "v2", sets_root, alias="nf-low", negative_flip_ceiling=0.039)
    with pytest.raises(ChainError, match=rf"link {h23.name}/{h23.version} with no registered negative flip rate, so "
                                         r"it cannot be held to the ceiling 0\.500"):
        promote.promote(own.registry, "v3", sets_root, alias="nf-v3", map_floor=0.4, negative_flip_ceiling=0.5)
    (check,) = promote.promote(own.registry, "v3", sets_root, alias="nf-v3", map_floor=0.4).checks
    assert (check.min_map, check.max_negative_flips, check.problem) == (0.45, 0.04, None)  # no ceiling: off


def test_evaluate_equals_the_metrics_computed_directly(world):
    gallery = EmbeddingSet.open(world.gallery)
    result = evaluate.evaluate_gallery(world.registry, "v1", gallery, world.root / "data" / "prepared")
    split = world.zoo.splits["test"]
    queries = embed_images(OnnxModel(world.zoo.dirs["v1"] / "model.onnx"), split.images)
    stored = gallery.read()
    expected = retrieval_metrics(queries, split.labels, stored.embeddings, stored.labels, "l2",
                                 query_ids=split.item_ids, gallery_ids=stored.ids)
    assert result.metrics == expected and result.n_query == 50
    with pytest.raises(VersionMismatchError, match="differs from gallery model"):
        evaluate.evaluate_gallery(world.registry, "@champion", gallery, world.root / "data" / "prepared")


def test_evaluate_an_upgraded_gallery_measures_negative_flips_against_its_source(world, tmp_path):
    sets_root = factories.copy_sets(world, tmp_path / "sets")
    source = EmbeddingSet.open(sets_root / "gallery_v1")
    upgraded = upgrade.run_upgrade(world.registry, source, world.versions["v3"], sets_root / "gallery_v1@v3").output
    assert evaluate.UPGRADE_RECORD == upgrade.PROVENANCE_FILE
    assert evaluate.upgrade_source(upgraded, sets_root).path == source.path
    assert evaluate.upgrade_source(source, sets_root) is None  # not an upgraded set
    assert evaluate.upgrade_source(upgraded, tmp_path / "elsewhere") is None
    data = world.root / "data" / "prepared"
    result = evaluate.evaluate_gallery(world.registry, "v3", upgraded, data, baseline=source)
    assert result.metrics == evaluate.evaluate_gallery(world.registry, "v3", upgraded, data).metrics
    split = world.zoo.splits["test"]
    hits = []
    for key, embedding_set in (("v1", source), ("v3", upgraded)):
        queries = embed_images(OnnxModel(world.zoo.dirs[key] / "model.onnx"), split.images)
        stored = embedding_set.read()
        hits.append(top1_correct(queries, split.labels, stored.embeddings, stored.labels, "l2", split.item_ids,
                                 stored.ids))
    want = negative_flips(*hits)
    assert result.flips == want and result.baseline == source and want.n_query == 50
    assert want.positive_rate - want.negative_rate == pytest.approx(result.metrics["cmc_top1"] - hits[0].mean())


def test_search_finds_each_image_first_in_a_gallery_of_the_champion(world, tmp_path):
    split = world.zoo.splits["test"]
    paths = []
    for i in (3, 27):
        paths.append(tmp_path / f"item{i}.png")
        Image.fromarray(split.images[i, 0]).save(paths[-1])
    factories.embed_set(world.zoo, "v3", tmp_path / "sets" / "gallery_v3")
    found = evaluate.search_images(world.registry, paths, 5, "@champion", tmp_path / "sets")
    assert found.model.ref == world.versions["v3"].ref and found.result.ids.shape == (2, 5)
    assert found.result.ids[:, 0].tolist() == split.item_ids[[3, 27]].tolist()
    np.testing.assert_allclose(found.result.scores[:, 0], 0.0, atol=1e-3)  # -L2 distance to itself
    with pytest.raises(SearchError, match="no embedding set under .* is at v3@"):
        evaluate.search_images(world.registry, paths, 5, "@champion", world.sets_root)


def test_read_image_converts_png_and_jpeg_and_refuses_other_bytes(tmp_path):
    rgb = np.zeros((40, 20, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "red.png")
    image = read_image(tmp_path / "red.png", InputContract(height=28, width=14, color="grayscale"))
    assert image.shape == (1, 1, 28, 14) and image.dtype == np.uint8
    assert np.all(image == round(0.299 * 255))  # ITU-R 601-2 luma of pure red
    Image.fromarray(rgb).save(tmp_path / "red.jpg", format="JPEG")
    gray28 = InputContract(height=28, width=28, color="grayscale")
    assert read_image(tmp_path / "red.jpg", gray28).shape == (1, 1, 28, 28)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match="notes.png: image is not a PNG or JPEG image"):
        read_image(tmp_path / "notes.png", InputContract(height=28, width=28, color="grayscale"))
    Image.fromarray(rgb).save(tmp_path / "red.bmp")
    with pytest.raises(DataError, match="red.bmp: image is not a PNG or JPEG"):
        read_image(tmp_path / "red.bmp", InputContract(height=28, width=28, color="grayscale"))
    with pytest.raises(DataError, match="cannot read image .*missing.png"):
        read_image(tmp_path / "missing.png", InputContract(height=28, width=28, color="grayscale"))


def test_lineage_and_listings(world):
    text = models.lineage_text(world.registry)
    v = world.versions
    root, _, leaf = text.splitlines()  # v1 -> v2 -> v3, each line noted with its MLflow version and aliases
    assert root.startswith(f"{v['v1'].ref} fct-backbone/{v['v1'].version}")
    assert leaf.startswith(f"    └── {v['v3'].ref} fct-backbone/{v['v3'].version} ") and "@champion" in leaf
    labels = [m.ref.label for m in models.list_models(world.registry)]
    assert labels == [*factories.DIMS, *factories.LINKS]
    listing = sets.list_sets(world.registry, world.sets_root)
    (entry,) = listing.entries
    assert entry.backbone.ref == v["v1"].ref and entry.embedding_set.manifest.count == 50
    assert listing.invalid == [] and listing.unfinished == []


def test_mlflow_ui_of_a_tracking_server_is_its_own_address(tmp_path):
    with pytest.raises(ConfigError, match="^the registry is the MLflow server at http://127.0.0.1:5999, which serves"):
        ui.mlflow_ui_command(ModelRegistry(tmp_path, tracking_uri="http://127.0.0.1:5999"), "127.0.0.1", 5123)


def test_mlflow_ui_command_uses_one_worker_without_job_execution(world):
    argv, env = ui.mlflow_ui_command(world.registry, "127.0.0.1", 5123)
    assert argv[-8:] == ["--backend-store-uri", world.registry.tracking_uri, "--host", "127.0.0.1", "--port",
                         "5123", "--workers", "1"]
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
