"""Peak memory (RSS) of an upgrade at 1e5, 1e6 and 1e7 rows: it stays flat because batches are bounded.

For each size a synthetic v1 set (8-d embedding + 128-d side-info, under ``--workdir``) is written by this
process, then a fresh Python subprocess runs ``upgrade_set`` (local engine with its defaults, 1 hop v1 -> v2)
and reports its peak RSS (``VmHWM`` of ``/proc/self/status``) and its RSS just before the upgrade (after imports).
Not ``ru_maxrss``: Linux carries the parent's peak over fork + exec into the child's ``ru_maxrss``. Sets are
deleted after each size; a size whose sets do not fit on the disk is skipped and the reason recorded. Memory
only: nothing here is timed.

Usage: ``python bench/upgrade_memory.py [--quick] [--sizes N ...] [--workdir /tmp]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import common
import psutil

from fct_registry.engines.chain import ChainStep
from fct_registry.engines.local import DEFAULT_THREADS
from fct_registry.engines.run import upgrade_set
from fct_registry.engines.shards import BATCH_ROWS

HOPS = 1
MIB = 2**20


def set_bytes(rows: int, dim: int, side_dim: int) -> int:
    """Approximate on-disk bytes of a set: ids and labels (16 B) plus float32 vectors per row (Parquet of random
    floats barely compresses)."""
    return rows * (16 + 4 * (dim + side_dim))


def child(source: str, dest: str, steps_json: str) -> None:
    """Run one upgrade in this fresh process and print its memory figures as one JSON line."""
    steps = [ChainStep.model_validate(s) for s in json.loads(Path(steps_json).read_text())]
    before = psutil.Process().memory_info().rss
    upgrade_set(source, steps, dest)
    status = Path("/proc/self/status").read_text()
    peak_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    print(json.dumps({"rss_before_upgrade_mib": before / MIB, "peak_rss_mib": peak_kib / 1024}))


def measure(work: Path, rows: int, steps_json: Path) -> dict:
    """Write a set of ``rows`` rows, upgrade it in a subprocess, delete both sets; the child's figures."""
    need = set_bytes(rows, common.CHAIN_DIMS[0], common.SIDE_DIM) + set_bytes(rows, common.CHAIN_DIMS[1],
                                                                             common.SIDE_DIM)
    free = shutil.disk_usage(work).free
    if need * 1.1 > free:
        return {"rows": rows, "skipped": f"needs ~{need / 2**30:.1f} GiB in {work}, {free / 2**30:.1f} GiB free"}
    source, dest = work / f"v1-{rows}", work / f"v2-{rows}"
    try:
        common.synth_set(source, rows, common.CHAIN_DIMS[0], common.synthetic_ref("v1"))
        done = subprocess.run([sys.executable, __file__, "--child", str(source), str(dest), str(steps_json)],
                              check=True, capture_output=True, text=True)
    finally:
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(dest, ignore_errors=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {"rows": rows, "disk_gib": need / 2**30, **figures,
            "growth_mib": figures["peak_rss_mib"] - figures["rss_before_upgrade_mib"]}


def main() -> None:
    parser = common.arguments(__doc__, "small sizes: a smoke test (seconds)")
    parser.add_argument("--sizes", type=int, nargs="+", help="rows per set (default 1e5 1e6 1e7; quick 1e5 3e5)")
    parser.add_argument("--child", nargs=3, metavar=("SOURCE", "DEST", "STEPS_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    host = common.machine()
    sizes = args.sizes or ([100_000, 300_000] if args.quick else [100_000, 1_000_000, 10_000_000])
    params = {"sizes": sizes, "hops": HOPS, "batch_rows": BATCH_ROWS, "shard_rows": common.SHARD_ROWS,
              "engine": f"local, {DEFAULT_THREADS} threads",
              "workdir": str(args.workdir),
              "disk_free_gib_at_start": round(shutil.disk_usage(args.workdir).free / 2**30, 1)}
    with tempfile.TemporaryDirectory(prefix="fct-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        steps, _ = common.export_chain(work / "models", HOPS)
        steps_json = work / "steps.json"
        steps_json.write_text(json.dumps([s.model_dump(mode="json") for s in steps]))
        runs = [measure(work, rows, steps_json) for rows in sizes]
    measured = [r for r in runs if "skipped" not in r]
    peaks = [r["peak_rss_mib"] for r in measured]
    headline = {f"peak RSS MiB at {r['rows']:,} rows": round(r["peak_rss_mib"]) for r in measured}
    if peaks:
        headline["largest / smallest peak RSS"] = round(max(peaks) / min(peaks), 2)
    headline |= {f"{r['rows']:,} rows": f"skipped: {r['skipped']}" for r in runs if "skipped" in r}
    common.write_results(
        "upgrade_memory", args.quick, "Peak memory of an upgrade", host, params, {"runs": runs}, headline,
        [("Per size (MiB)", measured)],
        notes=["Each upgrade runs in a fresh subprocess; peak_rss_mib is its lifetime peak RSS (VmHWM), "
               "rss_before_upgrade_mib its RSS after imports, growth_mib the difference.",
               "Sets are synthetic (standard normal) and written under the workdir, then deleted.",
               "The local engine holds at most 6 shards (shard_rows each) in memory: 2 read ahead, 1 computed, 3 at "
               "the writer; a set of fewer shards peaks lower: judge flatness on sizes of several shards.",
               "disk_gib: approximate size of the source and upgraded sets together."])


if __name__ == "__main__":
    main()
