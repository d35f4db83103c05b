"""Run every benchmark, each in its own process, then write ``bench/results/run_all[-quick].{json,md}``.

The summary holds the machine description, each benchmark's exit status, wall time and headline figures (read
from its own results file). Exits non-zero when any benchmark failed.

Usage: ``python bench/run_all.py [--quick] [--workdir /tmp]`` (``make bench`` runs the full set).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import common

BENCHMARKS = ("upgrade_throughput", "upgrade_phases", "fresh_memory", "upgrade_local_loop", "upgrade_memory",
              "upgrade_cluster", "serving_latency", "store_stress")
HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark's --quick smoke test")
    parser.add_argument("--workdir", type=Path, help="passed on to every benchmark (default: the temp dir)")
    args = parser.parse_args()
    host = common.machine()
    options = (["--quick"] if args.quick else []) + (["--workdir", str(args.workdir)] if args.workdir else [])
    runs, headline = [], {}
    for name in BENCHMARKS:
        cmd = [sys.executable, str(HERE / f"{name}.py"), *options]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        started = time.perf_counter()
        code = subprocess.run(cmd).returncode
        result = common.RESULTS / f"{name}{'-quick' if args.quick else ''}.json"
        runs.append({"benchmark": name, "exit_code": code, "wall_s": time.perf_counter() - started,
                     "results": str(result.relative_to(HERE.parent)) if code == 0 else "-"})
        if code == 0:
            headline |= {f"{name}: {k}": v for k, v in json.loads(result.read_text())["headline"].items()}
    common.write_results("run_all", args.quick, "All benchmarks", host, {"benchmarks": list(BENCHMARKS)},
                         {"runs": runs}, headline, [("Runs", runs)])
    failed = [r["benchmark"] for r in runs if r["exit_code"] != 0]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
