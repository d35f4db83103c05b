"""Use cases of ``fct-registry models`` and ``lineage``: what is registered and how versions connect."""

from __future__ import annotations

from collections.abc import Sequence

from fct_registry.registry.chains import lineage_tree
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import ROLES, RegisteredVersion


def list_models(registry: ModelRegistry, roles: Sequence[str] = ROLES) -> list[RegisteredVersion]:
    """Every registered version of ``roles``, grouped by role (in the order given), oldest first.

    Raises:
        RegistryError: an unknown role.
    """
    return [version for role in roles for version in registry.versions(role)]


def lineage_text(registry: ModelRegistry) -> str:
    """Text tree of backbone versions and the transformations between them (see :func:`chains.lineage_tree`).

    Each version's line carries its registered model version and aliases, e.g. ``fct-backbone/3 @champion``.

    Raises:
        RegistryError: a transformation version lacks its source/target tags.
    """
    backbones = registry.versions("backbone")
    notes = {v.ref: " ".join([f"{v.name}/{v.version}", *(f"@{a}" for a in v.aliases)]) for v in backbones}
    return lineage_tree([v.ref for v in backbones], registry.transformation_edges(), notes)
