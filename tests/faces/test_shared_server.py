"""The registry as teams run it: an ``mlflow server`` over PostgreSQL, used through the CLI by several processes.

Each test gets its own ``mlflow server`` (127.0.0.1, ``--serve-artifacts``, ``--workers 1``) on a fresh database of
one PostgreSQL cluster started for the module (:mod:`servers`); every command is the ``fct-registry`` console
script in a subprocess (the concurrent jobs run it behind a start barrier), pointed at the server by
``params.yaml`` (``registry.tracking_uri``) or by ``MLFLOW_TRACKING_URI``. The models are tiny ONNX graphs written
with ``onnx.helper`` (no torch export), images are the factories' 28x28 grayscale splits as PNG class folders.

Cost: ~90 s of CPU in all (mostly interpreter start-up and MLflow's model logging in ~15 CLI processes), 79 s
wall on the 2-core machine with other tests beside it (the README's shared-server section).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import factories
import httpx
import numpy as np
import onnx
import pytest
import servers
import yaml
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.usecases.fit import apply_onnx
from fct_registry.vectors.embedding_set import EmbeddingSet

pytestmark = pytest.mark.slow
TEMPLATE = "mlflow_template"
GRAY28 = ["--preset", "grayscale01", "--height", "28", "--width", "28", "--metric", "l2"]
SMALL_FIT = ["--epochs", "2", "--hidden-dim", "16", "--batch-size", "8", "--lr", "0.001"]
_databases = itertools.count()


# ----- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[servers.Postgres]:
    """One PostgreSQL cluster for the module, with a migrated empty MLflow database to copy per test."""
    with servers.postgres_cluster() as cluster:
        servers.migrate(cluster, TEMPLATE)
        yield cluster


@pytest.fixture
def server(postgres, tmp_path) -> Iterator[tuple[servers.MlflowServer, str]]:
    """A fresh ``mlflow server`` on a new database (a copy of the migrated template); yields it and the database."""
    database = f"registry_{next(_databases)}"
    uri = postgres.create_database(database, template=TEMPLATE)
    with servers.mlflow_server(uri, tmp_path / "server") as running:
        yield running, database


@pytest.fixture(autouse=True)
def quiet_downloads(monkeypatch) -> None:
    """No MLflow progress bars when the test itself downloads a model (the CLI turns them off itself)."""
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# ----- helpers ------------------------------------------------------------------------------------------------


def image_model(path: Path, dim: int, seed: int) -> Path:
    """A valid image embedding model: (B, 1, 28, 28) -> flatten -> tanh(x W + b) -> (B, dim), random W, b."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array((rng.normal(0, 0.05, (28 * 28, dim))).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.normal(0, 0.1, dim).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["mm"]),
         helper.make_node("Add", ["mm", "b"], ["pre"]), helper.make_node("Tanh", ["pre"], ["embedding"])],
        f"linear{dim}", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def write_images(root: Path) -> dict[str, Path]:
    """The factories' train (20) and test (50) splits as PNG class folders ``images/{train,gallery}/class<l>/<id>``."""
    folders = {}
    for name, split in (("train", "train"), ("gallery", "test")):
        data = factories.make_splits()[split]
        for image, label, item in zip(data.images, data.labels, data.item_ids, strict=True):
            path = root / "images" / name / f"class{label}" / f"{item}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0]).save(path)
        folders[name] = root / "images" / name
    return folders


def environment(tracking_uri: str | None = None) -> dict[str, str]:
    """The test process's environment for a CLI call, with ``MLFLOW_TRACKING_URI`` set only when given."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env["COLUMNS"] = "250"  # rich never wraps a table cell
    return env | ({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {})


def start(root: Path, *args: object, tracking_uri: str | None = None) -> subprocess.Popen:
    """Start ``fct-registry --root root args...`` (stdout and stderr piped); :func:`finish` waits for it."""
    argv = [str(servers.FCT_REGISTRY), "--root", str(root), *map(str, args)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment(tracking_uri))


def finish(command: subprocess.Popen) -> str:
    """Wait for a started command; asserts exit 0 and a clean stdout, returns stdout."""
    try:
        stdout, stderr = command.communicate(timeout=300)
    finally:
        if command.poll() is None:
            command.kill()
    assert command.returncode == 0, f"{' '.join(command.args[1:])} exited {command.returncode}\n{stdout}\n{stderr}"
    assert "View run" not in stdout, stdout  # MLflow's run links must not mix into the CLI's output
    return stdout


def fct(root: Path, *args: object, tracking_uri: str | None = None) -> str:
    """Run ``fct-registry --root root args...``; asserts exit 0 and returns stdout."""
    return finish(start(root, *args, tracking_uri=tracking_uri))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored_onnx(artifacts: Path) -> set[str]:
    """sha256 of every ONNX file under the server's artifact destination."""
    return {sha256(p) for p in artifacts.rglob("*.onnx")}


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, f"serve did not start:\n{log.read_text()}"
        time.sleep(0.25)


# ----- tests --------------------------------------------------------------------------------------------------


def test_without_postgresql_binaries_the_fixture_fails_and_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(servers, "POSTGRES_GLOB", str(tmp_path / "postgresql" / "*" / "bin"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match=r"initdb, pg_ctl\) not found .* run `make setup`"):
        servers.postgres_bin()


def test_register_promote_upgrade_and_serve_through_the_server(server, postgres, tmp_path):
    running, database = server
    # Team member A: a project whose params.yaml names the team's server.
    root = tmp_path / "team-a"
    root.mkdir()
    params = yaml.safe_load(factories.write_params(root, map_floor=0.0).read_text())
    params["registry"]["tracking_uri"] = running.url
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    images = write_images(root)
    models = {"v1": image_model(tmp_path / "onnx" / "v1.onnx", 8, seed=1),
              "v2": image_model(tmp_path / "onnx" / "v2.onnx", 16, seed=2),
              "s1": image_model(tmp_path / "onnx" / "s1.onnx", 6, seed=3)}

    # Team member B: another folder, no params.yaml, the server named by MLFLOW_TRACKING_URI, ships v2 while A
    # registers v1 and its side-info model s1.
    other = tmp_path / "team-b"
    other.mkdir()
    adds = [start(root, "models", "add", "backbone", models["v1"], "--label", "v1", *GRAY28),
            start(root, "models", "add", "side-info", models["s1"], "--label", "s1", *GRAY28),
            start(other, "models", "add", "backbone", models["v2"], "--label", "v2", *GRAY28,
                  tracking_uri=running.url)]
    added = [finish(command) for command in adds]
    assert "registered fct-side-info/1" in added[1]
    assert {"registered fct-backbone/1", "registered fct-backbone/2"} == {line.split(":")[0] for line in
                                                                          (added[0], added[2])}
    fct(root, "sets", "embed", images["gallery"], "--model", "v1", "--side-info", "s1", "--name", "gallery_v1")
    fitted = fct(root, "fit", "--from", "v1", "--to", "v2", "--side-info", "s1", "--train", images["train"],
                 "--val", images["gallery"], *SMALL_FIT)
    assert "registered fct-transformation/1" in fitted
    v2 = ModelRegistry(root, tracking_uri=running.url).get("backbone", "v2")
    assert f"@champion -> {v2}" in fct(root, "promote", "v2")
    upgraded = fct(root, "upgrade", "gallery_v1")  # to @champion: v1 -> v2 through h
    assert "wrote " in upgraded and "gallery_v1@v2" in upgraded

    # The upgraded vectors are h (as registered on the server) applied to the stored ones.
    registry = ModelRegistry(root, tracking_uri=running.url)
    source = EmbeddingSet.open(root / "embeddings" / "gallery_v1").read()
    target = EmbeddingSet.open(root / "embeddings" / "gallery_v1@v2")
    assert target.manifest.model == registry.get("backbone", "v2").ref
    h = registry.onnx_path(registry.get("transformation", "h-v1-v2"))
    np.testing.assert_allclose(target.read().embeddings, apply_onnx(h, source.embeddings, source.side_info),
                               rtol=1e-5, atol=1e-6)

    # Nothing was registered locally: versions live in PostgreSQL, ONNX files in the server's artifact folder.
    assert not (root / "registry" / "mlflow.db").exists()
    assert postgres.sql(database, "SELECT name || '/' || version FROM model_versions ORDER BY 1").split() == [
        "fct-backbone/1", "fct-backbone/2", "fct-side-info/1", "fct-transformation/1"]
    assert {sha256(path) for path in models.values()} | {sha256(h)} <= stored_onnx(running.artifacts)
    assert not (other / "registry" / "mlflow.db").exists()

    # A serves the champion (v2, downloaded from the server) with the upgraded gallery.
    port = servers.free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen([str(servers.FCT_REGISTRY), "--root", str(root), "serve", "--port", str(port)],
                                 stdout=out, stderr=subprocess.STDOUT, env=environment())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, serve, log)
        with httpx.Client(base_url=url, timeout=30) as http:
            info = http.get("/info").json()
            assert info["backbone"]["label"] == "v2" and info["gallery"]["path"] == str(target.path)
            stored = target.read()
            found = http.post("/search", json={"embedding": stored.embeddings[7].tolist(), "k": 3}).json()
            assert found["ids"][0] == int(stored.ids[7]) and found["scores"][0] == pytest.approx(0, abs=1e-4)
            image = factories.make_splits()["test"].images[7, 0]
            by_image = http.post("/search", files={"image": ("q.png", png(image), "image/png")}, params={"k": 5})
            assert by_image.status_code == 200, by_image.text
            assert len(by_image.json()["ids"]) == 5 and by_image.json()["model"] == info["gallery"]["model"]
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=30) == 0, log.read_text()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(timeout=10)


# Waits for a go file, then runs the console script in-process: the four registrations start together instead of
# being spread out by how long each interpreter takes to import mlflow, ONNX Runtime and the CLI on busy cores.
LAUNCHER = """
import pathlib, runpy, sys, time
ready, go, script = map(pathlib.Path, sys.argv[1:4])
import mlflow, mlflow.onnx, onnxruntime, fct_registry.cli.app  # warm imports
ready.touch()
deadline = time.monotonic() + 120
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.002)
sys.argv = [str(script), *sys.argv[4:]]
runpy.run_path(str(script), run_name="__main__")
"""


def test_four_processes_registering_at_the_same_moment_get_versions_1_to_4(server, postgres, tmp_path):
    running, database = server
    files = {f"c{i}": image_model(tmp_path / "onnx" / f"c{i}.onnx", 8, seed=10 + i) for i in range(1, 6)}
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    jobs = {}
    for i in range(1, 5):  # four jobs, four project folders (as on four machines), one server
        root = tmp_path / f"job{i}"
        root.mkdir()
        argv = [sys.executable, "-c", LAUNCHER, barrier / f"ready{i}", barrier / "go", servers.FCT_REGISTRY,
                "--root", root, "models", "add", "backbone", files[f"c{i}"], "--label", f"c{i}", *GRAY28]
        jobs[f"c{i}"] = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, env=environment(running.url))
    try:
        deadline = time.monotonic() + 120
        while len(list(barrier.glob("ready*"))) < 4:
            dead = {label: job.communicate() for label, job in jobs.items() if job.poll() is not None}
            assert not dead and time.monotonic() < deadline, f"a job did not get ready: {dead}"
            time.sleep(0.05)
        (barrier / "go").touch()
        results = {label: (*job.communicate(timeout=180), job.returncode) for label, job in jobs.items()}
    finally:
        for job in jobs.values():
            if job.poll() is None:
                job.kill()
    for label, (stdout, stderr, code) in results.items():
        assert code == 0, f"{label} exited {code}\n{stdout}\n{stderr}"
        assert "View run" not in stdout, stdout

    registry = ModelRegistry(tmp_path / "check", tracking_uri=running.url)
    versions = registry.versions("backbone")
    assert sorted(v.version for v in versions) == [1, 2, 3, 4]
    assert {v.ref.label: v.ref.sha256 for v in versions} == {label: sha256(files[label]) for label in jobs}
    for label, (stdout, _, _) in results.items():
        (mine,) = [v for v in versions if v.ref.label == label]
        assert f"registered fct-backbone/{mine.version}" in stdout, stdout
    assert postgres.sql(database, "SELECT count(*) FROM experiments WHERE name = 'fct-registry'").strip() == "1"

    # The store is usable afterwards: every artifact downloads intact, a fifth job gets version 5, and
    # registering the same bytes again (idempotent) creates nothing.
    for version in versions:
        assert sha256(registry.onnx_path(version)) == version.ref.sha256
    after = tmp_path / "job5"
    after.mkdir()
    fifth = start(after, "models", "add", "backbone", files["c5"], "--label", "c5", *GRAY28, tracking_uri=running.url)
    again = start(after, "models", "add", "backbone", files["c1"], "--label", "c1", *GRAY28, tracking_uri=running.url)
    assert "registered fct-backbone/5:" in finish(fifth)
    (c1,) = [v for v in versions if v.ref.label == "c1"]
    assert f"registered fct-backbone/{c1.version}:" in finish(again)
    assert postgres.sql(database, "SELECT count(*) FROM model_versions").strip() == "5"
    assert stored_onnx(running.artifacts) == {sha256(path) for path in files.values()}
