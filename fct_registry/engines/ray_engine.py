"""Ray engine of the upgrade: the set's Parquet shards flow through Ray Data actors running ONNX Runtime.

``ray.data.read_parquet`` reads the shards (blocks follow shard and row order), ``map_batches`` sends them to a
pool of actors that each hold one ONNX Runtime session per chain step, and the driver streams the upgraded
batches back, in source row order, to ``write_embedding_set`` (see ``fct_registry.engines.run.upgrade_set``). Only
this module imports ray.

On a cluster, every worker must be able to import ``fct_registry`` and read the shard files and the ONNX files
at the same paths (shared storage). On one small machine the local engine is faster; Ray is for clusters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import ray

from fct_registry.engines.chain import ChainStep, apply_chain, check_finite
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import EmbeddingSet

ACTOR_CPUS = 0.5  # fractional: two actors with 1 CPU each on a 2-CPU Ray starve the read tasks (hang)
LOCAL_CPUS = 2


def _matrix(table: pa.Table, column: str) -> np.ndarray:
    """Column ``fixed_size_list<float32>[d]`` of ``table`` -> (n, d) float32 C-contiguous array."""
    values = table.column(column).combine_chunks()
    return values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), values.type.list_size)


def _batch_bytes(embedding_set: EmbeddingSet, batch_rows: int) -> int:
    """In-memory bytes of ``batch_rows`` rows (ids, labels, float32 vectors): Ray's read block budget."""
    m = embedding_set.manifest
    return batch_rows * (16 + 4 * (m.dim + (m.side_info_dim or 0)))


def _side_info(table: pa.Table) -> np.ndarray | None:
    return _matrix(table, "side_info") if "side_info" in table.column_names else None


class ChainRunner:
    """Ray Data callable class: one ONNX Runtime session per step, created once per actor.

    Called on pyarrow tables with the set's shard columns; returns the table with ``embedding`` (n, d) replaced
    by the chain's output (n, d_new) float32. NaN/inf is checked by the driver, where the error keeps its type.
    """

    def __init__(self, steps: Sequence[ChainStep]) -> None:
        self.steps = list(steps)
        self.models = [OnnxModel(step.onnx_path) for step in self.steps]

    def __call__(self, table: pa.Table) -> pa.Table:
        out, sigma = apply_chain(self.models, self.steps, _matrix(table, "embedding"), _side_info(table))
        column = pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1)), out.shape[1])
        table = table.set_column(table.schema.get_field_index("embedding"), "embedding", column)
        if sigma is None:
            return table
        if "uncertainty" in table.column_names:
            return table.set_column(table.schema.get_field_index("uncertainty"), "uncertainty", pa.array(sigma))
        return table.append_column("uncertainty", pa.array(sigma))


def _start_ray(address: str | None) -> bool:
    """Connect to Ray unless already connected; True when this call started the connection."""
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(num_cpus=LOCAL_CPUS, include_dashboard=False)
    else:
        ray.init(address=address)
    return True


def iter_upgraded_ray(embedding_set: EmbeddingSet, steps: Sequence[ChainStep], batch_rows: int,
                      address: str | None = None, actors: int = 2) -> Iterator[EmbeddingBatch]:
    """Yield the set upgraded through ``steps`` by Ray Data actors, in the set's row order.

    Args:
        embedding_set: The source set (validated against ``steps`` by the caller).
        steps: The chain, in order.
        batch_rows: Rows per batch sent to an actor and per yielded batch.
        address: Ray cluster address; None starts a local Ray with 2 CPUs. A Ray already initialised in this
            process is reused either way. Ray is shut down at the end only if this call started it.
        actors: Size of the actor pool (each actor asks for 0.5 CPU).

    Yields:
        EmbeddingBatch: ids (n,) int64, labels (n,) int64, embeddings (n, d_new) float32 of the last target,
        side_info (n, d_side) float32 copied from the source (or None), model = the last step's target.

    Raises:
        UpgradeError: the chain produced NaN or inf (first bad item_id named).
    """
    started = _start_ray(address)
    try:
        ds = ray.data.read_parquet([str(p) for p in embedding_set.shard_paths])
        ds.context.execution_options.preserve_order = True  # this dataset's own copy of the context
        ds.context.enable_progress_bars = False
        ds.context.target_max_block_size = _batch_bytes(embedding_set, batch_rows)  # spread reads over actors
        ds = ds.map_batches(ChainRunner, fn_constructor_kwargs={"steps": list(steps)}, batch_size=batch_rows,
                            batch_format="pyarrow", num_cpus=ACTOR_CPUS,
                            compute=ray.data.ActorPoolStrategy(size=actors))
        for table in ds.iter_batches(batch_size=batch_rows, batch_format="pyarrow"):
            ids = table.column("item_id").to_numpy()
            embeddings = _matrix(table, "embedding")
            check_finite(embeddings, ids, f"chain {steps[0].source} -> {steps[-1].target} (Ray engine)")
            sigma = table.column("uncertainty").to_numpy() if "uncertainty" in table.column_names else None
            yield EmbeddingBatch(ids, table.column("label").to_numpy(), embeddings, _side_info(table),
                                 model=steps[-1].target, uncertainty=sigma)
    finally:
        if started:
            ray.shutdown()
