"""Use case of ``fct-registry promote``: move an alias once every stored set can follow the new backbone."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
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
        max_negative_flips: Largest registered negative flip rate of the chain's links (``fct.negative_flips``,
            fraction; Yan et al., CVPR 2021), or None for an empty chain or when no link has one.
    """

    embedding_set: EmbeddingSet
    chain: list[Edge]
    min_map: float | None
    problem: str | None
    max_negative_flips: float | None = None


@dataclass(frozen=True)
class Promotion:
    """Result of :func:`promote`: the version the alias now points to, one check per set, and whether
    ``force`` overrode failed checks."""

    version: RegisteredVersion
    alias: str
    checks: list[SetCheck]
    forced: bool


def check_set(embedding_set: EmbeddingSet, target: RegisteredVersion, edges: Sequence[Edge],
              map_floor: float, negative_flips: Mapping[str, float] | None = None,
              negative_flip_ceiling: float | None = None) -> SetCheck:
    """Can ``embedding_set`` be upgraded to ``target`` by a chain whose weakest link's mAP is >= ``map_floor``
    (and, with a ceiling, whose worst link's negative flip rate is <= ``negative_flip_ceiling``)?

    Args:
        embedding_set: A stored set (its manifest's model and side-info model are used).
        target: The backbone about to be promoted.
        edges: The registered transformations (:meth:`ModelRegistry.transformation_edges`).
        map_floor: Minimum acceptable registered link mAP, a fraction in [0, 1].
        negative_flips: Registered negative flip rate per transformation (``Edge.transformation`` -> fraction),
            e.g. from :func:`registered_negative_flips`; None: none known.
        negative_flip_ceiling: Largest acceptable link negative flip rate, a fraction in [0, 1]; None: no
            ceiling. With a ceiling, a link without a registered rate counts as 1.0 (fails), as a link without
            an mAP counts as 0.0 for the floor.

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
    rates = {edge.transformation: (negative_flips or {}).get(edge.transformation) for edge in chain}
    if problem is None and negative_flip_ceiling is not None:
        problem = _flip_problem(f"set {embedding_set.path}: chain to {target.ref}", rates, negative_flip_ceiling)
    known = [rate for rate in rates.values() if rate is not None]
    return SetCheck(embedding_set, chain, _link_map(weakest), problem, max(known) if known else None)


def _flip_problem(where: str, rates: Mapping[str, float | None], ceiling: float) -> str | None:
    """Why a chain's worst link (a link without a registered rate counts as 1.0) breaks the ceiling, or None."""
    worst = max(rates, key=lambda name: 1.0 if rates[name] is None else rates[name])
    rate = rates[worst]
    if rate is None:
        return (f"{where} has link {worst} with no registered negative flip rate, so it cannot be held to the "
                f"ceiling {ceiling:.3f}")
    if rate > ceiling:
        return (f"{where} has link {worst} with registered negative flip rate {rate:.3f}, above the ceiling "
                f"{ceiling:.3f}")
    return None


def registered_negative_flips(registry: ModelRegistry) -> dict[str, float]:
    """Each registered transformation's negative flip rate (tag ``fct.negative_flips``, a fraction), keyed like
    ``Edge.transformation`` (``fct-transformation/3``); versions without the tag are left out."""
    return {f"{v.name}/{v.version}": float(v.tags["fct.negative_flips"]) for v in registry.versions("transformation")
            if "fct.negative_flips" in v.tags}


def _link_map(edge: Edge) -> float:
    """A link's registered mAP; 0.0 when none was registered (as :func:`chains.plan_chain` ranks it)."""
    return edge.map if edge.map is not None else 0.0


def promote(registry: ModelRegistry, version: str, sets_root: str | os.PathLike, alias: str = "champion",
            map_floor: float = 0.0, force: bool = False, negative_flip_ceiling: float | None = None) -> Promotion:
    """Point ``alias`` at a backbone version once every stored gallery set can follow it.

    The gate: each embedding set under ``sets_root`` must reach the version by a chain of registered
    transformations (with side-info it stores) whose smallest registered link mAP (tag ``fct.map``) is at
    least ``map_floor`` and, with a ``negative_flip_ceiling``, whose largest registered link negative flip rate
    (tag ``fct.negative_flips``: queries right before the link's update and wrong after it; Yan et al., CVPR
    2021) is at most the ceiling (a link without the tag fails it). ``force`` sets the alias anyway.

    Args:
        registry: The model registry.
        version: Backbone version number, label or ``@alias``.
        sets_root: Folder holding the stored embedding sets (any depth); missing means no sets.
        alias: The alias to set, e.g. ``champion``.
        map_floor: Minimum acceptable link mAP, a fraction in [0, 1].
        force: Set the alias even when checks fail.
        negative_flip_ceiling: Largest acceptable link negative flip rate, a fraction in [0, 1]; None: off.

    Returns:
        The promotion, with the refreshed version (its aliases include ``alias``).

    Raises:
        RegistryError: unknown version, or MLflow refuses the alias name.
        ChainError: some set cannot follow (every failing set is named) and ``force`` is False.
    """
    target = registry.get("backbone", version)
    edges = registry.transformation_edges()
    flips = registered_negative_flips(registry)
    checks = [check_set(s, target, edges, map_floor, flips, negative_flip_ceiling) for s in sets_under(sets_root)]
    problems = [c.problem for c in checks if c.problem is not None]
    if problems and not force:
        raise ChainError(f"refusing to set @{alias} -> {target.ref}: {'; '.join(problems)} (--force overrides)")
    return Promotion(registry.set_alias("backbone", alias, target.version), alias, checks, bool(problems))
