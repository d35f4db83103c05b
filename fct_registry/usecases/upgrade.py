"""Use case of ``fct-registry upgrade``: plan the chain of registered transformations and run it over a set.

Upgrades follow FCT (Ramanujan et al., CVPR 2022, arXiv 2112.02805): a stored gallery is brought to a newer backbone
by a chain of registered forward transformations, with no image read again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fct_registry.core.errors import RegistryError
from fct_registry.engines.chain import ChainStep, Progress
from fct_registry.engines.run import check_engine_options, check_upgrade, upgrade_set
from fct_registry.engines.shards import BATCH_ROWS
from fct_registry.registry.chains import Edge, plan_chain
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import RegisteredVersion, file_sha256
from fct_registry.usecases.project import SOURCES_FILE
from fct_registry.vectors.embedding_set import MANIFEST, EmbeddingSet
from fct_registry.vectors.flips import set_flips


def plan_upgrade(registry: ModelRegistry, embedding_set: EmbeddingSet, target: RegisteredVersion) -> list[ChainStep]:
    """Plan the chain of registered transformations from the set's backbone to ``target``.

    Uses :func:`chains.plan_chain` (fewest hops, then best minimum link mAP) over the transformations whose
    side-info model the set stores, and fetches each transformation's ONNX file from the registry.

    Args:
        registry: The model registry.
        embedding_set: The stored set (its manifest is read; embeddings (count, d) float32 of its model).
        target: The backbone version to upgrade to.

    Returns:
        One :class:`ChainStep` per hop, in application order.

    Raises:
        RegistryError: the set's model is not a registered backbone, or an ONNX artifact is corrupted.
        ChainError: the set is already at or beyond ``target``, no chain exists, or every chain needs
            side-info the set does not store.
    """
    manifest = embedding_set.manifest
    try:
        registry.find("backbone", manifest.model)
    except RegistryError as exc:
        raise RegistryError(f"set {embedding_set.path}: {exc}") from exc
    side_info = [manifest.side_info_model] if manifest.side_info_model is not None else []
    edges = plan_chain(manifest.model, target.ref, registry.transformation_edges(), available_side_info=side_info)
    return [_chain_step(registry, edge) for edge in edges]


def _chain_step(registry: ModelRegistry, edge: Edge) -> ChainStep:
    name, _, number = edge.transformation.rpartition("/")
    version = registry.get("transformation", number)
    return ChainStep(onnx_path=registry.onnx_path(version), source=edge.source, target=edge.target,
                     side_info=edge.side_info, name=f"{name}/{number}")


def default_output(sets_root: str | os.PathLike, source: EmbeddingSet, target: RegisteredVersion) -> Path:
    """``<sets_root>/<source name>@<target label>``; a source name's own ``@label`` suffix is dropped
    (``gallery_v1@v2`` upgraded to v3 -> ``gallery_v1@v3``)."""
    return Path(sets_root) / f"{source.path.name.split('@')[0]}@{target.ref.label}"


PROVENANCE_FILE = "upgrade.json"
"""Sidecar of an upgraded set: the source set's manifest sha256 and model, and the chain (version names and ONNX
sha256s) that made it. A destination holding the same record is the very output a command would write."""


@dataclass(frozen=True)
class UpgradeResult:
    """What :func:`run_upgrade` did.

    Attributes:
        steps: the validated chain, in application order.
        output: the upgraded set (None for a dry run).
        state: ``"written"`` (upgraded now), ``"completed"`` (the destination already held this very upgrade,
            e.g. from a run killed before its record was written; its record is now written if it was missing)
            or ``"planned"`` (dry run: nothing written).
        note: for a dry run, what a real run would do at the destination; else empty.
    """

    steps: list[ChainStep]
    output: EmbeddingSet | None
    state: Literal["written", "completed", "planned"]
    note: str = ""


def run_upgrade(registry: ModelRegistry, source: EmbeddingSet, target: RegisteredVersion,
                dest: str | os.PathLike, engine: Literal["local", "ray"] = "local", address: str | None = None,
                progress: Progress | None = None, dry_run: bool = False, batch_rows: int = BATCH_ROWS,
                on_plan: Callable[[list[ChainStep]], None] | None = None, workers: int | None = None,
                worker_cpus: float | None = None, worker_memory: int | None = None) -> UpgradeResult:
    """Plan, validate and run the upgrade of a stored set to ``target``, and record it as an MLflow run.

    Everything that can be checked before writing is checked first (chain planned, every ONNX file
    loaded and its input widths matched to the set and the previous link, ``dest`` free); a dry run stops
    there (after verifying every shard too) and says what a real run would do at ``dest``. The upgrade then
    streams the set through the chain (see
    :func:`~fct_registry.engines.run.upgrade_set`: memory flat in the set's size, written atomically, with a
    :data:`PROVENANCE_FILE` sidecar) and a run of the ``fct-registry`` experiment records the input set (path,
    model, count, manifest sha256), the chain (transformation versions), the output set and, when the set has
    labels, its negative flip rate against the source (``negative_flips``, ``positive_flips``: queries are each
    set's own stored vectors, since an upgrade reads no image; see :func:`~fct_registry.vectors.flips.set_flips`.
    New-model queries against the upgraded set, as ``fct-registry evaluate`` and the pipeline's upgrade stage use
    them, are :func:`fct_registry.usecases.evaluate.evaluate_gallery` with ``baseline``). A re-run whose
    ``dest`` already holds this very upgrade (same source manifest, same chain; verified) finishes the job: it
    writes the record if none exists and rewrites no vector, so a re-run completes after a kill at any point.

    Args:
        registry: The model registry.
        source: The opened stored set, embeddings (count, d) float32 of a registered backbone; each shard's
            sha256 is verified once, as the upgrade reads it (by a dry run: before it returns).
        target: The backbone version to upgrade to.
        dest: Where the upgraded set, embeddings (count, d_target) float32, is written; must not exist unless
            it already holds this upgrade.
        engine: ``"local"`` (threads of this process) or ``"ray"`` (one Ray task per output shard, each worker
            writing its shard; ``dest`` must be on storage every node sees).
        address: Ray engine only: cluster address; None starts a local Ray.
        progress: Optional ``progress(rows_done, rows_total)`` callback.
        dry_run: Plan and validate only; nothing is written or recorded.
        batch_rows: Rows per batch fed to ONNX Runtime.
        on_plan: Optional callback given the validated steps before any row is processed (e.g. to print them).
        workers: Compute threads splitting each shard's batches (local, default 2) or Ray tasks at once (default:
            as many as the cluster's resources allow).
        worker_cpus: Ray engine only: CPUs per task (default 1).
        worker_memory: Ray engine only: bytes of memory per task (default: no reservation).

    Raises:
        EmbeddingSetError: the set is missing or fails verification; ``dest`` holds this upgrade but fails
            verification.
        RegistryError: unknown set model or a corrupted ONNX artifact.
        ChainError: already at or beyond ``target``, no chain, or side-info the set lacks.
        UpgradeError: a bad engine option (``batch_rows``, ``engine``, ``workers``, ``worker_*``); ``dest`` exists
            with other content (not for a dry run), an ONNX file does not load, link
            widths differ, or NaN/inf vectors.
    """
    check_engine_options(batch_rows, engine, workers, worker_cpus, worker_memory)
    dest = Path(dest)
    steps = plan_upgrade(registry, source, target)
    provenance = _provenance(source, steps)
    done = _holds(dest, provenance)
    models = check_upgrade(source, steps, dest, overwrite=dry_run or done, verify_shards=dry_run)
    if on_plan is not None:
        on_plan(steps)
    if dry_run:
        return UpgradeResult(steps, None, "planned", _dry_run_note(dest, done))
    if done:
        output = EmbeddingSet.open(dest, verify=True)
        if not registry.find_runs({"output_set": str(output.path.resolve()),
                                   "output_manifest_sha256": _manifest_sha256(output)}):
            _record_upgrade(registry, source, steps, output, engine, seconds=0.0)
        return UpgradeResult(steps, output, "completed")
    started = time.perf_counter()
    output = upgrade_set(source, steps, dest, batch_rows=batch_rows, engine=engine, progress=progress,
                         address=address, workers=workers, worker_cpus=worker_cpus, worker_memory=worker_memory,
                         models=models, extra_files=_sidecars(source, provenance))
    _record_upgrade(registry, source, steps, output, engine, time.perf_counter() - started)
    return UpgradeResult(steps, output, "written")


def _sidecars(source: EmbeddingSet, provenance: bytes) -> dict[str, bytes]:
    """The upgraded set's sidecars: its provenance, and the source's ``sources.json`` (where the items' images are,
    for a later backfill) when it has one."""
    sources = source.path / SOURCES_FILE
    return {PROVENANCE_FILE: provenance, **({SOURCES_FILE: sources.read_bytes()} if sources.is_file() else {})}


def _provenance(source: EmbeddingSet, steps: Sequence[ChainStep]) -> bytes:
    record = {"source_manifest_sha256": _manifest_sha256(source), "source_model": str(source.manifest.model),
              "chain": [{"name": step.name, "sha256": file_sha256(step.onnx_path)} for step in steps]}
    return json.dumps(record, indent=2, sort_keys=True).encode()


def _holds(dest: Path, provenance: bytes) -> bool:
    """Whether ``dest`` is a set written by the upgrade that ``provenance`` describes."""
    sidecar = dest / PROVENANCE_FILE
    return (dest / MANIFEST).is_file() and sidecar.is_file() and sidecar.read_bytes() == provenance


def _dry_run_note(dest: Path, done: bool) -> str:
    if done:
        return f"{dest} already holds this upgrade; a run would only record it if unrecorded"
    if dest.exists():
        return f"{dest} already exists with other content; a run would refuse to replace it"
    return f"{dest} would be created"


def _manifest_sha256(embedding_set: EmbeddingSet) -> str:
    return hashlib.sha256((embedding_set.path / MANIFEST).read_bytes()).hexdigest()


def _set_flips(source: EmbeddingSet, output: EmbeddingSet) -> dict[str, float]:
    """``negative_flips`` / ``positive_flips`` (+ ``flips_queries``) of the upgraded set against its source, each
    set's own vectors as queries (:func:`~fct_registry.vectors.flips.set_flips`); empty when < 2 items are labelled."""
    flips = set_flips(source, output)
    return {} if flips is None else {**flips.metrics(), "flips_queries": flips.n_query}


def _record_upgrade(registry: ModelRegistry, source: EmbeddingSet, steps: Sequence[ChainStep],
                    output: EmbeddingSet, engine: str, seconds: float) -> str:
    """Log the upgrade as a run named after its output (``seconds`` 0: recorded after the fact, not timed)."""
    chain = [step.name for step in steps]
    params = {
        "input_set": str(source.path.resolve()), "input_model": str(source.manifest.model),
        "input_count": source.manifest.count, "input_manifest_sha256": _manifest_sha256(source),
        "chain": " -> ".join(chain), "output_set": str(output.path.resolve()),
        "output_model": str(output.manifest.model), "output_manifest_sha256": _manifest_sha256(output),
        "engine": engine,
    }
    tags = {"kind": "upgrade", "chain": chain, "source_label": source.manifest.model.label,
            "target_label": output.manifest.model.label}
    timing = {"seconds": seconds, "rows_per_second": output.manifest.count / seconds} if seconds > 0 else {}
    metrics = {"rows": output.manifest.count, **timing, **_set_flips(source, output)}
    name = f"{output.path.name}: upgrade of {source.path.name} ({' -> '.join(chain)})"
    return registry.log_run(name, params=params, tags=tags, metrics=metrics)
