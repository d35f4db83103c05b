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

from fct_registry.engines.chain import ChainStep, apply_chain, check_stored_finite
from fct_registry.vectors.batch import EmbeddingBatch, concat_batches
from fct_registry.vectors.embedding_set import EmbeddingSet, EmbeddingSetManifest, ShardInfo, read_shard, table_batch
from fct_registry.vectors.set_writer import check_batch, write_shard

if TYPE_CHECKING:
    from fct_registry.onnx_boundary.runtime import OnnxModel


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
    """

    steps: tuple[ChainStep, ...]
    batch_rows: int
    folder: str
    source: EmbeddingSetManifest
    source_path: str


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
    """Read, upgrade, check and write one output shard.

    Args:
        job: The upgrade's shared settings.
        plan: The shard: its source pieces (embeddings (n, d) float32 of ``job.steps[0].source``).
        models: One loaded session per step of ``job.steps``.

    Returns:
        The shard's result; its file (embeddings (rows, d_new) float32, ids, labels and side-info as stored,
        ``uncertainty`` (rows,) float32 iff the last step outputs one) is in ``job.folder``.

    Raises:
        EmbeddingSetError: a source shard is unreadable or fails its sha256/row check; the source is normalized
            and an output is not a unit vector.
        UpgradeError: the source stores NaN/inf, or a step outputs NaN/inf (step and first bad item_id named).
    """
    started, steps, outputs = time.perf_counter(), list(job.steps), []
    for piece in plan.pieces:
        table = read_shard(piece.path, piece.shard).slice(piece.start, piece.stop - piece.start)
        for offset in range(0, table.num_rows, job.batch_rows):
            batch = table_batch(table.slice(offset, job.batch_rows), job.source, copy=False)
            check_stored_finite(batch, Path(job.source_path))
            upgraded, sigma = apply_chain(models, steps, batch.embeddings, batch.side_info, ids=batch.ids)
            outputs.append(EmbeddingBatch(batch.ids, batch.labels, upgraded, batch.side_info, model=steps[-1].target,
                                          uncertainty=sigma))
        del table
    shard = outputs[0] if len(outputs) == 1 else concat_batches(outputs)
    outputs.clear()
    check_batch(shard, shard, job.source.normalized)
    info = write_shard(job.folder, plan.file, shard)
    size = os.stat(Path(job.folder) / plan.file).st_size
    return ShardResult(info, size, shard.embeddings.shape[1], shard.uncertainty is not None, socket.gethostname(),
                       os.getpid(), time.perf_counter() - started)
