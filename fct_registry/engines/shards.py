"""One output shard of an upgrade: the unit of work every engine runs, in a thread or in a worker on any node.

The driver plans (:func:`plan_shards`: which source rows make output shard k); a worker runs :func:`upgrade_shard`:
it reads those rows while verifying their source shards' sha256s, streams them through the chain of forward
transformations (FCT: Ramanujan et al., CVPR 2022, arXiv 2112.02805, Sec. 3) in batches, checks the output and
writes the shard itself into the destination set's temp dir (temp name + rename,
:func:`~fct_registry.vectors.set_writer.write_shard`). Only the shard's manifest entry travels back. The same plan
and the same batches give the same bytes, whichever engine, process or node runs them.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fct_registry.engines.chain import ChainStep, apply_chain, check_stored_finite
from fct_registry.vectors.batch import EmbeddingBatch, concat_batches
from fct_registry.vectors.embedding_set import EmbeddingSet, EmbeddingSetManifest, ShardInfo, read_shard, table_batch
from fct_registry.vectors.set_writer import check_batch, write_shard

if TYPE_CHECKING:
    from fct_registry.onnx_boundary.runtime import OnnxModel


BATCH_ROWS = 4096
"""Rows per ONNX Runtime call by default. Small enough that a transformation's activations (4096 x 512 float32 = 8 MB
for the project's hidden width) stay in cache: one hop ran at 158,000-172,000 rows/s in 4096-row calls vs 113,000 in
65,536-row calls (Intel Xeon, 2 cores; 1024 and 8192 were slower); the shards stay 65,536 rows."""


@dataclass(frozen=True)
class SourcePiece:
    """Rows ``start:stop`` of one source shard (``path``, manifest entry ``shard``, verified when read)."""

    path: str
    shard: ShardInfo
    start: int
    stop: int


@dataclass(frozen=True)
class ShardPlan:
    """Output shard ``index`` (file ``part-<index>.parquet``): the source rows it is made of, in row order."""

    index: int
    pieces: tuple[SourcePiece, ...]

    @property
    def file(self) -> str:
        return f"part-{self.index:05d}.parquet"

    @property
    def rows(self) -> int:
        return sum(piece.stop - piece.start for piece in self.pieces)


@dataclass(frozen=True)
class ShardJob:
    """What every shard of one upgrade shares.

    Attributes:
        steps: The validated chain, in order.
        batch_rows: Rows per batch through ONNX Runtime.
        folder: The destination set's temp dir (from ``prepare_set``), seen by every worker.
        source: The source set's manifest (widths, optional columns, ``normalized``).
        source_path: The source set's folder, named in errors.
        session_threads: Intra-op threads of each worker's ONNX Runtime sessions, which then do not spin while
            idle (several run at once: see :func:`load_sessions`); None: ONNX Runtime's default, one per core.
    """

    steps: tuple[ChainStep, ...]
    batch_rows: int
    folder: str
    source: EmbeddingSetManifest
    source_path: str
    session_threads: int | None = None


def load_sessions(job: ShardJob) -> list[OnnxModel]:
    """One ONNX Runtime session per step of ``job``, with ``job.session_threads`` intra-op threads.

    A worker that shares its cores with other workers (the local engine's threads, Ray tasks on one node) gets
    its share of them and no spinning: an idle session's spinning threads would burn the cores the others compute,
    read and write on (on 2 cores, 2 engine threads, list-column shards: 81,798 rows/s with 1-thread sessions vs
    70,643 with the default ones, side by side in ``bench/upgrade_local_loop.py`` before issue 13's other changes).

    Raises:
        RuntimeInputError: an ONNX file does not load.
    """
    from fct_registry.onnx_boundary.runtime import OnnxModel

    threads = job.session_threads
    return [OnnxModel(step.onnx_path, intra_op_threads=threads, spinning=threads is None) for step in job.steps]


@dataclass(frozen=True)
class ShardResult:
    """What a worker reports for one written shard: its manifest entry, the bytes it wrote, the output width, whether
    it carries the ``uncertainty`` column, and where and how long it ran (``node``: the host name, or the Ray node
    id; ``pid``: the process; ``seconds``: wall time of read, compute and write; for benchmarks and tests)."""

    info: ShardInfo
    size: int
    dim: int
    uncertainty: bool
    node: str
    pid: int
    seconds: float


def plan_shards(source: EmbeddingSet, shard_rows: int) -> list[ShardPlan]:
    """Cut the source's rows, in order, into output shards of ``shard_rows`` rows (the last may be shorter).

    Output shard k holds global rows ``[k * shard_rows, (k + 1) * shard_rows)``: exactly the shards a single
    streaming writer would cut. When the source's shards have ``shard_rows`` rows each, shard k reads source shard
    k only.
    """
    plans, pieces, filled = [], [], 0
    for path, shard in zip(source.shard_paths, source.manifest.shards, strict=True):
        start = 0
        while start < shard.rows:
            take = min(shard.rows - start, shard_rows - filled)
            pieces.append(SourcePiece(str(path), shard, start, start + take))
            start, filled = start + take, filled + take
            if filled == shard_rows:
                plans.append(ShardPlan(len(plans), tuple(pieces)))
                pieces, filled = [], 0
    if pieces:
        plans.append(ShardPlan(len(plans), tuple(pieces)))
    return plans


def upgrade_shard(job: ShardJob, plan: ShardPlan, models: Sequence[OnnxModel]) -> ShardResult:
    """Read, upgrade, check and write one output shard: :func:`compute_shard`, then :func:`store_shard`.

    Args:
        job: The upgrade's shared settings.
        plan: The shard: its source pieces (embeddings (n, d) float32 of ``job.steps[0].source``).
        models: One loaded session per step of ``job.steps``.

    Returns:
        The shard's result; its file (embeddings (rows, d_new) float32, ids, labels and side-info as stored,
        ``uncertainty`` (rows,) float32 iff the last step outputs one) is in ``job.folder``.

    Raises:
        EmbeddingSetError, UpgradeError: as :func:`compute_shard` and :func:`store_shard`.
    """
    shard, seconds = compute_shard(job, plan, models)
    return store_shard(job, plan, shard, seconds)


def compute_shard(job: ShardJob, plan: ShardPlan, models: Sequence[OnnxModel]) -> tuple[EmbeddingBatch, float]:
    """Read one output shard's source rows (checksums verified) and run them through the chain, ``job.batch_rows``
    rows per ONNX Runtime call, into one preallocated output (no concatenation of batches).

    Returns:
        The upgraded rows (embeddings (rows, d_new) float32, ids, labels and side-info as stored, ``uncertainty``
        (rows,) float32 iff the last step outputs one), and the seconds it took.

    Raises:
        EmbeddingSetError: a source shard is unreadable or fails its checksum/row check.
        UpgradeError: the source stores NaN/inf, or a step outputs NaN/inf (step and first bad item_id named).
    """
    started, steps, parts = time.perf_counter(), list(job.steps), []
    last = models[-1]
    for piece in plan.pieces:
        rows = table_batch(read_shard(piece.path, piece.shard).slice(piece.start, piece.stop - piece.start),
                           job.source, copy=False)  # views of the shard's Arrow buffers
        check_stored_finite(rows, Path(job.source_path))
        upgraded = np.empty((len(rows), last.output_dim), dtype=np.float32)
        sigma = np.empty(len(rows), dtype=np.float32) if last.has_uncertainty else None
        for start in range(0, len(rows), job.batch_rows):
            part = slice(start, start + job.batch_rows)
            side = None if rows.side_info is None else rows.side_info[part]
            upgraded[part], part_sigma = apply_chain(models, steps, rows.embeddings[part], side, ids=rows.ids[part])
            if sigma is not None:
                sigma[part] = part_sigma
        parts.append(EmbeddingBatch(rows.ids, rows.labels, upgraded, rows.side_info, model=steps[-1].target,
                                    uncertainty=sigma))
    shard = parts[0] if len(parts) == 1 else concat_batches(parts)
    return shard, time.perf_counter() - started


def store_shard(job: ShardJob, plan: ShardPlan, shard: EmbeddingBatch, seconds: float = 0.0) -> ShardResult:
    """Check ``shard`` (from :func:`compute_shard`) and write it as ``plan.file`` into ``job.folder``.

    Args:
        seconds: Time already spent on the shard (its compute), added to the result's ``seconds``.

    Raises:
        EmbeddingSetError: the source is normalized and an output is not a unit vector; NaN/inf in a column.
    """
    started = time.perf_counter()
    check_batch(shard, shard, job.source.normalized)
    info = write_shard(job.folder, plan.file, shard)
    size = os.stat(Path(job.folder) / plan.file).st_size
    return ShardResult(info, size, shard.embeddings.shape[1], shard.uncertainty is not None, socket.gethostname(),
                       os.getpid(), seconds + time.perf_counter() - started)
