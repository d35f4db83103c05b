"""Use case of ``fct-registry promote``: move an alias once every stored set can follow the new backbone."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from fct_registry.core.errors import ChainError
from fct_registry.registry.chains import Edge, plan_chain
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import RegisteredVersion
from fct_registry.usecases.project import sets_under
from fct_registry.vectors.embedding_set import EmbeddingSet


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
    checks = [check_set(s, target, edges, map_floor) for s in sets_under(sets_root)]
    problems = [c.problem for c in checks if c.problem is not None]
    if problems and not force:
        raise ChainError(f"refusing to set @{alias} -> {target.ref}: {'; '.join(problems)} (--force overrides)")
    return Promotion(registry.set_alias("backbone", alias, target.version), alias, checks, bool(problems))
