"""The local upgrade engine: output shards upgraded in this process by a pipeline of threads, I/O beside compute.

Three stages run side by side on consecutive shards: a reader thread reads and verifies the next 2 shards
(:func:`~fct_registry.engines.shards.read_plan`); ``threads`` compute threads run the current shard's batches
between them (:func:`~fct_registry.engines.shards.run_chain` over a thread pool), so every compute thread stays busy
to the last batch of the last shard, however many shards there are; a writer thread encodes, hashes, writes and
fsyncs the finished shards in order (:func:`~fct_registry.engines.shards.store_shard`). pyarrow, blake3 and ONNX
Runtime release the GIL. At most 2 shards are read ahead, 1 computed and 3 wait for or are in the writer: memory is
bounded by 6 shards, flat in the set's size. The sessions are shared (ONNX Runtime allows concurrent ``run`` calls
on one session); with several compute threads each call gets the thread's share of the cores
(:func:`session_threads`), so the threads compute side by side instead of queueing for one pool.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from fct_registry.engines.shards import (
    ShardJob,
    ShardPlan,
    ShardResult,
    load_sessions,
    read_plan,
    run_chain,
    store_shard,
)
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
    """Write every planned shard into ``job.folder``, ``threads`` threads computing each shard; results in plan order.

    Args:
        job: The upgrade's shared settings (chain, batch rows, destination temp dir, source manifest); its
            ``session_threads`` sizes the sessions this loads, shared by the compute threads.
        plans: The output shards, from :func:`~fct_registry.engines.shards.plan_shards`.
        threads: Compute threads (>= 1) that split each shard's batches.
        on_shard: Called in plan order as each shard is finished, e.g. to report progress.

    Returns:
        One result per plan, in plan order.

    Raises:
        EmbeddingSetError, UpgradeError: the first failing shard's error (see ``upgrade_shard``); the shards after
            it are not computed, and the threads finish what they are running before it is raised.
        RuntimeInputError: an ONNX file of the chain no longer loads.
    """
    models = load_sessions(job)
    results: list[ShardResult] = []
    reading: deque[Future[tuple[list[EmbeddingBatch], float]]] = deque()
    writing: deque[Future[ShardResult]] = deque()
    upcoming = iter(plans)

    def read(plan: ShardPlan) -> tuple[list[EmbeddingBatch], float]:
        started = time.perf_counter()
        return read_plan(job, plan), time.perf_counter() - started

    def read_ahead() -> None:  # keeps 2 shards read or being read ahead of the one computed
        while len(reading) < 2 and (plan := next(upcoming, None)) is not None:
            reading.append(reader.submit(read, plan))

    def collect() -> None:
        result = writing.popleft().result()
        results.append(result)
        if on_shard is not None:
            on_shard(result)

    reader = ThreadPoolExecutor(1, thread_name_prefix="fct-upgrade-reader")
    compute = ThreadPoolExecutor(threads, thread_name_prefix="fct-upgrade")
    writer = ThreadPoolExecutor(1, thread_name_prefix="fct-upgrade-writer")
    try:
        read_ahead()
        for plan in plans:
            pieces, read_seconds = reading.popleft().result()
            read_ahead()
            started = time.perf_counter()
            shard = run_chain(job, pieces, models, compute.map)
            seconds = read_seconds + time.perf_counter() - started
            writing.append(writer.submit(store_shard, job, plan, shard, seconds))
            if len(writing) > 2:
                collect()
        while writing:
            collect()
    finally:
        for future in reading:
            future.cancel()
        for pool in (reader, compute, writer):
            pool.shutdown(wait=True)
    return results
