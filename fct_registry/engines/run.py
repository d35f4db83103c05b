"""Upgrade a stored embedding set to a newer model by running a chain of forward transformations.

Each step is one forward transformation h(old_embedding, side_info) -> embedding (FCT: Ramanujan et al., CVPR
2022, arXiv 2112.02805, Sec. 3), exported to ONNX (see ``fct_registry.onnx_boundary.export``). The set's stored
vectors are streamed through every step in order with ONNX Runtime; no image is read again. The side-info column is
fed to every step that takes it and is copied unchanged into the new set, so a later upgrade can use it again.

Engines: ``"local"`` (default; a plain pyarrow + ONNX Runtime loop, fastest on one machine, see
``fct_registry.engines.local``) and ``"ray"`` (Ray Data over the set's Parquet shards, see
``fct_registry.engines.ray_engine``; for clusters). Both yield the same batches; this module validates, picks the
engine and writes the set, so the engines never import each other.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fct_registry.core.errors import UpgradeError
from fct_registry.engines.chain import ChainStep, Progress, validate_chain
from fct_registry.engines.local import iter_upgraded_local
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.set_writer import write_embedding_set

if TYPE_CHECKING:
    from fct_registry.onnx_boundary.runtime import OnnxModel


def check_upgrade(source: EmbeddingSet, steps: Sequence[ChainStep], dest_path: str | os.PathLike[str],
                  overwrite: bool = False) -> list[OnnxModel]:
    """Everything that can be checked before an upgrade writes: the source's shards, the destination, the chain.

    Args:
        source: The opened source set; its shards' sha256s and row counts are verified here.
        steps: The chain in application order.
        dest_path: Where the upgraded set would be written.
        overwrite: Whether an existing set at ``dest_path`` may be replaced.

    Returns:
        The loaded ONNX Runtime sessions of the chain, one per step (hand them to :func:`upgrade_set`).

    Raises:
        EmbeddingSetError: a shard is missing or does not match the manifest.
        UpgradeError: ``dest_path`` is (inside) the source, or exists without ``overwrite``; any
            :func:`~fct_registry.engines.chain.validate_chain` problem.
    """
    source.verify()
    dest = Path(dest_path)
    if dest.resolve() == source.path.resolve() or source.path.resolve() in dest.resolve().parents:
        raise UpgradeError(f"destination {dest} is or lies inside the source set {source.path}; choose a new path")
    if dest.exists() and not overwrite:
        raise UpgradeError(f"destination {dest} already exists; pass overwrite=True to replace it")
    return validate_chain(steps, source)


def upgrade_set(source: EmbeddingSet | str | os.PathLike[str], steps: Sequence[ChainStep],
                dest_path: str | os.PathLike[str], batch_rows: int = 65536,
                engine: Literal["local", "ray"] = "local", progress: Progress | None = None,
                overwrite: bool = False, address: str | None = None, ray_actors: int = 2,
                models: Sequence[OnnxModel] | None = None, extra_files: Mapping[str, bytes] | None = None
                ) -> EmbeddingSet:
    """Upgrade the ``source`` set through ``steps`` into a new set at ``dest_path``, streaming.

    Unless ``models`` says :func:`check_upgrade` already ran, it runs first (shards verified, chain validated).
    Then batches of at most ``batch_rows`` items
    flow through every step (memory flat in the set's size) into :func:`write_embedding_set`, which writes a temp
    dir beside ``dest_path`` and renames it into place: killed at any moment, the source is untouched, no set
    appears at ``dest_path`` and a re-run completes. The new set keeps the source's item ids, labels, row order,
    side-info column and model, metric, normalisation and shard size; its model is the last step's target and
    its lineage is the source's plus one line per step.

    Args:
        source: The stored set, opened or as a path (embeddings (count, d) float32 of ``steps[0].source``).
        steps: The chain in application order (e.g. planned by ``chains.plan_chain``).
        dest_path: Where the upgraded set (embeddings (count, d_new) float32) is written.
        batch_rows: Rows per batch fed to ONNX Runtime (and per Ray batch).
        engine: ``"local"`` (pyarrow + ONNX Runtime in this process) or ``"ray"`` (Ray Data actors).
        progress: Optional ``progress(rows_done, rows_total)`` callback, e.g. to drive a progress bar.
        overwrite: Replace an existing set at ``dest_path`` (swapped out only once the new one is complete).
        address: Ray engine only: cluster address; None starts a local Ray (2 CPUs) unless one is running.
        ray_actors: Ray engine only: number of actors, each holding ONNX Runtime sessions of every step.
        models: The sessions returned by :func:`check_upgrade` for this source, chain and destination; None
            runs the checks here.
        extra_files: Sidecar files written into the new set with it (file name -> bytes), e.g. a record of the
            upgrade that made it.

    Returns:
        The written set.

    Raises:
        UpgradeError: bad ``batch_rows`` or ``engine``; ``dest_path`` is (inside) the source, or exists without
            ``overwrite``; any :func:`validate_chain` problem; a step outputs NaN/inf. Nothing is written.
        EmbeddingSetError: the source set is missing or fails verification; the source is normalized but the
            chain's outputs are not unit vectors.
    """
    if batch_rows < 1:
        raise UpgradeError(f"batch_rows must be >= 1, got {batch_rows}")
    if engine not in ("local", "ray"):
        raise UpgradeError(f"engine must be 'local' or 'ray', got {engine!r}")
    if not isinstance(source, EmbeddingSet):
        source = EmbeddingSet.open(source, verify=False)
    if models is None:
        models = check_upgrade(source, steps, dest_path, overwrite)
    if engine == "local":
        batches = iter_upgraded_local(source, steps, models, batch_rows)
    else:
        from fct_registry.engines.ray_engine import iter_upgraded_ray

        batches = iter_upgraded_ray(source, steps, batch_rows, address=address, actors=ray_actors)
    m = source.manifest
    with closing(batches):  # stops the Ray engine's Ray even when the writer fails early
        return write_embedding_set(
            dest_path, _reporting(batches, m.count, progress), model=steps[-1].target,
            side_info_model=m.side_info_model, metric=m.metric, normalized=m.normalized,
            lineage=[*m.lineage, *(f"upgraded {step}" for step in steps)],
            shard_rows=max(s.rows for s in m.shards), overwrite=overwrite, extra_files=extra_files)


def _reporting(batches: Iterable[EmbeddingBatch], total: int, progress: Progress | None) -> Iterator[EmbeddingBatch]:
    done = 0
    for batch in batches:
        yield batch
        done += len(batch)
        if progress is not None:
            progress(done, total)

