"""Ray engine of the upgrade: one Ray task per output shard; each worker writes its shard to the destination itself.

The driver only plans (``plan_shards``), submits one task per output shard (at most ``workers`` at once, each
asking for ``worker_cpus`` CPUs and ``worker_memory`` bytes, spread over the nodes) and collects each shard's
manifest entry (row count, sha256, size): no row of the set passes through it. A task reads its source rows
(verifying their sha256s), runs ONNX Runtime and writes its shard under a temp name, renamed when complete
(:func:`~fct_registry.engines.shards.upgrade_shard`). A worker or node that dies mid-shard leaves at most a temp
file; Ray retries the task (``max_retries``), which rewrites the shard. Errors of the upgrade itself (NaN output, a
corrupted source shard) are returned, not raised, so Ray does not retry them and the driver raises them with their
own type and message. Only this module imports ray.

On a cluster, every node must be able to import ``fct_registry`` and see the source shards, the ONNX files and the
destination's parent folder at the same paths (shared storage, e.g. NFS). Plain tasks, not Ray Data: a shard is a
natural task, needs no shuffle, and measured faster (bench/results/upgrade_cluster.md).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace

import ray

from fct_registry.core.errors import FctError, UpgradeError
from fct_registry.engines.shards import ShardJob, ShardPlan, ShardResult, load_sessions, upgrade_shard
from fct_registry.onnx_boundary.runtime import OnnxModel

LOCAL_CPUS = 2
"""CPUs of the local Ray started when no address is given."""
MAX_RETRIES = 3
"""Times a shard's task is re-run after its worker process or node died."""

_SESSIONS: dict[tuple[object, ...], list[OnnxModel]] = {}
"""Sessions loaded by this worker process, by the chain's ONNX paths and threads: loaded once, reused by its next
tasks. Each has as many intra-op threads as the task asks CPUs (``job.session_threads``), so tasks sharing a node
do not oversubscribe its cores."""


def _models(job: ShardJob) -> list[OnnxModel]:
    key = (job.session_threads, *(str(step.onnx_path) for step in job.steps))
    if key not in _SESSIONS:
        _SESSIONS.clear()
        _SESSIONS[key] = load_sessions(job)
    return _SESSIONS[key]


@ray.remote
def _shard_task(job: ShardJob, plan: ShardPlan) -> ShardResult | FctError:
    """Upgrade and write one shard on a worker; an upgrade error is returned (not retried), a crash is retried."""
    try:
        result = upgrade_shard(job, plan, _models(job))
    except FctError as exc:
        return exc
    return replace(result, node=ray.get_runtime_context().get_node_id())


def _start_ray(address: str | None) -> bool:
    """Connect to Ray unless already connected; True when this call started the connection."""
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(num_cpus=LOCAL_CPUS, include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    return True


def upgrade_shards_ray(job: ShardJob, plans: Sequence[ShardPlan], address: str | None = None,
                       workers: int | None = None, worker_cpus: float = 1.0, worker_memory: int | None = None,
                       max_retries: int = MAX_RETRIES, on_shard: Callable[[ShardResult], None] | None = None
                       ) -> list[ShardResult]:
    """Write every planned shard into ``job.folder`` with Ray tasks; results in plan order.

    Args:
        job: The upgrade's shared settings; ``job.folder`` must be visible to every node.
        plans: The output shards, from :func:`~fct_registry.engines.shards.plan_shards`.
        address: Ray cluster address (``host:port``); None starts a local Ray with 2 CPUs. A Ray already
            initialised in this process is reused either way; Ray is shut down at the end only if this call
            started it.
        workers: Shard tasks running at once; None: as many as the cluster's resources allow (all tasks are
            submitted; an autoscaling cluster grows to its configured bounds).
        worker_cpus: CPUs each task asks for (fractions allowed).
        worker_memory: Bytes of memory each task asks for (Ray's ``memory`` resource; None: no reservation).
        max_retries: Re-runs of a task whose worker process or node died.
        on_shard: Called as each shard is finished (in completion order), e.g. to report progress.

    Returns:
        One result per plan, in plan order.

    Raises:
        EmbeddingSetError, UpgradeError: a shard's upgrade error, with its own message; or (UpgradeError) a task
            that failed more than ``max_retries`` times (its worker or node died), naming the shard and Ray's
            error. The remaining tasks are cancelled first.
    """
    started = _start_ray(address)
    waiting, running, results = deque(plans), {}, {}
    try:
        task = _shard_task.options(num_cpus=worker_cpus, memory=worker_memory, max_retries=max_retries,
                                   retry_exceptions=False, scheduling_strategy="SPREAD")
        job_ref = ray.put(job)
        while waiting or running:
            while waiting and (workers is None or len(running) < workers):
                plan = waiting.popleft()
                running[task.remote(job_ref, plan)] = plan
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                plan = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    message = str(exc).strip().splitlines()[-1] if str(exc).strip() else "no message"
                    raise UpgradeError(f"shard {plan.file}: its Ray task failed after {max_retries} retries "
                                       f"({type(exc).__name__}: {message})") from exc
                if isinstance(result, FctError):
                    raise result
                results[plan.index] = result
                if on_shard is not None:
                    on_shard(result)
        return [results[plan.index] for plan in plans]
    except BaseException:
        for ref in running:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()
