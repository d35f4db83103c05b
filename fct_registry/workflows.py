"""Application operations shared by the CLI and the DVC stages: plan and run upgrades, promote, evaluate, search.

Each function takes library objects (a :class:`~fct_registry.model_registry.ModelRegistry`, paths, versions),
calls the library and returns plain results; nothing here prints. Model versions are named as in
:meth:`ModelRegistry.get`: an MLflow version number (``"3"``), a project label (``"v3"``) or an alias
(``"@champion"``). Upgrades follow FCT (Ramanujan et al., CVPR 2022, arXiv 2112.02805): a stored gallery is
brought to a newer backbone by a chain of registered forward transformations, with no image read again.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fct_registry.chains import Edge, lineage_tree, plan_chain
from fct_registry.config import EvaluationParams, RegistryParams, load_params
from fct_registry.data import load_prepared
from fct_registry.embedding_set import MANIFEST, EmbeddingSet, list_embedding_sets, require_same_model
from fct_registry.errors import ChainError, EmbeddingSetError, RegistryError, SearchError, UpgradeError
from fct_registry.evaluation import retrieval_metrics
from fct_registry.gallery import embed_images
from fct_registry.images import read_image
from fct_registry.model_registry import ROLES, ModelRegistry, RegisteredVersion
from fct_registry.runtime import OnnxModel
from fct_registry.search import SearchResult, index_for_set, search_set
from fct_registry.upgrade import ChainStep, Progress, upgrade_set, validate_chain

PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class Settings:
    """The ``registry:`` and ``evaluation:`` sections of ``params.yaml`` (defaults when there is no file)."""

    registry: RegistryParams
    evaluation: EvaluationParams


def load_settings(root: str | os.PathLike, params_file: str = PARAMS_FILE) -> Settings:
    """Read ``<root>/<params_file>`` when it exists, else use the defaults of :mod:`fct_registry.config`.

    Raises:
        ConfigError: the file exists but is invalid (names the key and the bad value).
    """
    path = Path(root) / params_file
    if not path.is_file():
        return Settings(RegistryParams(), EvaluationParams())
    params = load_params(path)
    return Settings(params.registry, params.evaluation)


def open_registry(root: str | os.PathLike = ".", params_file: str = PARAMS_FILE) -> ModelRegistry:
    """The project's registry: ``registry.tracking_uri`` from params.yaml, else ``MLFLOW_TRACKING_URI``, else the
    embedded SQLite store under ``<root>/registry`` (nothing is opened until first use).

    Raises:
        ConfigError: params.yaml exists but is invalid.
    """
    return ModelRegistry(root, tracking_uri=load_settings(root, params_file).registry.tracking_uri)


def resolve_backbone(registry: ModelRegistry, version: str | None, default_alias: str) -> RegisteredVersion:
    """The backbone named by ``version`` (number, label or ``@alias``), or by ``@default_alias`` when None.

    Raises:
        RegistryError: unknown version or label, or an alias that resolves to no version.
    """
    return registry.get("backbone", version if version is not None else f"@{default_alias}")


def find_set(name: str | os.PathLike, root: str | os.PathLike, sets_root: str | os.PathLike,
             verify: bool = False) -> EmbeddingSet:
    """Open an embedding set given as a path (relative to ``root``) or as a name under ``sets_root``.

    Raises:
        EmbeddingSetError: neither place holds a set (the message lists the sets under ``sets_root``), or the
            set is invalid (with ``verify``: a shard's sha256 or row count differs from the manifest).
    """
    candidates = [Path(root) / name, Path(sets_root) / name]
    for path in candidates:
        if (path / MANIFEST).is_file():
            return EmbeddingSet.open(path, verify=verify)
    known = _set_names(sets_root) or "none"
    raise EmbeddingSetError(f"no embedding set {str(name)!r} at {candidates[0]} or {candidates[1]}; "
                            f"sets under {sets_root}: {known}")


def _set_names(sets_root: str | os.PathLike) -> str:
    return ", ".join(str(s.path.relative_to(sets_root)) for s in _sets_under(sets_root))


def _sets_under(sets_root: str | os.PathLike) -> list[EmbeddingSet]:
    """The sets under ``sets_root`` sorted by path (manifests only, shards not verified); none if it is missing."""
    root = Path(sets_root)
    return list_embedding_sets(root) if root.is_dir() else []


# ----- listing ------------------------------------------------------------------------------------------------


def list_models(registry: ModelRegistry, roles: Sequence[str] = ROLES) -> list[RegisteredVersion]:
    """Every registered version of ``roles``, grouped by role (in the order given), oldest first.

    Raises:
        RegistryError: an unknown role.
    """
    return [version for role in roles for version in registry.versions(role)]


@dataclass(frozen=True)
class SetEntry:
    """An embedding set and the registered backbone version its vectors come from (None: not registered)."""

    embedding_set: EmbeddingSet
    backbone: RegisteredVersion | None


def list_sets(registry: ModelRegistry, sets_root: str | os.PathLike) -> list[SetEntry]:
    """Every embedding set under ``sets_root`` (sorted by path) with its registered backbone version.

    Raises:
        EmbeddingSetError: a set under ``sets_root`` has an invalid manifest.
    """
    backbones = {version.ref: version for version in registry.versions("backbone")}
    return [SetEntry(s, backbones.get(s.manifest.model)) for s in _sets_under(sets_root)]


def lineage_text(registry: ModelRegistry) -> str:
    """Text tree of backbone versions and the transformations between them (see :func:`chains.lineage_tree`).

    Each version's line carries its registered model version and aliases, e.g. ``fct-backbone/3 @champion``.

    Raises:
        RegistryError: a transformation version lacks its source/target tags.
    """
    backbones = registry.versions("backbone")
    notes = {v.ref: " ".join([f"{v.name}/{v.version}", *(f"@{a}" for a in v.aliases)]) for v in backbones}
    return lineage_tree([v.ref for v in backbones], registry.transformation_edges(), notes)


# ----- upgrade ------------------------------------------------------------------------------------------------


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


def run_upgrade(registry: ModelRegistry, set_path: str | os.PathLike, target: RegisteredVersion,
                dest: str | os.PathLike, engine: Literal["local", "ray"] = "local", address: str | None = None,
                progress: Progress | None = None, dry_run: bool = False, batch_rows: int = 65536,
                on_plan: Callable[[list[ChainStep]], None] | None = None
                ) -> tuple[list[ChainStep], EmbeddingSet | None]:
    """Plan, validate and run the upgrade of a stored set to ``target``, and record it as an MLflow run.

    Everything that can be checked before writing is checked first (set verified, chain planned, every ONNX file
    loaded and its input widths matched to the set and the previous link, ``dest`` free); a dry run stops
    there. The upgrade then streams the set through the chain (see :func:`upgrade.upgrade_set`: memory flat in
    the set's size, written atomically) and a run of the ``fct-registry`` experiment records the input set
    (path, model, count, manifest sha256), the chain (transformation versions) and the output set.

    Args:
        registry: The model registry.
        set_path: The stored set, embeddings (count, d) float32 of a registered backbone.
        target: The backbone version to upgrade to.
        dest: Where the upgraded set, embeddings (count, d_target) float32, is written; must not exist.
        engine: ``"local"`` (ONNX Runtime in this process) or ``"ray"`` (Ray Data actors).
        address: Ray engine only: cluster address; None starts a local Ray.
        progress: Optional ``progress(rows_done, rows_total)`` callback.
        dry_run: Plan and validate only; nothing is written or recorded.
        batch_rows: Rows per batch fed to ONNX Runtime.
        on_plan: Optional callback given the validated steps before any row is processed (e.g. to print them).

    Returns:
        ``(steps, output set)``; the output is None for a dry run.

    Raises:
        EmbeddingSetError: the set is missing or fails verification.
        RegistryError: unknown set model or a corrupted ONNX artifact.
        ChainError: already at or beyond ``target``, no chain, or side-info the set lacks.
        UpgradeError: ``dest`` exists, an ONNX file does not load, link widths differ, or NaN/inf vectors.
    """
    source = EmbeddingSet.open(set_path, verify=False)  # upgrade_set verifies the shards; read them once
    dest = Path(dest)
    if dest.exists():
        raise UpgradeError(f"destination {dest} already exists; choose another output path or remove it")
    steps = plan_upgrade(registry, source, target)
    validate_chain(steps, source)
    if on_plan is not None:
        on_plan(steps)
    if dry_run:
        source.verify()
        return steps, None
    started = time.perf_counter()
    output = upgrade_set(source.path, steps, dest, batch_rows=batch_rows, engine=engine, progress=progress,
                         address=address)
    _record_upgrade(registry, source, steps, output, engine, time.perf_counter() - started)
    return steps, output


def _manifest_sha256(embedding_set: EmbeddingSet) -> str:
    return hashlib.sha256((embedding_set.path / MANIFEST).read_bytes()).hexdigest()


def _record_upgrade(registry: ModelRegistry, source: EmbeddingSet, steps: Sequence[ChainStep],
                    output: EmbeddingSet, engine: str, seconds: float) -> str:
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
    metrics = {"rows": output.manifest.count, "seconds": seconds, "rows_per_second": output.manifest.count / seconds}
    name = f"upgrade {source.path.name} {source.manifest.model.label} -> {output.manifest.model.label}"
    return registry.log_run(name, params=params, tags=tags, metrics=metrics)


# ----- promote ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetCheck:
    """Whether one stored set can follow a promoted backbone.

    Attributes:
        embedding_set: The stored set.
        chain: The planned transformations (empty when the set is already at the version).
        min_map: Smallest registered link mAP of the chain (fraction; a link without one counts as 0.0), or
            None for an empty chain.
        problem: Why the set blocks the promotion, or None.
    """

    embedding_set: EmbeddingSet
    chain: list[Edge]
    min_map: float | None
    problem: str | None


@dataclass(frozen=True)
class Promotion:
    """Result of :func:`promote`: the version the alias now points to, one check per set, and whether
    ``force`` overrode failed checks."""

    version: RegisteredVersion
    alias: str
    checks: list[SetCheck]
    forced: bool


def check_set(embedding_set: EmbeddingSet, target: RegisteredVersion, edges: Sequence[Edge],
              map_floor: float) -> SetCheck:
    """Can ``embedding_set`` be upgraded to ``target`` by a chain whose weakest link's mAP is >= ``map_floor``?

    Args:
        embedding_set: A stored set (its manifest's model and side-info model are used).
        target: The backbone about to be promoted.
        edges: The registered transformations (:meth:`ModelRegistry.transformation_edges`).
        map_floor: Minimum acceptable registered link mAP, a fraction in [0, 1].

    Returns:
        The check; ``problem`` names the set and the reason when the set cannot follow.
    """
    manifest = embedding_set.manifest
    if manifest.model == target.ref:
        return SetCheck(embedding_set, [], None, None)
    side_info = [manifest.side_info_model] if manifest.side_info_model is not None else []
    try:
        chain = plan_chain(manifest.model, target.ref, edges, available_side_info=side_info)
    except ChainError as exc:
        return SetCheck(embedding_set, [], None, f"set {embedding_set.path}: {exc}")
    weakest = min(chain, key=_link_map)
    problem = None
    if _link_map(weakest) < map_floor:
        problem = (f"set {embedding_set.path}: chain to {target.ref} has link {weakest.transformation} with "
                   f"registered mAP {_link_map(weakest):.3f}, below the floor {map_floor:.3f}")
    return SetCheck(embedding_set, chain, _link_map(weakest), problem)


def _link_map(edge: Edge) -> float:
    """A link's registered mAP; 0.0 when none was registered (as :func:`chains.plan_chain` ranks it)."""
    return edge.map if edge.map is not None else 0.0


def promote(registry: ModelRegistry, version: str, sets_root: str | os.PathLike, alias: str = "champion",
            map_floor: float = 0.0, force: bool = False) -> Promotion:
    """Point ``alias`` at a backbone version once every stored gallery set can follow it.

    The gate: each embedding set under ``sets_root`` must reach the version by a chain of registered
    transformations (with side-info it stores) whose smallest registered link mAP (tag ``fct.map``) is at
    least ``map_floor``. ``force`` sets the alias anyway.

    Args:
        registry: The model registry.
        version: Backbone version number, label or ``@alias``.
        sets_root: Folder holding the stored embedding sets (any depth); missing means no sets.
        alias: The alias to set, e.g. ``champion``.
        map_floor: Minimum acceptable link mAP, a fraction in [0, 1].
        force: Set the alias even when checks fail.

    Returns:
        The promotion, with the refreshed version (its aliases include ``alias``).

    Raises:
        RegistryError: unknown version, or MLflow refuses the alias name.
        ChainError: some set cannot follow (every failing set is named) and ``force`` is False.
    """
    target = registry.get("backbone", version)
    edges = registry.transformation_edges()
    checks = [check_set(s, target, edges, map_floor) for s in _sets_under(sets_root)]
    problems = [c.problem for c in checks if c.problem is not None]
    if problems and not force:
        raise ChainError(f"refusing to set @{alias} -> {target.ref}: {'; '.join(problems)} (--force overrides)")
    return Promotion(registry.set_alias("backbone", alias, target.version), alias, checks, bool(problems))


# ----- evaluate and search ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """Retrieval of one query model against one gallery set.

    Attributes:
        query: The backbone that embedded the query images.
        gallery: The gallery set.
        n_query: Number of query images.
        metrics: ``cmc_top<k>`` and ``map``, fractions in [0, 1] (protocol of :mod:`fct_registry.evaluation`).
    """

    query: RegisteredVersion
    gallery: EmbeddingSet
    n_query: int
    metrics: dict[str, float]


def evaluate_gallery(registry: ModelRegistry, query_version: str, gallery: EmbeddingSet, data_dir: str | os.PathLike,
                     split: str = "test", top_k: Sequence[int] = (1, 5)) -> Evaluation:
    """CMC top-k and mAP of a split's images, embedded by a registered backbone, against a stored gallery set.

    Query images (N, C, H, W) uint8 are scaled to [0, 1] and embedded with the version's ONNX file (ONNX
    Runtime). A query's own gallery item (same item id) is excluded; distances use the set's metric.

    Raises:
        RegistryError: unknown version.
        VersionMismatchError: the query model differs from the set's model (upgrade the set first).
        DataError: the prepared split is missing.
        SearchError: bad labels or top_k.
    """
    query = registry.get("backbone", query_version)
    require_same_model(query.ref, gallery.manifest.model)
    images = load_prepared(Path(data_dir), split)
    vectors = embed_images(OnnxModel(registry.onnx_path(query)), images.images)
    stored = gallery.read()
    metrics = retrieval_metrics(vectors, images.labels, stored.embeddings, stored.labels, gallery.manifest.metric,
                                query_ids=images.item_ids, gallery_ids=stored.ids, top_k=top_k)
    return Evaluation(query, gallery, len(images), metrics)


@dataclass(frozen=True)
class ImageSearch:
    """Top-k gallery items for query images: the backbone used, the gallery set, and ids/scores per image
    (``result.ids`` (n_query, k) int64, ``result.scores`` (n_query, k) float32, larger is better)."""

    model: RegisteredVersion
    gallery: EmbeddingSet
    result: SearchResult


def gallery_for(model: RegisteredVersion, sets_root: str | os.PathLike) -> EmbeddingSet:
    """The first set under ``sets_root`` (by path) whose vectors come from ``model``.

    Raises:
        SearchError: no set there is at ``model`` (names the sets that exist and their models).
    """
    sets = _sets_under(sets_root)
    for embedding_set in sets:
        if embedding_set.manifest.model == model.ref:
            return embedding_set
    found = ", ".join(f"{s.path.name} ({s.manifest.model})" for s in sets) or "none"
    raise SearchError(f"no embedding set under {sets_root} is at {model.ref}; sets: {found} (run upgrade first)")


def search_images(registry: ModelRegistry, images: Sequence[str | os.PathLike], k: int, model_version: str,
                  sets_root: str | os.PathLike, gallery: EmbeddingSet | None = None) -> ImageSearch:
    """Embed query images with a registered backbone and search a gallery set at that backbone.

    Args:
        registry: The model registry.
        images: PNG/JPEG files; each becomes a grayscale (1, H, W) image in [0, 1] at the model's input size.
        k: Neighbours per image, 1 <= k <= n_gallery.
        model_version: The backbone (number, label or ``@alias``, e.g. ``@champion``).
        sets_root: Where to look for a gallery when none is given.
        gallery: The set to search; None picks the first set under ``sets_root`` at the backbone.

    Raises:
        RegistryError: unknown version or alias.
        DataError: an image is missing or not PNG/JPEG.
        VersionMismatchError: ``gallery`` holds vectors of another model.
        SearchError: no gallery at the backbone, or bad ``k``.
    """
    model = registry.get("backbone", model_version)
    if gallery is None:
        gallery = gallery_for(model, sets_root)
    require_same_model(model.ref, gallery.manifest.model)
    onnx_model = OnnxModel(registry.onnx_path(model))
    _, _, height, width = onnx_model.input_shapes["image"]
    pixels = np.concatenate([read_image(path, height, width) for path in images])
    queries = embed_images(onnx_model, pixels)
    return ImageSearch(model, gallery, search_set(index_for_set(gallery), queries, model.ref, k))


# ----- MLflow UI ----------------------------------------------------------------------------------------------


def mlflow_ui_command(registry: ModelRegistry, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow server`` command line and environment that serve the UI over the registry's store.

    One worker and no job execution: it starts in seconds with ~0.5 GB and stops cleanly (the defaults start
    ~15 processes and leave workers behind when killed).

    Returns:
        ``(argv, env)`` for :class:`subprocess.Popen`; ``env`` is this process's environment plus
        ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``.
    """
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", registry.tracking_uri,
            "--host", host, "--port", str(port), "--workers", "1"]
    return argv, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


UI_STOP_GRACE_S = 10
"""Seconds the MLflow server gets to stop after SIGTERM before its process group is killed."""


def run_mlflow_ui(registry: ModelRegistry, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Run the MLflow UI over the registry until it exits, Ctrl-C or SIGTERM; then stop its whole process group.

    Must run in the main thread (it handles SIGTERM for the duration).

    Returns:
        The server's exit code, or 0 when stopped by Ctrl-C / SIGTERM.
    """
    argv, env = mlflow_ui_command(registry, host, port)
    process = subprocess.Popen(argv, env=env, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=UI_STOP_GRACE_S)
            except subprocess.TimeoutExpired:  # uvicorn's graceful shutdown can wait on open connections
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
