"""One output shard of an upgrade: the unit of work every engine runs, in a thread or in a worker on any node.

The driver plans (:func:`plan_shards`: which source rows make output shard k); a worker runs :func:`upgrade_shard`:
it reads those rows while verifying their source shards' checksums, streams them through the chain of forward
transformations (FCT: Ramanujan et al., CVPR 2022, arXiv 2112.02805, Sec. 3) in batches, checks the output and
writes the shard itself into the destination set's temp dir (temp name + rename,
:func:`~fct_registry.vectors.set_writer.write_shard`). Only the shard's manifest entry travels back. The same plan
and the same batches give the same bytes, whichever engine, process or node runs them.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
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


def read_plan(job: ShardJob, plan: ShardPlan) -> list[EmbeddingBatch]:
    """Read one output shard's source rows, checksums verified, one batch per source piece.

    Returns:
        Read-only views of the source shards' Arrow buffers (embeddings (n, d) float32 of ``job.steps[0].source``,
        ids, labels, side-info as stored), in row order.

    Raises:
        EmbeddingSetError: a source shard is unreadable or fails its checksum/row check.
        UpgradeError: the source stores NaN/inf (first bad item_id named).
    """
    pieces = []
    for piece in plan.pieces:
        rows = table_batch(read_shard(piece.path, piece.shard).slice(piece.start, piece.stop - piece.start),
                           job.source, copy=False)
        check_stored_finite(rows, Path(job.source_path))
        pieces.append(rows)
    return pieces


def run_chain(job: ShardJob, pieces: Sequence[EmbeddingBatch], models: Sequence[OnnxModel],
              map_batches: Callable[[Callable[[int], None], range], Iterable[None]] = map) -> EmbeddingBatch:
    """Run one shard's rows (from :func:`read_plan`) through the chain, ``job.batch_rows`` rows per ONNX Runtime
    call, into one preallocated output (no concatenation of batches).

    Args:
        map_batches: Runs a function over the batch indexes, like the built-in ``map`` (the default: one after
            another) or a thread pool's ``map`` (batches side by side; each writes its own rows of the output).

    Returns:
        The upgraded rows (embeddings (rows, d_new) float32, ids, labels and side-info as read, ``uncertainty``
        (rows,) float32 iff the last step outputs one).

    Raises:
        UpgradeError: a step outputs NaN/inf (step and first bad item_id of the first failing batch named).
    """
    steps, last = list(job.steps), models[-1]
    offsets = np.cumsum([0, *(len(piece) for piece in pieces)])
    upgraded = np.empty((offsets[-1], last.output_dim), dtype=np.float32)
    sigma = np.empty(offsets[-1], dtype=np.float32) if last.has_uncertainty else None
    batches = [(k, start) for k, piece in enumerate(pieces) for start in range(0, len(piece), job.batch_rows)]

    def run_batch(index: int) -> None:  # batches never span two pieces: the same bytes however the pieces fall
        k, start = batches[index]
        rows, part = pieces[k], slice(start, start + job.batch_rows)
        out = slice(offsets[k] + start, offsets[k] + min(start + job.batch_rows, len(rows)))
        side = None if rows.side_info is None else rows.side_info[part]
        upgraded[out], part_sigma = apply_chain(models, steps, rows.embeddings[part], side, ids=rows.ids[part])
        if sigma is not None:
            sigma[out] = part_sigma

    for _ in map_batches(run_batch, range(len(batches))):
        pass
    rows = pieces[0] if len(pieces) == 1 else concat_batches(pieces)
    return EmbeddingBatch(rows.ids, rows.labels, upgraded, rows.side_info, model=steps[-1].target,
                          uncertainty=sigma)


def compute_shard(job: ShardJob, plan: ShardPlan, models: Sequence[OnnxModel]) -> tuple[EmbeddingBatch, float]:
    """:func:`read_plan`, then :func:`run_chain` one batch after another; returns the upgraded rows and the seconds
    it took. Raises as those two."""
    started = time.perf_counter()
    shard = run_chain(job, read_plan(job, plan), models)
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
