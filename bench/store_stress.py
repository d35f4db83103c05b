"""The registry store under concurrent first use, 20 times: 8 processes at once on a fresh project folder.

Runs ``tests/faces/test_store_concurrency.py::test_eight_processes_on_a_fresh_project_register_and_read_together``
with ``FCT_STRESS_ROUNDS`` rounds (the test suite runs 2). Each round is a new project folder in which 4 processes
register a backbone and 4 run read-only commands (``models list``, ``sets list``, ``lineage``, a failing
``promote v9``) at the same moment; every command must succeed or fail with one line, the versions must be
exactly {1, 2, 3, 4}, and the store must stay usable. Writes ``bench/results/store_stress[-quick].{json,md}``.

Usage: ``python bench/store_stress.py [--quick] [--rounds N]`` (quick: 3 rounds).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import common

TEST = "tests/faces/test_store_concurrency.py::test_eight_processes_on_a_fresh_project_register_and_read_together"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--workdir", type=Path, help="ignored (the test uses pytest's temp dir)")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    host = common.machine()
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:logging", "-p", "no:cacheprovider", TEST],
                         env={**os.environ, "FCT_STRESS_ROUNDS": str(rounds)}, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    wall = time.perf_counter() - started
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr.strip()[-200:]
    row = {"rounds": rounds, "processes per round": 8, "commands": 8 * rounds + 2 * rounds,
           "result": "passed" if run.returncode == 0 else "FAILED", "pytest": summary, "wall s": wall}
    common.write_results("store_stress", args.quick, "Registry store: 8 processes at once on a fresh project", host,
                         {"rounds": rounds, "test": TEST}, {"run": row, "output_tail": run.stdout[-4000:]},
                         {"rounds passed": rounds if run.returncode == 0 else 0, "wall s": round(wall)},
                         [("Run", [row])],
                         ["Each round: 4 `models add backbone` + `models list`, `sets list`, `lineage`, `promote v9`, "
                          "released together by a barrier after the imports; then `promote b2 --alias champion`.",
                          "Before the store was created under a lock, 4 concurrent registrations into a new store "
                          "failed in 4 of 4 trials (issue 10)."])
    if run.returncode != 0:
        sys.exit(run.stdout[-4000:])


if __name__ == "__main__":
    main()
