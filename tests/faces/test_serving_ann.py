"""The search service over an approximate index (real uvicorn on 127.0.0.1, real faiss, the tiny world's registry),
and the CLI that builds, lists and serves such indexes."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import factories
import httpx
import numpy as np
import pytest
import servers
from cli_checks import fails, succeeds, table_rows
from serving_checks import running, v3_sets_root
from typer.testing import CliRunner

from fct_registry.cli.app import app as cli_app
from fct_registry.core.config import ServingParams
from fct_registry.serving.app import create_app
from fct_registry.vectors.ann_index import load_ann_index
from fct_registry.vectors.ann_store import ANN_DIR, read_record
from fct_registry.vectors.embedding_set import EmbeddingSet

PARAMS = ServingParams(index="ivf", nlist=4, nprobe=1, recall_queries=20)
runner = CliRunner(env={"COLUMNS": "250"})


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> factories.World:
    return factories.shared_world(tmp_path_factory)


@pytest.fixture(scope="module")
def served(world, tmp_path_factory) -> Iterator[tuple[str, Path, list[str]]]:
    """(base URL, the served v3 gallery, the lines the app said) of a service over an IVF index."""
    sets_root = v3_sets_root(world, tmp_path_factory.mktemp("ann"))
    said: list[str] = []
    app = create_app(world.registry, sets_root, serving=PARAMS, notify=said.append)
    with running(app) as url:
        yield url, sets_root / "gallery_v1@v3", said


def test_info_shows_the_index_built_at_start_and_its_recall(served):
    url, gallery, said = served
    info = httpx.get(f"{url}/info", timeout=30).json()["index"]
    (folder,) = [p for p in (gallery / ANN_DIR).iterdir() if p.is_dir()]
    record = read_record(folder)
    assert info == {"kind": "ivf", "knobs": {"nlist": 4, "train_size": 50, "train_rows": 50, "nprobe": 1},
                    "recall_at_10": record.recall_at_10, "recall_queries": 20, "build_seconds": record.build_seconds,
                    "path": str(folder), "built_at_load": True, "note": None}
    assert 0 < record.recall_at_10 <= 1 and record.manifest_sha256 and len(said) == 2
    assert said[0].startswith(f"building the ivf index of {gallery} (50 items, 12-d, l2)")


def test_concurrent_searches_equal_the_stored_index_searched_directly(served):
    url, gallery, _ = served
    embedding_set = EmbeddingSet.open(gallery)
    (folder,) = [p for p in (gallery / ANN_DIR).iterdir() if p.is_dir()]
    direct, _ = load_ann_index(folder, embedding_set, PARAMS)
    queries = np.random.default_rng(0).normal(size=(48, factories.DIMS["v3"])).astype(np.float32)
    answers: dict[int, dict] = {}

    def client(rows: range) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for row in rows:
                answers[row] = http.post("/search", json={"embedding": queries[row].tolist(), "k": 7}).json()

    before = httpx.get(f"{url}/info", timeout=30).json()["batching"]["queries"]
    threads = [threading.Thread(target=client, args=(range(i, 48, 6),)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for row, body in answers.items():
        expected = direct.search(queries[row:row + 1], 7)
        assert body["ids"] == expected.ids[0].tolist(), row
        np.testing.assert_array_equal(np.float32(body["scores"]), expected.scores[0])
    assert len(answers) == 48
    batching = httpx.get(f"{url}/info", timeout=30).json()["batching"]
    assert batching["queries"] - before == 48 and batching["largest"] >= 1


def test_reload_loads_the_stored_index_instead_of_building_it(served):
    url, gallery, said = served
    reloaded = httpx.post(f"{url}/reload", timeout=60).json()["index"]
    assert reloaded["built_at_load"] is False and reloaded["path"].startswith(str(gallery / ANN_DIR))
    assert len(said) == 2  # nothing built


def cli(world: factories.World, sets_root: Path, *args: object):
    return runner.invoke(cli_app, ["--root", str(world.root), "--sets-root", str(sets_root), *map(str, args)])


def test_sets_index_builds_once_and_sets_list_shows_it(world, tmp_path):
    sets_root = factories.copy_sets(world, tmp_path / "sets")
    out = succeeds(cli(world, sets_root, "sets", "index", "gallery_v1", "--index", "hnsw", "--recall-queries", "30"))
    assert "hnsw hnsw_m=16 ef_construction=40 ef_search=64: recall@10" in out and out.rstrip().endswith("; built")
    again = succeeds(cli(world, sets_root, "sets", "index", "gallery_v1", "--index", "hnsw", "--ef-search", "8"))
    assert "ef_search=8" in again and "already stored" in again  # a search knob: recall measured again, no build
    rows = table_rows(succeeds(cli(world, sets_root, "sets", "list")))
    assert rows[0][0] == "gallery_v1" and rows[0][-1].startswith("hnsw hnsw_m=16 ef_construction=40 ef_search=64")
    listed = json.loads(succeeds(cli(world, sets_root, "sets", "list", "--json")))
    (index,) = listed["sets"][0]["indexes"]
    assert (index["kind"], index["stale"], index["recall_queries"]) == ("hnsw", False, 30)
    assert 0 < index["recall_at_10"] <= 1 and index["manifest_sha256"] == read_record(index["path"]).manifest_sha256


@pytest.mark.parametrize(("args", "phrases"), [
    (["--index", "ivf", "--nlist", "999"], ["serving.nlist 999 exceeds the set's 50 items"]),
    (["--index", "ivfpq", "--pq-m", "5"], ["serving.pq_m 5 does not divide the set's dim 8"]),
    (["--nprobe", "0"], ["serving.nprobe: Input should be greater than 0 (got 0)"]),
    (["--index", "exact"], ["an exact index is never stored"]),
])
def test_sets_index_bad_knobs_fail_in_one_line_and_write_nothing(world, tmp_path, args, phrases):
    sets_root = factories.copy_sets(world, tmp_path / "sets")
    fails(cli(world, sets_root, "sets", "index", "gallery_v1", *args), *phrases)
    assert not (sets_root / "gallery_v1" / ANN_DIR).exists()


def test_serve_builds_the_index_its_options_name_and_says_so(world, tmp_path):
    """The console script, as a user runs it: `serve --index hnsw` builds the index beside the champion's gallery,
    says so on stderr, and serves it."""
    sets_root = v3_sets_root(world, tmp_path)
    port, log = servers.free_port(), tmp_path / "serve.log"
    argv = [str(servers.FCT_REGISTRY), "--root", str(world.root), "--sets-root", str(sets_root), "serve", "--port",
            str(port), "--index", "hnsw", "--hnsw-m", "8", "--ef-search", "20"]
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.25)
        info = httpx.get(f"{url}/info", timeout=30).json()["index"]
        answer = httpx.post(f"{url}/search", json={"embedding": [0.1] * factories.DIMS["v3"], "k": 3}, timeout=30)
    finally:
        process.terminate()
        process.wait(30)
    assert (info["kind"], info["knobs"]["hnsw_m"], info["knobs"]["ef_search"], info["built_at_load"]) == (
        "hnsw", 8, 20, True)
    assert answer.status_code == 200 and len(answer.json()["ids"]) == 3
    said = log.read_text()
    assert f"building the hnsw index of {sets_root / 'gallery_v1@v3'} (50 items" in said
    assert "searching" in said and "with hnsw hnsw_m=8 ef_construction=40 ef_search=20: recall@10" in said


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize(("args", "phrases"), [
    (["--index", "ivf", "--nlist", "64"], ["serving.nlist 64 exceeds the set's 50 items"]),
    (["--ef-search", "0"], ["serving.ef_search: Input should be greater than 0 (got 0)"]),
])
def test_serve_with_a_bad_knob_fails_in_one_line_and_binds_nothing(world, tmp_path, args, phrases):
    sets_root = v3_sets_root(world, tmp_path)
    fails(cli(world, sets_root, "serve", "--port", "0", *args), *phrases)
    assert not (sets_root / "gallery_v1@v3" / ANN_DIR).exists()
