"""The local upgrade engine: output shards upgraded by a few threads of this process, overlapping I/O and compute.

A bounded pipeline: each of ``threads`` threads reads and upgrades one shard at a time
(:func:`~fct_registry.engines.shards.compute_shard`: read + verify, ONNX Runtime) and one writer thread encodes,
hashes, writes and fsyncs the finished shards in order (:func:`~fct_registry.engines.shards.store_shard`), so no
computing thread waits on the disk. pyarrow, blake3 and ONNX Runtime release the GIL. At most ``threads`` shards are
being computed and 3 wait for or are in the writer: memory is bounded by ``threads + 3`` shards, flat in the set's
size. The sessions are shared (ONNX Runtime allows concurrent ``run`` calls on one session); with several
threads each call gets the thread's share of the cores (:func:`session_threads`), so the threads compute side by
side instead of queueing for one pool.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from fct_registry.engines.shards import ShardJob, ShardPlan, ShardResult, compute_shard, load_sessions, store_shard
from fct_registry.vectors.batch import EmbeddingBatch

DEFAULT_THREADS = 2


def session_threads(threads: int, cpus: int | None = None) -> int | None:
    """Intra-op threads per ONNX Runtime call for ``threads`` engine threads on ``cpus`` usable cores (default: this
    process's CPU affinity): None (ONNX Runtime's pool over every core) for one engine thread, else the cores
    divided among the threads, at least 1."""
    if threads == 1:
        return None
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    return max(1, cpus // threads)


def upgrade_shards_local(job: ShardJob, plans: Sequence[ShardPlan], threads: int = DEFAULT_THREADS,
                         on_shard: Callable[[ShardResult], None] | None = None) -> list[ShardResult]:
    """Write every planned shard into ``job.folder`` with ``threads`` threads; results in plan order.

    Args:
        job: The upgrade's shared settings (chain, batch rows, destination temp dir, source manifest); its
            ``session_threads`` sizes the sessions this loads, shared by the threads.
        plans: The output shards, from :func:`~fct_registry.engines.shards.plan_shards`.
        threads: Shards upgraded at once (>= 1).
        on_shard: Called in plan order as each shard is finished, e.g. to report progress.

    Returns:
        One result per plan, in plan order.

    Raises:
        EmbeddingSetError, UpgradeError: the first failing shard's error (see ``upgrade_shard``); shards not yet
            started are cancelled and running ones finish before it is raised.
        RuntimeInputError: an ONNX file of the chain no longer loads.
    """
    models = load_sessions(job)
    results: list[ShardResult] = []
    computing: deque[tuple[ShardPlan, Future[tuple[EmbeddingBatch, float]]]] = deque()
    writing: deque[Future[ShardResult]] = deque()

    def collect() -> None:
        result = writing.popleft().result()
        results.append(result)
        if on_shard is not None:
            on_shard(result)

    def hand_over() -> None:  # the oldest computed shard goes to the writer; at most 2 wait there
        plan, future = computing.popleft()
        writing.append(writer.submit(store_shard, job, plan, *future.result()))
        if len(writing) > 2:
            collect()

    pool = ThreadPoolExecutor(threads, thread_name_prefix="fct-upgrade")
    writer = ThreadPoolExecutor(1, thread_name_prefix="fct-upgrade-writer")
    try:
        for plan in plans:
            computing.append((plan, pool.submit(compute_shard, job, plan, models)))
            if len(computing) >= threads:
                hand_over()
        while computing:
            hand_over()
        while writing:
            collect()
    finally:
        for _, future in computing:
            future.cancel()
        pool.shutdown(wait=True)
        writer.shutdown(wait=True)
    return results
