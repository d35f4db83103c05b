"""Where an upgrade's time goes: CPU per phase of one 65,536-row output shard, one thread, best of repeats.

One synthetic shard (8-d embedding + 128-d side-info), one hop to 128-d (the project's dims, hidden 512). Each
phase of the local engine's loop is timed alone with ``time.thread_time`` (the calling thread's CPU; ONNX
Runtime's own pool threads are not counted, so its 2-thread row gives wall time too) and with wall time, and
the phases that change with the shard format are also timed in the format sets had before issue 13
(``fixed_size_list`` vector columns, SHA-256 checksums), side by side.

Usage: ``python bench/upgrade_phases.py [--quick] [--repeats N] [--workdir /tmp]``
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import common
import pyarrow as pa
import pyarrow.parquet as pq

from fct_registry.engines.chain import apply_chain, check_stored_finite
from fct_registry.engines.shards import BATCH_ROWS, ShardJob, load_sessions
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import new_hasher, table_batch
from fct_registry.vectors.set_writer import PARQUET_OPTIONS, check_batch, shard_bytes
from fct_registry.vectors.vector_column import vector_matrix


def timed(repeats: int, fn: Callable[[], object]) -> tuple[float, float, object]:
    """Best wall and best thread-CPU milliseconds over ``repeats`` calls, and the last result."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.thread_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.thread_time() - c)
    return wall * 1e3, cpu * 1e3, out


def as_lists(table: pa.Table, widths: dict[str, int]) -> pa.Table:
    """The same table with its vector columns as ``fixed_size_list<float32>`` (the format before issue 13)."""
    for name, width in widths.items():
        values = vector_matrix(table.column(name), width, name)
        listed = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)
        table = table.set_column(table.schema.get_field_index(name), name, listed)
    return table


def main() -> None:
    parser = common.arguments(__doc__, "fewer repeats: a smoke test", "where the shard is written")
    parser.add_argument("--repeats", type=int, help="repeats per phase (default 5; quick 1)")
    args = parser.parse_args()
    host, repeats, rows = common.machine(), args.repeats or (1 if args.quick else 5), common.SHARD_ROWS
    with tempfile.TemporaryDirectory(prefix="fct-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        steps, _ = common.export_chain(work / "models", 1)
        source = common.synth_set(work / "v1", rows, common.CHAIN_DIMS[0], common.synthetic_ref("v1"))
        path, m = source.shard_paths[0], source.manifest
        job = ShardJob(tuple(steps), BATCH_ROWS, str(work), m, str(source.path), session_threads=1)
        single, pooled = load_sessions(job), [OnnxModel(steps[0].onnx_path)]
        phases: list[tuple[str, str, float, float]] = []

        def phase(name: str, fmt: str, fn: Callable[[], object]) -> object:
            wall, cpu, out = timed(repeats, fn)
            phases.append((name, fmt, wall, cpu))
            return out

        data = phase("read file", "both", path.read_bytes)
        for fmt, checksum in (("since issue 13", "blake3"), ("before", "sha256")):
            phase("checksum of the source shard", fmt, lambda c=checksum: new_hasher(c).update(data))
        table = phase("Parquet decode", "since issue 13",
                      lambda: pq.read_table(pa.BufferReader(data), use_threads=False))
        old_table = as_lists(table, {"embedding": m.dim, "side_info": m.side_info_dim})
        sink = pa.BufferOutputStream()
        pq.write_table(old_table, sink, **PARQUET_OPTIONS)
        old_data = sink.getvalue()
        phase("Parquet decode", "before", lambda: pq.read_table(pa.BufferReader(old_data), use_threads=False))
        batch = phase("Arrow -> numpy views", "since issue 13", lambda: table_batch(table, m, copy=False))
        phase("Arrow -> numpy views", "before", lambda: table_batch(old_table, m, copy=False))
        phase("NaN/inf check of the stored rows", "both", lambda: check_stored_finite(batch, source.path))

        def chain(models: list[OnnxModel], batch_rows: int) -> Callable[[], object]:
            return lambda: [apply_chain(models, steps, batch.embeddings[i:i + batch_rows],
                                        batch.side_info[i:i + batch_rows], ids=batch.ids[i:i + batch_rows])
                            for i in range(0, rows, batch_rows)]

        phase(f"ONNX Runtime, 1-thread session, {BATCH_ROWS}-row calls", "since issue 13", chain(single, BATCH_ROWS))
        phase(f"ONNX Runtime, 2-thread session, {BATCH_ROWS}-row calls (wall = 2 cores)", "both",
              chain(pooled, BATCH_ROWS))
        phase(f"ONNX Runtime, 2-thread session, {rows}-row calls (wall = 2 cores)", "before", chain(pooled, rows))
        upgraded, _ = apply_chain(single, steps, batch.embeddings, batch.side_info, ids=batch.ids)
        out = EmbeddingBatch(batch.ids, batch.labels, upgraded, batch.side_info, model=steps[-1].target)
        phase("output checks (check_batch)", "both", lambda: check_batch(out, out, m.normalized))
        encoded = phase("Parquet encode", "since issue 13", lambda: shard_bytes(out))

        old_out = as_lists(pq.read_table(pa.BufferReader(encoded)), {"embedding": 128, "side_info": m.side_info_dim})
        phase("Parquet encode", "before", lambda: pq.write_table(old_out, pa.BufferOutputStream(), **PARQUET_OPTIONS))
        for fmt, checksum in (("since issue 13", "blake3"), ("before", "sha256")):
            phase("checksum of the output shard", fmt, lambda c=checksum: new_hasher(c).update(encoded))
        phase("write + fsync", "both", lambda: common.fsync_write(work / "out.parquet", encoded))
    table_rows = [{"phase": name, "format": fmt, "wall ms": round(wall, 1), "CPU ms": round(cpu, 1),
                   "CPU µs per row": round(cpu * 1e3 / rows, 2)} for name, fmt, wall, cpu in phases]
    per_format = {fmt: sum(cpu for name, f, _, cpu in phases if f in (fmt, "both") and "ONNX Runtime" not in name)
                  for fmt in ("since issue 13", "before")}
    headline = {f"CPU ms per shard outside ONNX Runtime, {fmt}": round(v) for fmt, v in per_format.items()}
    common.write_results(
        "upgrade_phases", args.quick, "CPU per phase of one upgraded shard", host,
        {"rows": rows, "hops": 1, "batch_rows": BATCH_ROWS, "repeats": repeats}, {"phases": table_rows}, headline,
        [("Phases (best of repeats)", table_rows)],
        notes=["CPU is time.thread_time of the calling thread: pyarrow's and ONNX Runtime's pool threads are not in "
               "it (the 2-thread ONNX Runtime rows: read their wall time). Parquet decode is timed single-threaded.",
               "'before': the format of sets written before issue 13 (fixed_size_list vectors, SHA-256) and the "
               "engine's 65,536-row ONNX Runtime calls; 'both': unchanged.",
               "Other jobs running on the machine skew every figure; see load_avg_1m_at_start."])


if __name__ == "__main__":
    main()
