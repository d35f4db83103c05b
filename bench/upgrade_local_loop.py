"""The local engine against the in-memory ONNX Runtime loop, side by side, with 1, 2 and 3 engine threads.

One synthetic set (default 1,000,000 rows of 8-d embedding + 128-d side-info, shards of 65536 rows), one hop to
128-d (the project's dims, hidden 512). Each repeat runs every variant once, in turn, so their ratios share the
machine's load:

- ``ort_loop``: ``InferenceSession.run`` over the set's rows already in memory, in the engine's batches
  (``engines.shards.BATCH_ROWS``), with ONNX Runtime's default thread pool (one thread per core) — the rate of the
  math alone, the reference of every ratio; ``ort_loop, 65536-row calls``: the same in shard-sized calls (the
  engine's batches before issue 13);
- ``local, N threads``: ``upgrade_set`` end to end (each shard read once with its checksum verified, Parquet decode,
  ONNX Runtime, NaN checks, Parquet encode streamed into the file while hashed, write + fsync) with ``workers=N``;
  with N > 1 each thread's sessions get the cores divided among the threads (``engines.local.session_threads``) and
  do not spin; ``local, 2 threads, whole-shard buffer (before)``: the same with the shard writer as it was before
  Parquet was streamed into the file (each shard encoded into one in-memory buffer, then hashed and written).

Every variant starts on a settled disk: the previous engine run's output is removed and all writes are synced
before it, untimed (an upgrade writes a new set; removing the old one is not part of its cost).
Ratios are given on the best repeat of each variant and as the median over repeats of the ratio within each repeat
(the variants of one repeat run back to back, so that ratio is the least moved by the shared machine's drifting
speed).

Usage: ``python bench/upgrade_local_loop.py [--quick] [--rows N] [--repeats N] [--workdir /tmp]``
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import common
import onnxruntime as ort

from fct_registry.engines import shards
from fct_registry.engines.local import DEFAULT_THREADS
from fct_registry.engines.run import upgrade_set
from fct_registry.engines.shards import BATCH_ROWS
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import EmbeddingSet, ShardInfo, new_hasher
from fct_registry.vectors.set_writer import shard_bytes, write_shard


def buffered_write_shard(folder: str, file: str, batch: EmbeddingBatch) -> ShardInfo:
    """``write_shard`` as it was: the whole shard encoded into one in-memory buffer, hashed, written, fsynced."""
    data = shard_bytes(batch)
    digest = new_hasher("blake3")
    digest.update(data)
    tmp = Path(folder) / f".{file}.{os.getpid()}-buffered.tmp"
    common.fsync_write(tmp, data)
    os.replace(tmp, Path(folder) / file)
    return ShardInfo(file=file, rows=len(batch), blake3=digest.hexdigest())


def main() -> None:
    parser = common.arguments(__doc__, "a small set, one repeat: a smoke test")
    parser.add_argument("--rows", type=int, help="rows of the set (default 1,000,000; quick 131,072)")
    parser.add_argument("--repeats", type=int, help="repeats of every variant (default 3; quick 1)")
    args = parser.parse_args()
    host = common.machine()
    rows = args.rows or (2 * common.SHARD_ROWS if args.quick else 1_000_000)
    repeats = args.repeats or (1 if args.quick else 3)
    params = {"rows": rows, "hops": 1, "batch_rows": BATCH_ROWS, "shard_rows": common.SHARD_ROWS, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="fct-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        steps, _ = common.export_chain(work / "models", 1)
        source = common.synth_set(work / "v1", rows, common.CHAIN_DIMS[0], common.synthetic_ref("v1"))
        stored = EmbeddingSet.open(source.path).read()
        session = ort.InferenceSession(str(steps[0].onnx_path), providers=["CPUExecutionProvider"])

        def ort_loop(batch_rows: int):
            feeds = [{"old_embedding": stored.embeddings[i:i + batch_rows],
                      "side_info": stored.side_info[i:i + batch_rows]} for i in range(0, rows, batch_rows)]

            def run() -> None:
                for feed in feeds:
                    session.run(None, feed)
            return run

        def local(threads: int):
            return lambda: upgrade_set(source, steps, work / "out", workers=threads)

        def local_buffered():  # the shard writer before issue 13's last change, swapped in for one variant
            def run() -> None:
                shards.write_shard = buffered_write_shard
                try:
                    upgrade_set(source, steps, work / "out", workers=DEFAULT_THREADS)
                finally:
                    shards.write_shard = write_shard
            return run

        def settle() -> None:  # untimed, before every variant: the last output removed and on disk
            shutil.rmtree(work / "out", ignore_errors=True)
            os.sync()

        variants = {"ort_loop": ort_loop(BATCH_ROWS), "ort_loop, 65536-row calls": ort_loop(common.SHARD_ROWS),
                    **{f"local, {n} threads": local(n) for n in (1, 2, 3)},
                    f"local, {DEFAULT_THREADS} threads, whole-shard buffer (before)": local_buffered()}
        times: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}  # (user, system) seconds
        for _ in range(repeats):
            for name, run in variants.items():
                settle()
                started, before = time.perf_counter(), os.times()
                run()
                times[name].append(time.perf_counter() - started)
                after = os.times()
                cpu[name].append((after.user - before.user, after.system - before.system))
    best_ort = min(times["ort_loop"])
    table = [{"variant": name, "rows/s": rows / min(t), "ratio to ort_loop": best_ort / min(t),
              "rows/s (median repeat)": rows / statistics.median(t),
              "ratio (median of repeats)": statistics.median(o / x for o, x in zip(times["ort_loop"], t, strict=True)),
              "CPU µs/row, user (median)": 1e6 * statistics.median(u for u, _ in cpu[name]) / rows,
              "CPU µs/row, system (median)": 1e6 * statistics.median(k for _, k in cpu[name]) / rows,
              "seconds (each repeat)": ", ".join(f"{x:.2f}" for x in t)} for name, t in times.items()]
    by_name = {row["variant"]: row for row in table}
    default = by_name[f"local, {DEFAULT_THREADS} threads"]
    best = max((row for row in table if row["variant"].startswith("local") and "before" not in row["variant"]),
               key=lambda row: row["rows/s"])
    headline = {"ort_loop rows/s": round(rows / best_ort),
                f"local engine (default: {DEFAULT_THREADS} threads) / ort_loop": round(default["ratio to ort_loop"], 2),
                "the same, median of repeats": round(default["ratio (median of repeats)"], 2),
                f"best local variant ({best['variant']}) / ort_loop": round(best["ratio to ort_loop"], 2)}
    common.write_results(
        "upgrade_local_loop", args.quick, "The local upgrade loop against the ONNX Runtime loop, side by side", host,
        params, {"times": times, "cpu_user_system": cpu}, headline, [("Variants (best of repeats)", table)],
        notes=["All variants run on the same set and chain; each repeat runs every variant once, in turn.",
               "ort_loop reads nothing and writes nothing: the set's batches are in memory before it starts.",
               "Before every variant, untimed: the last engine output removed, os.sync().",
               "CPU: user and system time of this process (all its threads) per row; 2 cores give at most 2 s of "
               "CPU per second.",
               "Shards store vectors as fixed_size_binary little-endian float32 (fct_registry.vectors.vector_column).",
               "Other jobs running on the machine skew every figure; see load_avg_1m_at_start."])


if __name__ == "__main__":
    main()
