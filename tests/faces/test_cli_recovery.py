"""The CLI after things went wrong: a killed upgrade re-run, dry runs over an existing destination, invalid sets and
unfinished writes in a listing, and listings for scripts (issue 10)."""

from __future__ import annotations

import json
import os
import time

import factories
import pytest
from cli_checks import fails, succeeds, table_rows
from mlflow import MlflowClient
from PIL import Image
from test_cli import cli


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> factories.World:
    return factories.shared_world(tmp_path_factory)


def upgrade_runs(world: factories.World, dest) -> list:
    client = MlflowClient(world.registry.tracking_uri)
    experiment = client.get_experiment_by_name("fct-registry")
    return client.search_runs([experiment.experiment_id], f"params.output_set = '{dest.resolve()}'")


def test_a_rerun_after_a_kill_between_rename_and_record_completes_the_job(world, tmp_path):
    sets_root = factories.copy_sets(world, tmp_path / "sets")
    dest = sets_root / "gallery_v1@v3"
    succeeds(cli(world, "upgrade", "gallery_v1", sets_root=sets_root))
    (run,) = upgrade_runs(world, dest)
    assert run.info.run_name == f"gallery_v1@v3: upgrade of gallery_v1 ({run.data.params['chain']})"
    # the state a kill leaves after the output's rename and before its MLflow run: a complete set, no record
    MlflowClient(world.registry.tracking_uri).delete_run(run.info.run_id)
    assert upgrade_runs(world, dest) == []
    written = factories.tree(dest)
    stdout = succeeds(cli(world, "upgrade", "gallery_v1", "--dry-run", sets_root=sets_root))
    assert len(table_rows(stdout)) == 2 and f"{dest} already holds this upgrade; a run would only record it" in stdout
    stdout = succeeds(cli(world, "upgrade", "gallery_v1", sets_root=sets_root))
    assert f"{dest} already holds this upgrade (50 items at {world.versions['v3'].ref}, verified)" in stdout
    (record,) = upgrade_runs(world, dest)
    assert record.data.params["output_manifest_sha256"] == run.data.params["output_manifest_sha256"]
    assert factories.tree(dest) == written  # no vector rewritten
    succeeds(cli(world, "upgrade", "gallery_v1", sets_root=sets_root))
    assert len(upgrade_runs(world, dest)) == 1  # recorded once, however often it is re-run


def test_an_existing_destination_with_other_content_is_refused_but_a_dry_run_says_so(world, tmp_path):
    sets_root = factories.copy_sets(world, tmp_path / "sets")
    other = sets_root / "gallery_v1@v3"
    factories.embed_set(world.zoo, "v3", other)
    before = factories.tree(sets_root)
    stdout = succeeds(cli(world, "upgrade", "gallery_v1", "--dry-run", sets_root=sets_root))
    assert f"{other} already exists with other content; a run would refuse to replace it" in stdout
    fails(cli(world, "upgrade", "gallery_v1", sets_root=sets_root), f"destination {other} already exists")
    assert factories.tree(sets_root) == before


def test_sets_list_reports_invalid_sets_and_unfinished_writes_and_clean_removes_them(world, tmp_path):
    sets_root = factories.copy_sets(world, tmp_path / "sets")
    (sets_root / "broken").mkdir()
    (sets_root / "broken" / "manifest.json").write_text('{"format_version": 7}')
    stale, fresh = sets_root / ".tmp-gallery_v2.new-1", sets_root / ".tmp-gallery_v3.new-2"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "part-00000.parquet").write_bytes(b"half a shard")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))

    stdout = succeeds(cli(world, "sets", "list", sets_root=sets_root))
    assert [r[0] for r in table_rows(stdout)] == ["gallery_v1"]
    assert "invalid set broken: invalid " in stdout
    assert "unfinished write .tmp-gallery_v2.new-1 (interrupted, or still running)" in stdout
    listing = json.loads(succeeds(cli(world, "sets", "list", "--json", sets_root=sets_root)))
    (entry,) = listing["sets"]
    assert entry["path"] == str(sets_root / "gallery_v1") and entry["count"] == 50 and entry["dim"] == 8
    assert entry["model"] == world.versions["v1"].ref.model_dump()
    assert [i["path"] for i in listing["invalid"]] == [str(sets_root / "broken")]
    assert listing["unfinished"] == [str(stale), str(fresh)]
    # search without --gallery still finds the valid set
    Image.fromarray(world.zoo.splits["test"].images[3, 0]).save(tmp_path / "q.png")
    stdout = succeeds(cli(world, "search", tmp_path / "q.png", "--model", "v1", "--k", "2", sets_root=sets_root))
    assert str(sets_root / "gallery_v1") in stdout

    stdout = succeeds(cli(world, "sets", "clean", sets_root=sets_root))
    assert "removed .tmp-gallery_v2.new-1" in stdout and "removed 1 unfinished write(s)" in stdout
    assert not stale.exists() and fresh.exists()  # a young one may be a write still running
    succeeds(cli(world, "sets", "clean", "--min-age", "0", sets_root=sets_root))
    assert not fresh.exists() and (sets_root / "gallery_v1" / "manifest.json").is_file()


def test_listings_for_scripts_are_json_and_never_cut_identifiers(world, monkeypatch):
    versions = json.loads(succeeds(cli(world, "models", "list", "--json")))
    assert [(v["role"], v["label"], v["version"]) for v in versions] == [
        (v.role, k, v.version) for k, v in world.versions.items()]
    assert all(len(v["sha256"]) == 64 for v in versions)
    lineage = json.loads(succeeds(cli(world, "lineage", "--json")))
    assert [b["label"] for b in lineage["backbones"]] == ["v1", "v2", "v3"]
    assert [(t["source"]["label"], t["target"]["label"], t["map"]) for t in lineage["transformations"]] == [
        ("v1", "v2", 0.62), ("v2", "v3", 0.45)]
    monkeypatch.delenv("COLUMNS", raising=False)  # piped, no terminal width: rich would cut at 80 columns
    stdout = succeeds(cli(world, "models", "list"))
    assert max(map(len, stdout.splitlines())) > 80 and all("…" not in line for line in stdout.splitlines())
