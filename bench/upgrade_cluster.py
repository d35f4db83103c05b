"""The Ray engine on a real multi-node Ray cluster on this machine: rows/s per worker, the driver's share of the
data, and shard tasks vs the Ray Data pipeline they replaced.

A cluster of ``--nodes`` nodes (default 2: a head and one more, 1 CPU each, each started with ``ray start`` on
127.0.0.1 by ``engines.ray_cluster.LocalRayCluster``) upgrades a synthetic set (8-d embedding + 128-d side-info,
1 hop to 128-d, the project's dims, shards of 65536 rows) through ``upgrade_set(engine="ray")``, submitted by
address, with 1, 2, ... workers (1 CPU per task). Per run:

- ``rows/s``: the whole upgrade's wall time (the driver was connected beforehand, its workers warmed by a small
  upgrade, so neither Ray's connection nor worker start-up is counted);
- ``rows/s per worker (in task)``: each shard task's rows over its own wall time (read + verify, compute, write),
  averaged over the tasks;
- ``driver read / written``: the driver process's ``read_chars`` / ``write_chars`` (``/proc/self/io``, every
  ``read``/``write`` system call, sockets included) during the upgrade, against the set's bytes;
- ``scheduling s per shard``: wall time x workers minus the tasks' summed time, per shard: what the driver and Ray
  add per shard.

Baseline ``ray_data_stream``: the engine as it was before (a pool of Ray Data actors runs the chain and streams
every row back to the driver, which writes all shards), on the same cluster and set; its actors ask for no CPU
(Ray Data's read tasks need a whole one on these 1-CPU nodes). ``local``: the local engine
(2 threads) in this process, for reference. On one machine every node shares its cores and disk, so the figures
give per-worker rates and the driver's share; the scaling model in the README extrapolates from them.

Usage: ``python bench/upgrade_cluster.py [--quick] [--rows N] [--nodes N] [--workdir /tmp]``
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import common
import numpy as np
import psutil
import pyarrow as pa

from fct_registry.engines.chain import apply_chain, check_finite
from fct_registry.engines.ray_cluster import DRIVER_ENV, LocalRayCluster, NodeSpec
from fct_registry.engines.run import upgrade_set
from fct_registry.engines.shards import BATCH_ROWS, ShardResult
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.set_writer import write_embedding_set
from fct_registry.vectors.vector_column import vector_array, vector_matrix


def _io() -> tuple[int, int]:
    counters = psutil.Process().io_counters()
    return counters.read_chars, counters.write_chars


def set_bytes(path: Path) -> int:
    """Bytes of a set's shards."""
    return sum(p.stat().st_size for p in path.glob("part-*.parquet"))


def measured(name: str, rows: int, run: Callable[[], Path], workers: int, reports: list[ShardResult]) -> dict:
    """Run one upgrade (``run`` returns the written set's folder) and collect its figures."""
    reports.clear()
    print(f"{name}, {workers} worker(s): running", flush=True)
    read0, written0 = _io()
    started = time.perf_counter()
    out = run()
    wall = time.perf_counter() - started
    read1, written1 = _io()
    entry = {"engine": name, "workers": workers, "rows/s": rows / wall, "seconds": wall,
             "driver read MB": (read1 - read0) / 1e6, "driver written MB": (written1 - written0) / 1e6,
             "set written MB": set_bytes(out) / 1e6}
    if reports:
        entry["rows/s per worker (in task)"] = float(np.mean([r.info.rows / r.seconds for r in reports]))
        entry["scheduling s per shard"] = (wall * workers - sum(r.seconds for r in reports)) / len(reports)
        entry["nodes used"] = len({r.node for r in reports})
    shutil.rmtree(out)
    return entry


def ray_data_stream(source: EmbeddingSet, steps, dest: Path, actors: int, batch_rows: int) -> Path:
    """The engine this project had before: Ray Data actors run the chain, the driver receives every row and
    writes every shard (``write_embedding_set``)."""
    import ray

    class ChainRunner:  # defined here so that Ray ships it by value to workers that cannot import this script
        def __init__(self, steps) -> None:
            from fct_registry.onnx_boundary.runtime import OnnxModel

            self.steps, self.models = list(steps), [OnnxModel(s.onnx_path) for s in steps]

        def __call__(self, table: pa.Table) -> pa.Table:
            out, _ = apply_chain(self.models, self.steps, matrix(table, "embedding"), matrix(table, "side_info"))
            column = vector_array(out)
            return table.set_column(table.schema.get_field_index("embedding"), "embedding", column)

    def matrix(table: pa.Table, column: str) -> np.ndarray:
        return vector_matrix(table.column(column), table.schema.field(column).type.byte_width // 4, column)

    m = source.manifest
    ds = ray.data.read_parquet([str(p) for p in source.shard_paths])
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    ds.context.target_max_block_size = batch_rows * (16 + 4 * (m.dim + m.side_info_dim))
    ds = ds.map_batches(ChainRunner, fn_constructor_kwargs={"steps": list(steps)}, batch_size=batch_rows,
                        batch_format="pyarrow", num_cpus=0, compute=ray.data.ActorPoolStrategy(size=actors))
    # actors at 0 CPU: Ray Data's file listing and read tasks ask for 1 CPU each, which no node of 1 CPU whose actor
    # holds a fraction of it can give (the hang in the team's notes)

    def batches():
        for table in ds.iter_batches(batch_size=batch_rows, batch_format="pyarrow"):
            ids, embeddings = table.column("item_id").to_numpy(), matrix(table, "embedding")
            check_finite(embeddings, ids, "Ray Data baseline")
            yield EmbeddingBatch(ids, table.column("label").to_numpy(), embeddings, matrix(table, "side_info"),
                                 model=steps[-1].target)

    write_embedding_set(dest, batches(), steps[-1].target, m.side_info_model, m.metric, m.normalized,
                        [*m.lineage, "baseline"], max(s.rows for s in m.shards))
    return dest


def main() -> None:
    parser = common.arguments(__doc__, "a small set: a smoke test")
    parser.add_argument("--rows", type=int, help="rows of the set (default 1,000,000; quick 131,072)")
    parser.add_argument("--nodes", type=int, default=2, help="Ray nodes, 1 CPU each (default 2)")
    args = parser.parse_args()
    os.environ.update(DRIVER_ENV)  # before Ray is first loaded in this process
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # so that the cluster is stopped on the way out
    import ray

    host = common.machine()
    rows = args.rows or (2 * common.SHARD_ROWS if args.quick else 1_000_000)
    worker_counts = list(range(1, args.nodes + 1))
    params = {"rows": rows, "nodes": args.nodes, "cpus_per_node": 1, "worker_cpus": 1, "workers": worker_counts,
              "hops": 1, "batch_rows (tasks; Ray Data baseline: shard_rows)": BATCH_ROWS,
              "shard_rows": common.SHARD_ROWS}
    nodes = [NodeSpec(num_cpus=1, resources={f"node_{i}": 1}) for i in range(args.nodes)]
    runs, reports = [], []
    with tempfile.TemporaryDirectory(prefix="fct-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        steps, _ = common.export_chain(work / "models", 1)
        source = common.synth_set(work / "v1", rows, common.CHAIN_DIMS[0], common.synthetic_ref("v1"))
        warm = common.synth_set(work / "warm", 2 * args.nodes, common.CHAIN_DIMS[0], common.synthetic_ref("v1"))
        cluster_started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="rc", dir="/tmp") as root:
            cluster = LocalRayCluster(root, nodes).start()
            start_s = time.perf_counter() - cluster_started
            ray.init(address=cluster.address, logging_level=logging.WARNING)
            try:
                for workers in worker_counts:
                    upgrade_set(warm, steps, work / "warm-out", engine="ray", workers=workers, batch_rows=1,
                                overwrite=True)  # starts a worker process per task slot, as the runs will use
                    runs.append(measured("ray_tasks", rows, lambda w=workers: upgrade_set(
                        source, steps, work / "out", engine="ray", workers=w, worker_cpus=1,
                        on_shard=reports.append).path, workers, reports))
                for actors in worker_counts:
                    runs.append(measured("ray_data_stream", rows, lambda a=actors: ray_data_stream(
                        source, steps, work / "out", a, common.SHARD_ROWS), actors, []))
            finally:
                ray.shutdown()
                cluster.stop()
        runs.append(measured("local", rows, lambda: upgrade_set(source, steps, work / "out").path, 2, []))
    source_mb = rows * (16 + 4 * (common.CHAIN_DIMS[0] + common.SIDE_DIM)) / 1e6
    tasks = {r["workers"]: r for r in runs if r["engine"] == "ray_tasks"}
    streamed = {r["workers"]: r for r in runs if r["engine"] == "ray_data_stream"}
    top = max(worker_counts)
    headline = {"cluster start s": round(start_s, 1),
                **{f"rows/s, tasks, {w} worker(s)": round(r["rows/s"]) for w, r in tasks.items()},
                **{f"rows/s per worker in task, {w} worker(s)": round(r["rows/s per worker (in task)"])
                   for w, r in tasks.items()},
                f"driver read+written MB, tasks, {top} workers": round(tasks[top]["driver read MB"]
                                                                      + tasks[top]["driver written MB"], 2),
                f"driver read+written MB, Ray Data stream, {top} actors": round(
                    streamed[top]["driver read MB"] + streamed[top]["driver written MB"], 1),
                "set read + written MB": round(source_mb + tasks[top]["set written MB"], 1),
                f"tasks / Ray Data stream rows/s, {top} workers": round(tasks[top]["rows/s"]
                                                                      / streamed[top]["rows/s"], 2)}
    common.write_results(
        "upgrade_cluster", args.quick, "Upgrade on a multi-node Ray cluster (ray start, one machine)", host,
        {**params, "cluster_start_s": start_s}, {"runs": runs}, headline, [("Runs", runs)],
        notes=["Nodes are processes of this one machine: they share its cores, memory and disk, so adding a "
               "worker adds no hardware here; per-worker rates and the driver's share are what carry over to a "
               "real cluster.",
               "Each task runs ONNX Runtime sessions with as many threads as CPUs it asks (1 here), so one worker "
               "computes on one core and two workers on both.",
               "driver read/written: /proc/self/io read_chars and write_chars of the driver process during the "
               "upgrade; they include Ray's control traffic over sockets and loading the ONNX files to validate "
               "the chain. A task-based run writes only the manifest and sidecars to the set.",
               f"Source set: {source_mb:.0f} MB of vectors (Parquet slightly more); every run writes the set "
               "written MB of shards.",
               "Other jobs running on the machine skew every figure; see load_avg_1m_at_start."])


if __name__ == "__main__":
    main()
