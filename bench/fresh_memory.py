"""What touching fresh memory costs on this machine: the effect behind the shard writer's design (issue 13).

On a VM whose idle memory is handed back to the host (free page reporting, DAMON reclaim: e.g. Firecracker), a page
the guest has not used lately costs a host page fault when it is touched again. Four measurements of 64 MiB each,
repeated, the median reported:

- ``write + fsync, new file``: a new file each time: the page cache takes fresh pages;
- ``write + fsync, same file rewritten``: one file truncated and rewritten: its freed pages are taken again at once;
- ``fill a new array``: ``np.empty`` + fill, a fresh mapping each time (64 MiB is above malloc's mmap threshold);
- ``fill a reused array``: the same array filled again.

Usage: ``python bench/fresh_memory.py [--quick] [--repeats N] [--workdir /tmp]``
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import common
import numpy as np

MIB = 2**20
SIZE = 64 * MIB


def measure(repeats: int, fn: Callable[[int], object]) -> dict[str, float]:
    """Median wall and system-CPU milliseconds of ``fn(i)`` over ``repeats`` calls, and system µs per KiB."""
    wall, system = [], []
    for i in range(repeats):
        before, started = os.times(), time.perf_counter()
        fn(i)
        wall.append(time.perf_counter() - started)
        system.append(os.times().system - before.system)
    return {"wall ms": 1e3 * statistics.median(wall), "system CPU ms": 1e3 * statistics.median(system),
            "system µs per KiB": 1e6 * statistics.median(system) / (SIZE / 1024)}


def main() -> None:
    parser = common.arguments(__doc__, "3 repeats: a smoke test", "where files are written")
    parser.add_argument("--repeats", type=int, help="repeats per measurement (default 10; quick 3)")
    args = parser.parse_args()
    host, repeats = common.machine(), args.repeats or (3 if args.quick else 10)
    data = np.random.default_rng(0).bytes(SIZE)
    reused = np.empty(SIZE // 4, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="fct-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        rows = {
            "write + fsync, new file": measure(repeats, lambda i: common.fsync_write(work / f"new-{i}", data)),
            "write + fsync, same file rewritten": measure(repeats, lambda i: common.fsync_write(work / "same", data)),
            "fill a new array": measure(repeats, lambda i: np.empty(SIZE // 4, dtype=np.float32).fill(i)),
            "fill a reused array": measure(repeats, lambda i: reused.fill(i)),
        }
    table = [{"what (64 MiB)": name, **{k: round(v, 2) for k, v in row.items()}} for name, row in rows.items()]
    headline = {
        "page cache: fresh / recycled system CPU": round(rows["write + fsync, new file"]["system CPU ms"]
                                                         / max(rows["write + fsync, same file rewritten"]
                                                               ["system CPU ms"], 1e-3), 1),
        "anonymous memory: fresh / reused wall": round(rows["fill a new array"]["wall ms"]
                                                       / rows["fill a reused array"]["wall ms"], 1),
    }
    common.write_results(
        "fresh_memory", args.quick, "What touching fresh memory costs", host, {"bytes": SIZE, "repeats": repeats},
        {"rows": table}, headline, [("Median of repeats", table)],
        notes=["System CPU: os.times().system of this process; the host's own work is not in it.",
               "Other jobs running on the machine skew every figure; see load_avg_1m_at_start."])


if __name__ == "__main__":
    main()
