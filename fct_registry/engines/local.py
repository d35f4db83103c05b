"""The local upgrade engine: a plain pyarrow + ONNX Runtime loop over the set's shards, in this process.

The fastest engine on one machine (see the README's measurements); memory is bounded by one batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from fct_registry.engines.chain import ChainStep, apply_chain, check_stored_finite
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import EmbeddingSet

if TYPE_CHECKING:
    from fct_registry.onnx_boundary.runtime import OnnxModel


def iter_upgraded_local(source: EmbeddingSet, steps: Sequence[ChainStep], models: Sequence[OnnxModel],
                batch_rows: int) -> Iterator[EmbeddingBatch]:
    """Yield the set upgraded through a validated chain, batch by batch in row order.

    Args:
        source: The stored set (embeddings (count, d) float32 of ``steps[0].source``).
        steps: The chain, validated against ``source`` by :func:`~fct_registry.engines.chain.validate_chain`.
        models: The loaded sessions it returned, one per step.
        batch_rows: Rows per batch.

    Yields:
        EmbeddingBatch: ids, labels and side_info as stored; embeddings (n, d_new) float32 of the last target,
        which the batch carries as its ``model``; uncertainty (n,) float32 when the last step outputs one.

    Raises:
        UpgradeError: the set stores NaN/inf, or a step outputs NaN/inf (first bad item_id named).
    """
    for batch in source.iter_batches(batch_rows):
        check_stored_finite(batch, source.path)
        upgraded, sigma = apply_chain(models, steps, batch.embeddings, batch.side_info, ids=batch.ids)
        yield EmbeddingBatch(batch.ids, batch.labels, upgraded, batch.side_info, model=steps[-1].target,
                             uncertainty=sigma)
