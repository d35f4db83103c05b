"""Upgrade a stored embedding set to a newer model by running a chain of forward transformations.

Each step is one forward transformation h(old_embedding, side_info) -> embedding (FCT: Ramanujan et al., CVPR
2022, arXiv 2112.02805, Sec. 3), exported to ONNX (see ``fct_registry.onnx_boundary.export``). The set's stored
vectors are streamed through every step in order with ONNX Runtime; no image is read again. The side-info column is
fed to every step that takes it and is copied unchanged into the new set, so a later upgrade can use it again.

This module is the driver: it validates, plans the output shards (``engines.shards``), has an engine write them into
the new set's temp dir, checks what the engine reports and commits the manifest. Engines: ``"local"`` (default;
threads of this process, fastest on one machine, see ``fct_registry.engines.local``) and ``"ray"`` (one Ray task per
shard on a cluster, each writing its shard itself, see ``fct_registry.engines.ray_engine``). Both run the same
shard function, so they write byte-identical sets; the engines never import each other.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fct_registry.core.errors import EmbeddingSetError, UpgradeError
from fct_registry.engines.chain import ChainStep, Progress, validate_chain
from fct_registry.engines.local import DEFAULT_THREADS, session_threads, upgrade_shards_local
from fct_registry.engines.shards import BATCH_ROWS, ShardJob, ShardPlan, ShardResult, plan_shards
from fct_registry.vectors.embedding_set import EmbeddingSet, EmbeddingSetManifest
from fct_registry.vectors.set_writer import commit_set, prepare_set

if TYPE_CHECKING:
    from fct_registry.onnx_boundary.runtime import OnnxModel


def check_upgrade(source: EmbeddingSet, steps: Sequence[ChainStep], dest_path: str | os.PathLike[str],
                  overwrite: bool = False, verify_shards: bool = True) -> list[OnnxModel]:
    """Everything that can be checked before an upgrade writes: the source's shards, the destination, the chain.

    Args:
        source: The opened source set.
        steps: The chain in application order.
        dest_path: Where the upgraded set would be written.
        overwrite: Whether an existing set at ``dest_path`` may be replaced.
        verify_shards: Verify every shard's sha256 and row count here (reads the whole set). An upgrade verifies
            each shard anyway as it reads it, so a real run passes False; a dry run, which reads nothing else,
            True.

    Returns:
        The loaded ONNX Runtime sessions of the chain, one per step (hand them to :func:`upgrade_set`).

    Raises:
        EmbeddingSetError: ``verify_shards`` and a shard is missing or does not match the manifest.
        UpgradeError: ``dest_path`` is (inside) the source, or exists without ``overwrite``; any
            :func:`~fct_registry.engines.chain.validate_chain` problem.
    """
    if verify_shards:
        source.verify()
    dest = Path(dest_path)
    if dest.resolve() == source.path.resolve() or source.path.resolve() in dest.resolve().parents:
        raise UpgradeError(f"destination {dest} is or lies inside the source set {source.path}; choose a new path")
    if dest.exists() and not overwrite:
        raise UpgradeError(f"destination {dest} already exists; pass overwrite=True to replace it")
    return validate_chain(steps, source)


def upgrade_set(source: EmbeddingSet | str | os.PathLike[str], steps: Sequence[ChainStep],
                dest_path: str | os.PathLike[str], batch_rows: int = BATCH_ROWS,
                engine: Literal["local", "ray"] = "local", progress: Progress | None = None,
                overwrite: bool = False, address: str | None = None, workers: int | None = None,
                worker_cpus: float | None = None, worker_memory: int | None = None,
                models: Sequence[OnnxModel] | None = None, extra_files: Mapping[str, bytes] | None = None,
                on_shard: Callable[[ShardResult], None] | None = None) -> EmbeddingSet:
    """Upgrade the ``source`` set through ``steps`` into a new set at ``dest_path``, shard by shard.

    Unless ``models`` says :func:`check_upgrade` already ran, it runs first (chain validated, destination checked).
    The output is cut into the source's shard size; each output shard is read (its source shards' sha256s verified
    on the way), pushed through every step in batches of at most ``batch_rows`` rows and written by the engine
    into a temp dir beside ``dest_path`` (memory flat in the set's size); the driver checks every shard's report
    (rows as planned, file present with the reported size), writes the manifest and renames the dir into place:
    killed at any moment, the source is untouched, no set appears at ``dest_path`` and a re-run completes. The
    new set keeps the source's item ids, labels, row order, side-info column and model, metric, normalisation and
    shard size; its model is the last step's target and its lineage is the source's plus one line per step.

    Args:
        source: The stored set, opened or as a path (embeddings (count, d) float32 of ``steps[0].source``).
        steps: The chain in application order (e.g. planned by ``chains.plan_chain``).
        dest_path: Where the upgraded set (embeddings (count, d_new) float32) is written; for the Ray engine, a
            path every node sees.
        batch_rows: Rows per batch fed to ONNX Runtime (default ``shards.BATCH_ROWS``).
        engine: ``"local"`` (threads of this process) or ``"ray"`` (one Ray task per output shard).
        progress: Optional ``progress(rows_done, rows_total)`` callback, called after each shard is written.
        overwrite: Replace an existing set at ``dest_path`` (swapped out only once the new one is complete).
        address: Ray engine only: cluster address; None starts a local Ray (2 CPUs) unless one is running.
        workers: Compute threads of this process splitting each shard's batches (local; default 2) or Ray tasks at
            once (ray; default: as many as the cluster's resources allow).
        worker_cpus: Ray engine only: CPUs each task asks for (default 1; fractions allowed).
        worker_memory: Ray engine only: bytes of memory each task asks for (default: no reservation).
        models: The sessions returned by :func:`check_upgrade` for this source, chain and destination; None
            runs the checks here. The engines load their own sessions, sized for their threads.
        extra_files: Sidecar files written into the new set with it (file name -> bytes), e.g. a record of the
            upgrade that made it.
        on_shard: Optional callback given each shard's report as it is written (file, rows, sha256, bytes, the
            node and process that wrote it, seconds), e.g. for benchmarks.

    Returns:
        The written set.

    Raises:
        UpgradeError: bad ``batch_rows``, ``engine``, ``workers``, ``worker_cpus`` or ``worker_memory`` (or a Ray
            option with the local engine); ``dest_path`` is (inside) the source, or exists without ``overwrite``;
            any :func:`validate_chain` problem; stored or produced NaN/inf; a Ray task that failed more than its
            retries. Nothing is written.
        EmbeddingSetError: the source set is missing or fails verification; the source is normalized but the
            chain's outputs are not unit vectors; a shard's report does not match its plan or its file.
    """
    check_engine_options(batch_rows, engine, workers, worker_cpus, worker_memory)
    if not isinstance(source, EmbeddingSet):
        source = EmbeddingSet.open(source, verify=False)
    if models is None:
        models = check_upgrade(source, steps, dest_path, overwrite, verify_shards=False)
    m = source.manifest
    plans = plan_shards(EmbeddingSet(source.path.resolve(), m), max(s.rows for s in m.shards))
    tmp = prepare_set(dest_path, overwrite, extra_files)
    try:  # absolute paths: a worker on another node has another working directory
        threads = session_threads(workers or DEFAULT_THREADS) if engine == "local" else max(1, int(worker_cpus or 1))
        job = ShardJob(tuple(s.model_copy(update={"onnx_path": s.onnx_path.resolve()}) for s in steps), batch_rows,
                       str(tmp.resolve()), m, str(source.path), threads)
        done = []

        def report(result: ShardResult) -> None:
            done.append(result.info.rows)
            if on_shard is not None:
                on_shard(result)
            if progress is not None:
                progress(sum(done), m.count)

        if engine == "local":
            results = upgrade_shards_local(job, plans, workers or DEFAULT_THREADS, report)
        else:
            from fct_registry.engines.ray_engine import upgrade_shards_ray

            results = upgrade_shards_ray(job, plans, address, workers, worker_cpus or 1.0, worker_memory,
                                         on_shard=report)
        manifest = EmbeddingSetManifest(
            model=steps[-1].target, side_info_model=m.side_info_model, dim=_checked(results, plans, tmp),
            side_info_dim=m.side_info_dim, count=m.count, metric=m.metric, normalized=m.normalized,
            shards=[r.info for r in results], lineage=[*m.lineage, *(f"upgraded {step}" for step in steps)],
            uncertainty=results[0].uncertainty)
        return commit_set(tmp, dest_path, manifest, extra_files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_engine_options(batch_rows: int, engine: str, workers: int | None, worker_cpus: float | None,
                         worker_memory: int | None) -> None:
    """Refuse bad engine options before anything is read or written.

    Raises:
        UpgradeError: one line naming the bad value and what was expected.
    """
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise UpgradeError(f"batch_rows must be an integer >= 1, got {batch_rows!r}")
    if engine not in ("local", "ray"):
        raise UpgradeError(f"engine must be 'local' or 'ray', got {engine!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise UpgradeError(f"workers must be an integer >= 1, got {workers!r}")
    if worker_cpus is not None and not (isinstance(worker_cpus, int | float) and 0 < worker_cpus < float("inf")):
        raise UpgradeError(f"worker_cpus must be a number > 0, got {worker_cpus!r}")
    if worker_memory is not None and (isinstance(worker_memory, bool) or not isinstance(worker_memory, int)
                                      or worker_memory < 1):
        raise UpgradeError(f"worker_memory must be a number of bytes >= 1, got {worker_memory!r}")
    if engine == "local" and (worker_cpus is not None or worker_memory is not None):
        raise UpgradeError("worker_cpus and worker_memory are Ray resources; they need engine 'ray', got 'local'")


def _checked(results: Sequence[ShardResult], plans: Sequence[ShardPlan], tmp: Path) -> int:
    """Check every shard's report against its plan and its file (metadata only); the output width.

    Raises:
        EmbeddingSetError: a shard is missing, has another name, row count or size than planned or reported, or
            shards disagree on the width or the uncertainty column.
    """
    if len(results) != len(plans):
        raise EmbeddingSetError(f"{len(results)} shards were reported for {len(plans)} planned")
    for result, plan in zip(results, plans, strict=True):
        file = tmp / plan.file
        size = file.stat().st_size if file.is_file() else None
        if (result.info.file, result.info.rows, result.size) != (plan.file, plan.rows, size):
            raise EmbeddingSetError(f"shard {plan.file}: reported {result.info.file} with {result.info.rows} rows "
                                    f"and {result.size} bytes; planned {plan.rows} rows, found {size} bytes")
        if (result.dim, result.uncertainty) != (results[0].dim, results[0].uncertainty):
            raise EmbeddingSetError(f"shard {plan.file} has width {result.dim} and uncertainty "
                                    f"{result.uncertainty}; shard 0 has {results[0].dim} and {results[0].uncertainty}")
    return results[0].dim
