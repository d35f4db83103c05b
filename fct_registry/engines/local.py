"""The local upgrade engine: output shards upgraded by a few threads of this process, overlapping I/O and compute.

Each thread runs :func:`~fct_registry.engines.shards.upgrade_shard` (read + verify, ONNX Runtime, Parquet write)
for one shard at a time; pyarrow, hashlib and ONNX Runtime release the GIL, so one thread reads, hashes or writes
while another computes. At most ``threads`` shards are in flight: memory is bounded by ``threads`` shards, flat in
the set's size. The sessions are shared (ONNX Runtime allows concurrent ``run`` calls on one session).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from fct_registry.engines.shards import ShardJob, ShardPlan, ShardResult, upgrade_shard

if TYPE_CHECKING:
    from fct_registry.onnx_boundary.runtime import OnnxModel

DEFAULT_THREADS = 2


def upgrade_shards_local(job: ShardJob, plans: Sequence[ShardPlan], models: Sequence[OnnxModel],
                         threads: int = DEFAULT_THREADS, on_shard: Callable[[ShardResult], None] | None = None
                         ) -> list[ShardResult]:
    """Write every planned shard into ``job.folder`` with ``threads`` threads; results in plan order.

    Args:
        job: The upgrade's shared settings (chain, batch rows, destination temp dir, source manifest).
        plans: The output shards, from :func:`~fct_registry.engines.shards.plan_shards`.
        models: The chain's loaded sessions, one per step, shared by the threads.
        threads: Shards upgraded at once (>= 1).
        on_shard: Called in plan order as each shard is finished, e.g. to report progress.

    Returns:
        One result per plan, in plan order.

    Raises:
        EmbeddingSetError, UpgradeError: the first failing shard's error (see ``upgrade_shard``); shards not yet
            started are cancelled and running ones finish before it is raised.
    """
    results: list[ShardResult] = []
    pending: deque[Future[ShardResult]] = deque()

    def collect() -> None:
        result = pending.popleft().result()
        results.append(result)
        if on_shard is not None:
            on_shard(result)

    pool = ThreadPoolExecutor(threads, thread_name_prefix="fct-upgrade")
    try:
        for plan in plans:
            pending.append(pool.submit(upgrade_shard, job, plan, models))
            if len(pending) >= threads:
                collect()
        while pending:
            collect()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)
    return results
