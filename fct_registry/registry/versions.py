"""Registered model versions and their tags, independent of the store that holds them.

A version's tags make it self-describing (all prefixed ``fct.``): ``fct.role``, ``fct.label``, ``fct.sha256`` (of
the ONNX bytes), ``fct.params``; by convention ``fct.embedding_dim``, ``fct.inputs``, ``fct.metric``,
``fct.normalized``, ``fct.data_hash``, ``fct.git_commit``; a transformation (FCT: Ramanujan et al., CVPR 2022,
arXiv 2112.02805) also its source, target and side-info models (:func:`transformation_tags`) and its measured
cross-model ``fct.cmc_top1``, ``fct.cmc_top5``, ``fct.map`` (fractions in [0, 1]).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from fct_registry.core.errors import RegistryError
from fct_registry.core.refs import ModelRef
from fct_registry.onnx_boundary.contract import InputContract, contract_from_tags
from fct_registry.registry.chains import Edge

Role = Literal["backbone", "side-info", "transformation"]
ROLES: tuple[str, ...] = get_args(Role)
TAG_PREFIX = "fct."
IDENTITY_TAGS = ("fct.role", "fct.label", "fct.sha256")
EDGE_TAGS = ("fct.source_label", "fct.source_sha256", "fct.target_label", "fct.target_sha256")


@dataclass(frozen=True)
class RegisteredVersion:
    """One registered model version.

    Attributes:
        name: Registered model name, e.g. ``"fct-backbone"``.
        version: MLflow version number (1, 2, ...).
        role: ``"backbone"``, ``"side-info"`` or ``"transformation"``.
        ref: Content identity (project label + sha256 of the ONNX bytes).
        tags: All version tags (``fct.*`` and MLflow's own), values as strings.
        aliases: Aliases currently pointing at this version (e.g. ``("champion",)``).
    """

    name: str
    version: int
    role: Role
    ref: ModelRef
    tags: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.name}/{self.version} ({self.ref})"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (content identity of a model)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def transformation_tags(
    source: RegisteredVersion, target: RegisteredVersion, side_info: RegisteredVersion | None
) -> dict[str, str]:
    """Tags that place a transformation in the compatibility graph (pass them to ``register``).

    Args:
        source: Registered backbone whose embeddings (B, d_old) the transformation reads.
        target: Registered backbone whose space (B, d_new) it maps into.
        side_info: Registered side-info model whose vectors (B, d_side) it reads, or None.

    Returns:
        ``fct.source_label/_sha256/_version``, ``fct.target_*`` and (with side-info)
        ``fct.side_info_*`` tags.
    """
    tags: dict[str, str] = {}
    for prefix, version in (("source", source), ("target", target), ("side_info", side_info)):
        if version is not None:
            tags[f"fct.{prefix}_label"] = version.ref.label
            tags[f"fct.{prefix}_sha256"] = version.ref.sha256
            tags[f"fct.{prefix}_version"] = str(version.version)
    return tags


def format_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """``fct.``-prefixed keys and string values (strings kept, anything else as JSON)."""
    return {
        (key if key.startswith(TAG_PREFIX) else TAG_PREFIX + key): (
            value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        )
        for key, value in tags.items()
    }


def transformation_edges(versions: Iterable[RegisteredVersion]) -> list[Edge]:
    """The compatibility graph's edges: one :class:`~fct_registry.registry.chains.Edge` per transformation version.

    ``Edge.map`` is the version's ``fct.map`` tag (None when absent).

    Raises:
        RegistryError: A transformation version lacks its source/target tags.
    """
    edges = []
    for version in versions:
        tags = version.tags
        require_tags(tags, EDGE_TAGS, str(version))
        side = _ref_from_tags(tags, "side_info") if "fct.side_info_sha256" in tags else None
        edges.append(Edge(
            source=_ref_from_tags(tags, "source"),
            target=_ref_from_tags(tags, "target"),
            side_info=side,
            transformation=f"{version.name}/{version.version}",
            map=float(tags["fct.map"]) if "fct.map" in tags else None,
        ))
    return edges


def version_from_tags(name: str, version: int | str, tags: Mapping[str, str], aliases: Iterable[str] = ()
                      ) -> RegisteredVersion:
    """A :class:`RegisteredVersion` from a store's record of it.

    Raises:
        RegistryError: the identity tags (role, label, sha256) are missing.
    """
    tags = dict(tags)
    require_tags(tags, IDENTITY_TAGS, f"{name}/{version}")
    return RegisteredVersion(name=name, version=int(version), role=tags["fct.role"],
                             ref=ModelRef(label=tags["fct.label"], sha256=tags["fct.sha256"]), tags=tags,
                             aliases=tuple(sorted(aliases)))


def has_identity(tags: Mapping[str, str]) -> bool:
    """False for a version that carries none of the identity tags: one another process is creating (MLflow adds a
    new version's tags after its row) or deleting at this moment, or one not made by fct-registry. Listings skip
    such versions; a version with only some of them is an error (:func:`version_from_tags`)."""
    return any(key in tags for key in IDENTITY_TAGS)


def require_tags(tags: Mapping[str, str], keys: Iterable[str], what: str) -> None:
    """Raise RegistryError naming ``what`` and every key of ``keys`` missing from ``tags``."""
    missing = [k for k in keys if k not in tags]
    if missing:
        raise RegistryError(f"{what} lacks tags {', '.join(missing)}")


def _ref_from_tags(tags: Mapping[str, str], prefix: str) -> ModelRef:
    return ModelRef(label=tags[f"fct.{prefix}_label"], sha256=tags[f"fct.{prefix}_sha256"])


def input_contract(version: RegisteredVersion, onnx_input_shape: tuple[object, ...]) -> InputContract:
    """How images are prepared for a registered image model (its ``fct.input_contract`` tag, else the project's
    grayscale [0, 1] default at the ONNX input's (H, W); see
    :func:`~fct_registry.onnx_boundary.contract.contract_from_tags`).

    Raises:
        DataError: the tag is invalid, or there is none and the input is not (B, 1, H, W).
    """
    return contract_from_tags(version.tags, onnx_input_shape, str(version))
