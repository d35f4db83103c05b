"""The Ray engine on a real two-node Ray cluster, started with ``ray start`` on 127.0.0.1 (a head and one more
node, each with its own temp dir, 1 CPU and a custom resource naming it). Each upgrade is submitted by address from
a fresh driver process, as a user would run it; workers write their shards themselves, and a worker killed mid-run
is retried into the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from engine_world import V1, V2, V3, chain, digests, leftovers, make_set, step

from fct_registry.engines.ray_cluster import DRIVER_ENV, LocalRayCluster, NodeSpec
from fct_registry.engines.run import upgrade_set
from fct_registry.vectors.batch import with_model
from fct_registry.vectors.set_writer import write_embedding_set

pytestmark = pytest.mark.slow
TASK_TITLE = "ray::_shard_task"
"""The process title of a Ray worker while it runs a shard task."""

DRIVER = textwrap.dedent("""
    import json, sys
    import ray
    from fct_registry.engines.chain import ChainStep
    from fct_registry.engines.run import upgrade_set

    args = json.loads(sys.argv[1])
    nodes, reports = [], []
    if args["warm"]:  # a warm worker on each named node, so that neither drains the queue alone
        ray.init(address=args["address"])

        def where():
            import fct_registry.engines.ray_engine  # pyarrow, ONNX Runtime

            return ray.get_runtime_context().get_node_id()

        nodes = ray.get([ray.remote(where).options(num_cpus=1, resources={name: 1}).remote()
                         for name in args["warm"]])
    steps = [ChainStep.model_validate(s) for s in args["steps"]]
    try:
        upgrade_set(args["source"], steps, args["dest"], engine="ray", address=args["address"],
                    on_shard=reports.append, **args["options"])
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    else:
        print(json.dumps({"nodes": nodes, "connected_after": ray.is_initialized(),
                          "reports": [{"file": r.info.file, "node": r.node} for r in reports]}))
""")


@pytest.fixture(scope="module")
def cluster():
    """Head ``node_a`` and node ``node_b``, 1 CPU each; every process of both is gone after the module."""
    nodes = [NodeSpec(num_cpus=1, resources={"node_a": 1}), NodeSpec(num_cpus=1, resources={"node_b": 1})]
    started = LocalRayCluster(tempfile.mkdtemp(prefix="rc"), nodes)  # under the session's sandboxed TMPDIR
    started.start()
    try:
        yield started
    finally:
        started.stop()
        assert started.process_ids() == []


def driver(cluster: LocalRayCluster, source: Path, steps, dest: Path, warm: tuple[str, ...] = (),
           cwd: Path | None = None, **options) -> subprocess.Popen:
    """Start a driver process (in ``cwd``) that submits ``upgrade_set(engine="ray", address=...)`` to the
    cluster."""
    args = {"address": cluster.address, "source": str(source), "dest": str(dest), "warm": list(warm),
            "steps": [s.model_dump(mode="json") for s in steps], "options": options}
    return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, **DRIVER_ENV}, cwd=cwd)


def outcome(process: subprocess.Popen) -> dict:
    out, _ = process.communicate(timeout=180)
    assert process.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def test_shards_written_on_both_nodes_are_the_local_engines_bytes(h, tmp_path, cluster):
    source = make_set(tmp_path / "v1", n=1200, shard_rows=100)  # 12 shards
    steps = [step(h, "h1", V1, V2), step(h, "fastfill", V2, V3)]  # the last outputs FastFill's sigma
    local = upgrade_set(source.path, steps, tmp_path / "local", batch_rows=50)
    got = outcome(driver(cluster, Path("v1"), steps, Path("ray"), warm=("node_a", "node_b"), cwd=tmp_path,
                         batch_rows=50, workers=2, worker_cpus=1))  # paths relative to the driver's folder

    assert "error" not in got, got
    assert digests(tmp_path / "ray") == digests(local.path)  # byte-identical shards and manifest
    assert sorted(r["file"] for r in got["reports"]) == [f"part-{i:05d}.parquet" for i in range(12)]
    assert len(set(got["nodes"])) == 2 and {r["node"] for r in got["reports"]} == set(got["nodes"])  # both wrote
    assert got["connected_after"]  # the driver's own connection was used and left open
    assert leftovers(tmp_path) == []


def test_an_upgrade_error_on_a_worker_is_raised_by_the_driver_and_nothing_is_written(h, tmp_path, cluster):
    batch = make_set(tmp_path / "v1", side=False).read()
    batch.embeddings[7, 2] = 20.0  # log(100 - 400) = NaN
    poisoned = write_embedding_set(tmp_path / "poisoned", with_model(batch, V1), model=V1, shard_rows=128)
    got = outcome(driver(cluster, poisoned.path, [step(h, "nan", V1, V2, side=None)], tmp_path / "out",
                         batch_rows=64))
    assert got["error"] == "UpgradeError"
    assert got["message"] == (f"step 1 (fct-transformation/nan) produced NaN/inf for item_id {batch.ids[7]} "
                              "(1 rows in this batch); nothing was written")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def _task_pids(cluster: LocalRayCluster) -> list[int]:
    pids = []
    for pid in cluster.process_ids():
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith(TASK_TITLE):
            pids.append(pid)
    return pids


def test_a_worker_killed_mid_run_is_retried_into_the_same_bytes(h, tmp_path, cluster):
    source = make_set(tmp_path / "v1", n=32_000, shard_rows=4_000)  # 8 shards of 400 small batches each
    local = upgrade_set(source.path, chain(h), tmp_path / "local", batch_rows=10)
    process = driver(cluster, source.path, chain(h), tmp_path / "ray", batch_rows=10, workers=2)
    killed = None
    while process.poll() is None and killed is None:
        for pid in _task_pids(cluster):
            os.kill(pid, signal.SIGKILL)  # a worker process in the middle of a shard task
            killed = pid
            break
        time.sleep(0.005)
    got = outcome(process)

    assert killed is not None, "no shard task was caught running"
    assert "error" not in got, got
    remote = tmp_path / "ray"
    assert digests(remote) == digests(local.path)  # complete: every shard, as the local engine wrote it
    assert not any(p.name.startswith(".") for p in remote.iterdir())  # no temp file of the killed attempt
    np.testing.assert_array_equal(local.read().ids, source.read().ids)
    assert leftovers(tmp_path) == []
