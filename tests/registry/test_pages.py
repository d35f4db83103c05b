"""What the MLflow UI shows for a registry: descriptions in words with links, the ONNX signature, the lineage picture,
runs named after what they made — read back through MlflowClient from the tiny world (v1, v2, v3, s1, h-v1-v2 and
h-v2-v3; see tests/factories.py)."""

from __future__ import annotations

from pathlib import Path

import factories
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.models import Model
from PIL import Image

from fct_registry.registry.lineage_plot import LineageArrow, LineageNode, columns, draw_lineage
from fct_registry.registry.pages import LINEAGE_PNG, LINEAGE_TXT, publish_pages


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return factories.shared_world(tmp_path_factory)


def client_of(world) -> MlflowClient:
    return MlflowClient(tracking_uri=world.registry.tracking_uri, registry_uri=world.registry.tracking_uri)


def page(world, key: str) -> str:
    """The relative UI link of a world's version, as descriptions write it."""
    version = world.versions[key]
    return f"(#/models/{version.name}/versions/{version.version})"


def description(world, key: str) -> str:
    version = world.versions[key]
    return client_of(world).get_model_version(version.name, str(version.version)).description


def experiment(world) -> str:
    return client_of(world).get_experiment_by_name("fct-registry").experiment_id


def lineage_run(world):
    (run,) = client_of(world).search_runs([experiment(world)],
                                          filter_string="tags.`fct.kind` = 'lineage of fct-backbone'")
    return run


def non_blank(png: Path) -> None:
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10, f"{png} is nearly uniform"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, f"{png} holds too few colours to show anything"


def test_a_transformation_says_what_it_maps_from_and_to_with_links_and_scores(world):
    text = description(world, "h-v1-v2")
    assert text.startswith("Forward transformation h-v1-v2: it maps")
    for key in ("v1", "v2", "s1"):
        assert page(world, key) in text
    assert "`old_embedding` (batch, 8) and `side_info` (batch, 6)" in text
    assert "CMC top-1 **0.700**, CMC top-5 **0.900**, mAP **0.620**" in text
    assert "git commit `test-commit`" in text
    assert f"get-artifact?path={LINEAGE_PNG}&run_uuid={lineage_run(world).info.run_id}" in text


def test_backbones_and_side_info_link_the_transformations_that_connect_them(world):
    v2 = description(world, "v2")
    assert v2.startswith("Backbone v2: an image embedding model.")
    assert f"a gallery stored with **v1** ([fct-backbone version 1]{page(world, 'v1')}) is upgraded to this" in v2
    assert f"is upgraded to **v3** ([fct-backbone version 3]{page(world, 'v3')}) by transformation" in v2
    assert page(world, "h-v1-v2") in v2 and page(world, "h-v2-v3") in v2
    assert "Images: 28×28 grayscale" in v2 and "`embedding` (batch, 16)" in v2
    s1 = description(world, "s1")
    assert page(world, "h-v1-v2") in s1 and page(world, "h-v2-v3") in s1
    models = {name: client_of(world).get_registered_model(name).description
              for name in ("fct-backbone", "fct-side-info", "fct-transformation")}
    assert all(f"get-artifact?path={LINEAGE_PNG}" in text for text in models.values())
    assert "12-d, alias champion" in models["fct-backbone"]


def test_each_version_logs_the_signature_of_its_onnx_graph(world, tmp_path):
    client = client_of(world)

    def signature(key: str) -> tuple[list, list]:
        version = world.versions[key]
        uri = client.get_model_version_download_uri(version.name, str(version.version))
        local = download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / key),
                                   tracking_uri=world.registry.tracking_uri)
        found = Model.load(str(Path(local) / "MLmodel")).signature
        return ([(s.name, s.type, s.shape) for s in found.inputs.inputs],
                [(s.name, s.type, s.shape) for s in found.outputs.inputs])

    f32 = np.dtype("float32")
    assert signature("v1") == ([("image", f32, (-1, 1, 28, 28))], [("embedding", f32, (-1, 8))])
    assert signature("h-v1-v2") == ([("old_embedding", f32, (-1, 8)), ("side_info", f32, (-1, 6))],
                                    [("embedding", f32, (-1, 16))])


def test_the_lineage_run_holds_the_picture_and_the_tree(world, tmp_path):
    run = lineage_run(world)
    assert run.info.run_name == "lineage of fct-backbone"
    local = Path(download_artifacts(run_id=run.info.run_id, artifact_path="", dst_path=str(tmp_path),
                                    tracking_uri=world.registry.tracking_uri))
    tree = (local / LINEAGE_TXT).read_text()
    assert "fct-backbone/3 @champion" in tree and "via fct-transformation/1" in tree
    assert tree in run.data.tags["mlflow.note.content"]
    with Image.open(local / LINEAGE_PNG) as image:
        assert image.width == 750  # three columns: v1 -> v2 -> v3
    non_blank(local / LINEAGE_PNG)


def test_runs_are_named_after_what_they_made(world):
    names = {run.info.run_name for run in client_of(world).search_runs([experiment(world)])}
    h12, v3 = world.versions["h-v1-v2"], world.versions["v3"]
    assert f"fct-transformation/{h12.version} · h-v1-v2: v1 + s1 -> v2" in names
    assert f"fct-backbone/{v3.version} · backbone v3" in names
    run = client_of(world).get_run(client_of(world).get_model_version(h12.name, str(h12.version)).run_id)
    assert f"(#/models/fct-transformation/versions/{h12.version})" in run.data.tags["mlflow.note.content"]


def test_publishing_again_writes_nothing(world):
    client = client_of(world)

    def stamps() -> dict:
        found = {(mv.name, mv.version): mv.last_updated_timestamp
                 for name in ("fct-backbone", "fct-side-info", "fct-transformation")
                 for mv in client.search_model_versions(f"name = '{name}'")}
        return found | {"lineage": lineage_run(world).data.tags["fct.digest"]}

    before = stamps()
    publish_pages(world.registry)
    assert stamps() == before


def test_moving_an_alias_redraws_the_lineage_and_relinks_the_picture(tmp_path_factory, tmp_path):
    world = factories.fresh_world(tmp_path_factory)
    digest = lineage_run(world).data.tags["fct.digest"]
    world.registry.set_alias("backbone", "champion", "v2")
    run = lineage_run(world)
    assert run.data.tags["fct.digest"] != digest
    assert "fct-backbone/2 @champion" in run.data.tags["mlflow.note.content"]
    assert f"&v={run.data.tags['fct.digest'][:12]}" in description(world, "h-v2-v3")


def test_columns_follow_the_longest_chain_and_survive_cycles():
    nodes = [LineageNode(k, (f"v{k}",)) for k in (1, 2, 3, 4)]
    chain = [LineageArrow(1, 2, "a"), LineageArrow(2, 3, "b"), LineageArrow(1, 3, "direct")]
    assert columns(nodes, chain) == {1: (0, 0), 2: (1, 0), 3: (2, 0), 4: (0, 1)}
    cycle = [LineageArrow(1, 2, "a"), LineageArrow(2, 1, "back")]
    placed = columns(nodes[:2], cycle)
    assert set(placed) == {1, 2} and all(c <= 1 for c, _ in placed.values())


def test_parallel_skipping_and_backward_arrows_are_drawn(tmp_path):
    nodes = [LineageNode(1, ("v1", "fct-backbone/1")), LineageNode(2, ("v2", "fct-backbone/2")),
             LineageNode(3, ("v3", "fct-backbone/3", "@champion"), highlight=True), LineageNode(4, ("bct",))]
    arrows = [LineageArrow(1, 2, "h-v1-v2\nmAP 0.8"), LineageArrow(1, 2, "h-v1-v2-noside\nmAP 0.7"),
              LineageArrow(2, 3, "h-v2-v3"), LineageArrow(1, 3, "h-v1-v3"), LineageArrow(3, 2, "back")]
    png = draw_lineage(nodes, arrows, tmp_path / "lineage.png", "title", "subtitle")
    non_blank(png)
