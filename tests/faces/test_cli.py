"""The fct-registry CLI through Typer's CliRunner, over a real MLflow SQLite store and real ONNX models."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import factories
import numpy as np
import psutil
import pytest
import typer.main
from cli_checks import fails, succeeds, table_rows
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from fct_registry.cli.app import app
from fct_registry.method.models.transformation import ForwardTransformation
from fct_registry.onnx_boundary.model_files import write_model_dir
from fct_registry.registry.publishing import publish_model
from fct_registry.usecases import evaluate
from fct_registry.vectors.embedding_set import EmbeddingSet

runner = CliRunner(env={"COLUMNS": "250"})  # wide enough that rich never wraps a table cell


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> factories.World:
    return factories.shared_world(tmp_path_factory)


def cli(world: factories.World, *args: str, sets_root: Path | None = None):
    """Run ``fct-registry --root <world> [--sets-root ...] args...``."""
    options = ["--root", str(world.root)] + (["--sets-root", str(sets_root)] if sets_root is not None else [])
    return runner.invoke(app, [*options, *map(str, args)])


def mlflow_runs(world: factories.World) -> int:
    client = MlflowClient(world.registry.tracking_uri)
    experiment = client.get_experiment_by_name("fct-registry")
    return len(client.search_runs([experiment.experiment_id], max_results=1000))


def _command_paths(command, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*prefix, name))


def test_help_of_the_app_and_every_command():
    paths = list(_command_paths(typer.main.get_command(app)))
    assert set(paths) == {(), ("models",), ("models", "list"), ("models", "add"), ("sets",), ("sets", "list"),
                          ("sets", "import"), ("sets", "export"), ("sets", "embed"), ("sets", "clean"),
                          ("sets", "index"), ("fit",), ("lineage",), ("promote",), ("upgrade",), ("backfill",),
                          ("evaluate",), ("search",), ("ui",), ("serve",)}
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0 and "Usage: " in result.stdout, (path, result.output)
    assert "--dry-run" in runner.invoke(app, ["upgrade", "--help"]).stdout


def test_models_list_sets_list_and_lineage_show_the_versions(world):
    v = world.versions
    rows = table_rows(succeeds(cli(world, "models", "list")))
    assert [(r[0], r[2]) for r in rows] == [(v[k].role, k) for k in v]
    assert rows[2][1].startswith(f"fct-backbone/{v['v3'].version}") and "@champion" in rows[2][1]
    assert rows[4][5:] == ["v1 -> v2 + s1", "0.620", ""] and rows[5][5:] == ["v2 -> v3 + s1", "0.450", ""]
    assert [r[-1] for r in rows[:4]] == ["grayscale 28x28 nchw"] * 4
    rows = table_rows(succeeds(cli(world, "models", "list", "--role", "transformation")))
    assert [r[2] for r in rows] == ["h-v1-v2", "h-v2-v3"]
    (row,) = table_rows(succeeds(cli(world, "sets", "list")))
    assert row[:2] == ["gallery_v1", str(v["v1"].ref)] and row[2].split()[0] == f"fct-backbone/{v['v1'].version}"
    assert row[3:] == [str(v["s1"].ref), "8", "50", "l2", "-"]  # "-": no search index built
    lines = succeeds(cli(world, "lineage")).splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{v['v1'].ref} fct-backbone/")
    assert lines[1].startswith(f"└── {v['v2'].ref} ") and lines[2].startswith(f"    └── {v['v3'].ref} ")
    assert "via fct-transformation/2" in lines[2] and "mAP 0.450" in lines[2] and "@champion" in lines[2]


def test_upgrade_through_two_hops_equals_the_torch_modules(world, tmp_path):
    sets_root = factories.copy_sets(world, tmp_path / "sets")
    stdout = succeeds(cli(world, "upgrade", "gallery_v1", sets_root=sets_root))
    plan = table_rows(stdout)
    assert [row[:2] for row in plan] == [["1", f"fct-transformation/{world.versions['h-v1-v2'].version}"],
                                         ["2", f"fct-transformation/{world.versions['h-v2-v3'].version}"]]
    assert f"wrote {sets_root / 'gallery_v1@v3'}: 50 items at {world.versions['v3'].ref}" in stdout
    source = EmbeddingSet.open(world.gallery).read()
    upgraded = EmbeddingSet.open(sets_root / "gallery_v1@v3")
    assert upgraded.manifest.model == world.versions["v3"].ref
    out = upgraded.read()
    np.testing.assert_array_equal(out.ids, source.ids)
    np.testing.assert_array_equal(out.side_info, source.side_info)
    np.testing.assert_allclose(out.embeddings, factories.upgrade_by_hand(world.zoo, ["h-v1-v2", "h-v2-v3"], source),
                               rtol=0, atol=1e-4)
    one_hop = tmp_path / "v2-set"
    succeeds(cli(world, "upgrade", "gallery_v1", "--to", "v2", "--out", one_hop, "--batch-rows", "7",
                 sets_root=sets_root))
    np.testing.assert_allclose(EmbeddingSet.open(one_hop).read().embeddings,
                               factories.upgrade_by_hand(world.zoo, ["h-v1-v2"], source), rtol=0, atol=1e-4)


def test_dry_run_prints_the_plan_and_writes_nothing(world, tmp_path):
    sets_root = factories.copy_sets(world, tmp_path / "sets")
    before, runs = factories.tree(sets_root), mlflow_runs(world)
    stdout = succeeds(cli(world, "upgrade", "gallery_v1", "--dry-run", sets_root=sets_root))
    assert len(table_rows(stdout)) == 2 and "dry run: the chain is valid; nothing was written" in stdout
    assert factories.tree(sets_root) == before and mlflow_runs(world) == runs


def test_promote_gate_refuses_unreachable_and_low_map_unless_forced(world, tmp_path):
    sets_root = factories.copy_sets(world, tmp_path / "sets")
    resolve = world.registry.resolve_alias
    # params.yaml sets the floor to 0.5; the chain to v3 has a link with registered mAP 0.45
    fails(cli(world, "promote", "v3", "--alias", "cli-low", sets_root=sets_root),
          "refusing to set @cli-low", "fct-transformation/2 with registered mAP 0.450, below the floor 0.500")
    stdout = succeeds(cli(world, "promote", "v3", "--alias", "cli-low", "--force", sets_root=sets_root))
    assert "(forced past failed checks)" in stdout and resolve("backbone", "cli-low").ref == world.versions["v3"].ref
    succeeds(cli(world, "promote", "v3", "--alias", "cli-floor", "--map-floor", "0.4", sets_root=sets_root))
    rows = table_rows(succeeds(cli(world, "promote", "v2", "--alias", "cli-v2", sets_root=sets_root)))
    assert rows == [[str(sets_root / "gallery_v1"), str(world.versions["v1"].ref),
                     f"fct-transformation/{world.versions['h-v1-v2'].version}", "0.620", "", "ok"]]
    # a stored v3 set cannot be brought back to v1
    factories.embed_set(world.zoo, "v3", sets_root / "gallery_v3")
    fails(cli(world, "promote", "v1", "--alias", "cli-back", sets_root=sets_root),
          f"set {sets_root / 'gallery_v3'}: set at {world.versions['v3'].ref} is already beyond target")
    assert "cli-back" not in world.registry.get("backbone", "v1").aliases
    succeeds(cli(world, "promote", "v1", "--alias", "cli-back", "--force", sets_root=sets_root))
    assert resolve("backbone", "cli-back").ref == world.versions["v1"].ref
    # every transformation needs s1 side-info: a set without it cannot follow any newer version
    factories.without_side_info(world.gallery, sets_root / "plain_v1")
    fails(cli(world, "promote", "v2", "--alias", "cli-plain", sets_root=sets_root), "plain_v1", "side-info")


def test_promote_negative_flip_ceiling_from_the_option_and_from_params(tmp_path_factory, tmp_path):
    own = factories.fresh_world(tmp_path_factory)  # its transformations get negative flip tags
    h12, h23 = (own.registry.set_tags(own.versions[key], {"negative_flips": rate})
                for key, rate in (("h-v1-v2", 0.04), ("h-v2-v3", 0.12)))
    sets_root = factories.copy_sets(own, tmp_path / "sets")
    fails(cli(own, "promote", "v2", "--alias", "nf-low", "--max-negative-flips", "0.03", sets_root=sets_root),
          "refusing to set @nf-low", f"link {h12.name}/{h12.version} with registered negative flip rate 0.040, "
          "above the ceiling 0.030")
    rows = table_rows(succeeds(cli(own, "promote", "v2", "--alias", "nf-ok", "--max-negative-flips", "0.05",
                                   sets_root=sets_root)))
    assert rows == [[str(sets_root / "gallery_v1"), str(own.versions["v1"].ref), f"{h12.name}/{h12.version}",
                     "0.620", "0.040", "ok"]]
    params = own.root / "params.yaml"
    params.write_text(params.read_text().replace("promote_negative_flip_ceiling: null",
                                                 "promote_negative_flip_ceiling: 0.1"))
    fails(cli(own, "promote", "v3", "--alias", "nf-v3", "--map-floor", "0.4", sets_root=sets_root),
          f"link {h23.name}/{h23.version} with registered negative flip rate 0.120, above the ceiling 0.100")
    rows = table_rows(succeeds(cli(own, "promote", "v3", "--alias", "nf-v3", "--map-floor", "0.4",
                                   "--max-negative-flips", "0.2", sets_root=sets_root)))
    assert rows[0][-2:] == ["0.120", "ok"]
    assert "nf-low" not in own.registry.get("backbone", "v2").aliases


@pytest.fixture(scope="module")
def bad(world, tmp_path_factory) -> Path:
    """A sets root with the v1 gallery and sets that upgrades must refuse, plus a file that is not an image."""
    sets_root = factories.copy_sets(world, tmp_path_factory.mktemp("bad") / "sets")
    factories.embed_set(world.zoo, "v3", sets_root / "gallery_v3")
    factories.without_side_info(world.gallery, sets_root / "plain_v1")
    for name, column in (("nan_v1", "embedding"), ("nan_side_v1", "side_info")):
        factories.embed_set(world.zoo, "v1", sets_root / name)
        factories.poison_set(sets_root / name, row=5, column=column)
    (sets_root.parent / "notes.png").write_text("not an image")
    return sets_root


BAD_INPUTS = {
    "unknown version": (["upgrade", "gallery_v1", "--to", "v9"],
                        ["unknown fct-backbone version 'v9'", "known: 1 (v1)"]),
    "unknown alias": (["upgrade", "gallery_v1", "--to", "@nosuch"], ["alias 'nosuch' of fct-backbone"]),
    "promote unknown version": (["promote", "v9"], ["unknown fct-backbone version 'v9'"]),
    "unknown set": (["upgrade", "nosuch"], ["no embedding set 'nosuch'", "gallery_v1"]),
    "already at target": (["upgrade", "gallery_v1", "--to", "v1"], ["already at target v1@"]),
    "beyond target": (["upgrade", "gallery_v3", "--to", "v2"], ["set at v3@", "already beyond target v2@"]),
    "missing side-info": (["upgrade", "plain_v1"], ["needs side-info s1@", "the set has: none"]),
    "NaN embedding": (["upgrade", "nan_v1"], ["nan_v1 stores NaN/inf in column embedding for item_id 1005"]),
    "NaN side-info": (["upgrade", "nan_side_v1"], ["stores NaN/inf in column side_info for item_id 1005"]),
    "query model differs": (["evaluate", "--query-model", "v3", "--gallery", "gallery_v1"],
                            ["query model v3@", "differs from gallery model v1@"]),
    "not an image": (["search", "{root}/notes.png", "--gallery", "gallery_v3"],
                     ["notes.png: image is not a PNG or JPEG"]),
    "gallery of another model": (["search", "{root}/notes.png", "--gallery", "gallery_v1"],
                                 ["differs from gallery model v1@"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_nonzero_and_writes_nothing(world, bad, case):
    args, phrases = BAD_INPUTS[case]
    before, runs = factories.tree(bad.parent), mlflow_runs(world)
    fails(cli(world, *(a.format(root=bad.parent) for a in args), sets_root=bad), *phrases)
    assert factories.tree(bad.parent) == before and mlflow_runs(world) == runs


def test_corrupted_onnx_artifact_is_refused(tmp_path_factory):
    own = factories.fresh_world(tmp_path_factory)
    factories.corrupt_artifact(own, "h-v2-v3")
    before = factories.tree(own.sets_root)
    fails(cli(own, "upgrade", "gallery_v1"),
          f"ONNX artifact of fct-transformation/{own.versions['h-v2-v3'].version}", "corrupted store")
    assert factories.tree(own.sets_root) == before


def test_dim_mismatch_between_chain_links_is_refused(tmp_path_factory, tmp_path):
    own = factories.fresh_world(tmp_path_factory, keys=["v1", "v2", "v3", "s1", "h-v1-v2"])
    refs = {key: own.versions[key].ref for key in ("v2", "v3", "s1")}
    wide = ForwardTransformation(10, factories.DIMS["v3"], factories.DIMS["s1"], hidden_dim=16).eval()
    write_model_dir(wide, tmp_path / "h-wide", "transformation", "h-v2-v3-wide", {},
                    links={"source": refs["v2"], "target": refs["v3"], "side_info": refs["s1"]})
    publish_model(own.registry, tmp_path / "h-wide", "l2", "x", "y", {}, metrics={"map": 0.9})
    before = factories.tree(own.sets_root)
    fails(cli(own, "upgrade", "gallery_v1", "--dry-run"),
          "step 2", "input 'old_embedding' has shape ('batch', 10), but step 1 provides width 16")
    fails(cli(own, "upgrade", "gallery_v1"), "but step 1 provides width 16")
    assert factories.tree(own.sets_root) == before


def test_evaluate_prints_the_retrieval_table(world):
    (row,) = table_rows(succeeds(cli(world, "evaluate", "--query-model", "v1", "--gallery", "gallery_v1")))
    expected = evaluate.evaluate_gallery(world.registry, "v1", EmbeddingSet.open(world.gallery),
                                          world.root / "data" / "prepared").metrics
    assert row == ["v1_vs_gallery_v1", str(world.versions["v1"].ref), str(world.versions["v1"].ref), "50", "50",
                   *(f"{expected[key]:.4f}" for key in ("cmc_top1", "cmc_top5", "map"))]


def test_evaluate_an_upgraded_gallery_adds_the_negative_flips_of_the_update(world, tmp_path):
    sets_root = factories.copy_sets(world, tmp_path / "sets")
    succeeds(cli(world, "upgrade", "gallery_v1", "--to", "v3", sets_root=sets_root))
    stdout = succeeds(cli(world, "evaluate", "--query-model", "v3", "--gallery", "gallery_v1@v3",
                          sets_root=sets_root))
    result = evaluate.evaluate_gallery(world.registry, "v3", EmbeddingSet.open(sets_root / "gallery_v1@v3"),
                                       world.root / "data" / "prepared",
                                       baseline=EmbeddingSet.open(sets_root / "gallery_v1"))
    (row,) = table_rows(stdout)
    assert row[5:] == [f"{value:.4f}" for value in (*result.metrics.values(), result.flips.negative_rate,
                                                    result.flips.positive_rate)]
    assert (f"flips against {sets_root / 'gallery_v1'} searched by {world.versions['v1'].ref}: "
            f"{result.flips.negative} of 50 queries right before and wrong now") in " ".join(stdout.split())
    # an explicit --baseline; a gallery that is not an upgrade gets no flips columns
    again = succeeds(cli(world, "evaluate", "--query-model", "v3", "--gallery", "gallery_v1@v3", "--baseline",
                         "gallery_v1", sets_root=sets_root))
    assert table_rows(again) == [row]
    (plain,) = table_rows(succeeds(cli(world, "evaluate", "--query-model", "v1", "--gallery", "gallery_v1",
                                       sets_root=sets_root)))
    assert len(plain) == 8


def test_search_returns_k_ids_of_the_champion_gallery(world, tmp_path):
    split = world.zoo.splits["test"]
    sets_root = tmp_path / "sets"
    factories.embed_set(world.zoo, "v3", sets_root / "gallery_v3")
    Image.fromarray(split.images[12, 0]).save(tmp_path / "a.png")
    Image.fromarray(split.images[40, 0]).save(tmp_path / "b.jpg", quality=95)
    stdout = succeeds(cli(world, "search", tmp_path / "a.png", tmp_path / "b.jpg", "--k", "4", sets_root=sets_root))
    rows = table_rows(stdout)
    assert [row[0] for row in rows] == ["1", "2", "3", "4"] * 2
    ids = [int(row[1]) for row in rows]
    assert ids[0] == split.item_ids[12] and float(rows[0][2]) == pytest.approx(0.0, abs=1e-3)
    assert set(ids) <= set(split.item_ids.tolist()) and len(set(ids[:4])) == 4 and len(set(ids[4:])) == 4
    assert f"{world.versions['v3'].ref} in {sets_root / 'gallery_v3'}" in stdout


def test_search_with_another_model_finds_its_gallery(world, tmp_path):
    split = world.zoo.splits["test"]
    Image.fromarray(split.images[7, 0]).save(tmp_path / "q.png")
    stdout = succeeds(cli(world, "search", tmp_path / "q.png", "--k", "3", "--model", "v1"))
    ids = [int(row[1]) for row in table_rows(stdout)]
    assert ids[0] == split.item_ids[7] and len(ids) == 3
    assert f"{world.versions['v1'].ref} in {world.gallery}" in stdout
    fails(cli(world, "search", tmp_path / "q.png", "--model", "v3"), "no embedding set under", "is at v3@")


def _get_json(url: str, timeout_s: float) -> dict:
    """GET ``url`` until it answers (the server is starting), at most ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.load(response)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_ui_serves_the_registry_and_stops_cleanly_on_ctrl_c(world, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(tmp_path / "ui.log", "w") as log:
        ui = subprocess.Popen([str(Path(sys.executable).with_name("fct-registry")), "--root", str(world.root), "ui",
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        found = _get_json(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/registered-models/search", timeout_s=60)
        assert {m["name"] for m in found["registered_models"]} == {"fct-backbone", "fct-side-info",
                                                                    "fct-transformation"}
        server = psutil.Process(ui.pid).children(recursive=True)
        assert len(server) >= 1
        ui.send_signal(signal.SIGINT)
        assert ui.wait(timeout=30) == 0
        _, alive = psutil.wait_procs(server, timeout=10)
        assert alive == [], (tmp_path / "ui.log").read_text()
    finally:
        if ui.poll() is None:
            for process in [*psutil.Process(ui.pid).children(recursive=True), psutil.Process(ui.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
