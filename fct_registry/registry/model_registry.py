"""The model registry of fct-registry: backbones, side-info models and FCT transformations as ONNX model versions.

Every model is registered as a version of one of three registered models, ``<prefix>-backbone``,
``<prefix>-side-info`` and ``<prefix>-transformation``, tagged as described in :mod:`fct_registry.registry.versions`.
Versions are content-addressed (``fct.sha256``): registering the same bytes twice creates no second version. The
store behind it is MLflow (:mod:`fct_registry.registry.mlflow_store`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from fct_registry.core.errors import RegistryError
from fct_registry.core.refs import ModelRef
from fct_registry.registry.chains import Edge
from fct_registry.registry.mlflow_store import MlflowStore, default_tracking_uri
from fct_registry.registry.onnx_io import onnx_io
from fct_registry.registry.pages import publish_pages
from fct_registry.registry.versions import (
    EDGE_TAGS,
    IDENTITY_TAGS,
    ROLES,
    RegisteredVersion,
    file_sha256,
    format_tags,
    require_tags,
    transformation_edges,
)


class ModelRegistry:
    """Register, tag, alias and fetch ONNX models.

    Args:
        root: Project root; holds ``registry/`` (SQLite store, artifacts, downloads).
        tracking_uri: Tracking and registry URI (e.g. from ``params.yaml``). When None, ``MLFLOW_TRACKING_URI``
            is used if set, else the embedded SQLite store ``<root>/registry/mlflow.db``.
        prefix: Registered model names are ``f"{prefix}-{role}"``.

    Nothing is opened until first use.
    """

    def __init__(self, root: str | os.PathLike = ".", tracking_uri: str | None = None, prefix: str = "fct"):
        self.root = Path(root).resolve()
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)
        self.prefix = prefix
        local = self.root / "registry" if self.tracking_uri == default_tracking_uri(self.root) else None
        self.store = MlflowStore(self.tracking_uri, local)

    def model_name(self, role: str) -> str:
        """Registered model name of a role, e.g. ``"fct-backbone"``.

        Raises:
            RegistryError: ``role`` is not one of :data:`~fct_registry.registry.versions.ROLES`.
        """
        if role not in ROLES:
            raise RegistryError(f"unknown model role {role!r}; expected one of {', '.join(ROLES)}")
        return f"{self.prefix}-{role}"

    def versions(self, role: str) -> list[RegisteredVersion]:
        """All versions of a role, oldest first, with their aliases (empty when none is registered)."""
        name = self.model_name(role)
        found = self.store.search_versions(f"name = '{name}'")
        if not found:
            return []
        aliases = self.store.aliases(name)
        return sorted((replace(v, aliases=tuple(sorted(a for a, n in aliases.items() if n == v.version)))
                       for v in found), key=lambda v: v.version)

    def get(self, role: str, version_or_label: str | int) -> RegisteredVersion:
        """Look up a version by MLflow version number, project label or ``@alias``.

        Args:
            role: Model role.
            version_or_label: An int or digit string is an MLflow version number; ``"@champion"`` resolves an
                alias (see :meth:`resolve_alias`); anything else is a label (``"v2"``) and selects the newest
                version with it.

        Raises:
            RegistryError: Unknown version or label (message lists the known ones), or an alias that does not
                resolve.
        """
        key = str(version_or_label)
        if key.startswith("@"):
            return self.resolve_alias(role, key[1:])
        known = self.versions(role)
        matches = [v for v in known if (str(v.version) == key if key.isdigit() else v.ref.label == key)]
        if not matches:
            listed = ", ".join(f"{v.version} ({v.ref.label})" for v in known) or "none registered"
            raise RegistryError(f"unknown {self.model_name(role)} version {key!r}; known: {listed}")
        return matches[-1]

    def find(self, role: str, ref: ModelRef) -> RegisteredVersion:
        """The version of ``role`` whose content is ``ref`` (same label and sha256).

        Raises:
            RegistryError: no registered version has that content (names the ref and the known versions).
        """
        known = self.versions(role)
        for version in known:
            if version.ref == ref:
                return version
        listed = ", ".join(str(v) for v in known) or "none registered"
        raise RegistryError(f"{ref} is not registered as a {self.model_name(role)} version; known: {listed}")

    def set_alias(self, role: str, alias: str, version: str | int) -> RegisteredVersion:
        """Point ``alias`` (e.g. ``champion``) at a version (number, label or ``@alias``); returns it refreshed.

        Raises:
            RegistryError: Unknown version, or MLflow refuses the alias name (``v<n>`` is reserved by MLflow).
        """
        chosen = self.get(role, version)
        self.store.set_alias(chosen, alias)
        publish_pages(self)
        return self.get(role, chosen.version)

    def resolve_alias(self, role: str, alias: str) -> RegisteredVersion:
        """The version an alias points to.

        Raises:
            RegistryError: The alias was never set, or the version it pointed to was deleted.
        """
        return self.store.version_by_alias(self.model_name(role), alias)

    def register(self, onnx_path: str | os.PathLike, role: str, ref: ModelRef, tags: Mapping[str, Any] | None = None,
                 params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None
                 ) -> RegisteredVersion:
        """Register an ONNX file as a model version (logged with MLflow's ONNX flavor and the graph's signature),
        then bring the UI's pages up to date (:func:`~fct_registry.registry.pages.publish_pages`).

        Idempotent by content: when a version of ``role`` with the same ``fct.sha256`` exists it is returned
        unchanged and nothing is logged.

        Args:
            onnx_path: Self-contained ``.onnx`` file (no external-data sidecar).
            role: ``"backbone"``, ``"side-info"`` or ``"transformation"``.
            ref: Identity of the file; ``ref.sha256`` must equal the file's sha256.
            tags: Extra version tags; a key without the ``fct.`` prefix gets it; values that are not strings are
                stored as JSON (``True`` -> ``"true"``).
            params: Training params, logged to the run and stored as ``fct.params`` JSON.
            metrics: Measured metrics (fractions in [0, 1], e.g. ``cmc_top1``, ``map``), logged to the run and
                stored as ``fct.<key>`` tags.

        Returns:
            The new (or already registered) version.

        Raises:
            RegistryError: Missing file, sha256 mismatch with ``ref``, the same bytes registered under another
                label, a transformation without the source/target tags of
                :func:`~fct_registry.registry.versions.transformation_tags`, or MLflow refusing the version.
        """
        path = Path(onnx_path)
        if not path.is_file():
            raise RegistryError(f"ONNX file {path} does not exist")
        sha = file_sha256(path)
        if sha != ref.sha256:
            raise RegistryError(f"{path} has sha256 {sha[:12]}, but its ModelRef {ref} expects {ref.sha256[:12]}")
        name = self.model_name(role)
        existing = self.store.search_versions(f"name = '{name}' AND tags.`fct.sha256` = '{sha}'")
        if existing:
            return _same_label(existing[0], ref)
        version_tags = {**format_tags(tags or {}), **format_tags(metrics or {}), "fct.role": role,
                        "fct.label": ref.label, "fct.sha256": sha,
                        "fct.params": json.dumps(dict(params or {}), sort_keys=True, default=str)}
        if role == "transformation":
            require_tags(version_tags, EDGE_TAGS, f"transformation {ref} (see transformation_tags())")
        version = self.store.register_onnx(path, name, ref, version_tags, params or {}, metrics or {}, onnx_io(path))
        version = _first_of_twins(self.store, version, f"name = '{name}' AND tags.`fct.sha256` = '{sha}'", ref)
        publish_pages(self, version)
        return version

    def set_tags(self, version: RegisteredVersion, tags: Mapping[str, Any]) -> RegisteredVersion:
        """Add or overwrite version tags (e.g. metrics measured after registration); returns it refreshed.

        Raises:
            RegistryError: A tag would change the version's identity (role, label, sha256).
        """
        formatted = format_tags(tags)
        changed = [k for k in IDENTITY_TAGS if k in formatted and formatted[k] != version.tags.get(k)]
        if changed:
            raise RegistryError(f"refusing to change identity tags {', '.join(changed)} of {version}")
        self.store.set_tags(version, formatted)
        publish_pages(self)
        return self.get(version.role, version.version)

    def log_run(self, name: str, params: Mapping[str, Any], tags: Mapping[str, Any],
                artifacts: Iterable[str | os.PathLike] = (), metrics: Mapping[str, float] | None = None) -> str:
        """Record a finished piece of work (e.g. an upgrade: input set, chain, output set) as a run; returns its id.

        See :meth:`~fct_registry.registry.mlflow_store.MlflowStore.log_run`.
        """
        return self.store.log_run(name, params, tags, artifacts, metrics)

    def find_runs(self, params: Mapping[str, str]) -> list[str]:
        """Ids of recorded runs whose params include every ``name: value`` of ``params`` (none when none is)."""
        return self.store.run_ids(" AND ".join(f"params.{name} = '{value}'" for name, value in params.items()))

    def onnx_path(self, version: RegisteredVersion) -> Path:
        """Local path of a version's ONNX file, downloaded once into ``<root>/registry/downloads``.

        The file is checked against the version's ``fct.sha256``; a cached copy that no longer matches is fetched
        again. The download goes to a temp dir beside the cache and is moved in atomically.

        Raises:
            RegistryError: The artifact cannot be downloaded or its bytes do not match ``fct.sha256``.
        """
        cached = self.root / "registry" / "downloads" / version.name / str(version.version) / "model.onnx"
        if cached.is_file() and file_sha256(cached) == version.ref.sha256:
            return cached
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".tmp-") as tmp:
            onnx_file = self.store.download_onnx(version, Path(tmp))
            if file_sha256(onnx_file) != version.ref.sha256:
                raise RegistryError(f"ONNX artifact of {version} does not match its fct.sha256 (corrupted store)")
            os.replace(onnx_file, cached)
        return cached

    def transformation_edges(self) -> list[Edge]:
        """The compatibility graph's edges, one per registered transformation (``Edge.map``: its ``fct.map``).

        Raises:
            RegistryError: A transformation version lacks its source/target tags.
        """
        return transformation_edges(self.versions("transformation"))


def _first_of_twins(store: MlflowStore, created: RegisteredVersion, same_bytes: str, ref: ModelRef
                    ) -> RegisteredVersion:
    """The lowest version holding the same bytes as ``created``; ``created`` is deleted when it is not that one.

    Content identity is checked before registering, which is not atomic: jobs registering the same file at the
    same moment (e.g. against a shared server) each create a version. Every job then keeps the lowest one.
    """
    first = min(store.search_versions(same_bytes), key=lambda v: v.version, default=created)
    if first.version == created.version:
        return created
    store.delete_version(created)
    return _same_label(first, ref)


def _same_label(existing: RegisteredVersion, ref: ModelRef) -> RegisteredVersion:
    """Return ``existing`` when it carries ``ref``'s label; identical bytes under two labels is an error."""
    if existing.ref.label != ref.label:
        raise RegistryError(
            f"these ONNX bytes are already registered as {existing}; refusing to register them again as {ref.label!r}"
        )
    return existing
