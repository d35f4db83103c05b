"""MLflow model registry for ONNX backbones, side-info models and FCT transformations.

Every model is logged with MLflow's ONNX flavor in a run of the ``fct-registry``
experiment and registered as a version of one of three registered models,
``<prefix>-backbone``, ``<prefix>-side-info`` and ``<prefix>-transformation``. The
version's tags make it self-describing (all prefixed ``fct.``):

- always: ``fct.role``, ``fct.label`` (project label, e.g. ``v2``), ``fct.sha256``
  (of the ONNX bytes), ``fct.params`` (JSON of the training params);
- from the caller, by convention: ``fct.embedding_dim``, ``fct.inputs``,
  ``fct.metric`` (``l2``/``cosine``), ``fct.normalized``, ``fct.data_hash`` (DVC),
  ``fct.git_commit``;
- a transformation (FCT: Ramanujan et al., CVPR 2022, arXiv 2112.02805): its source,
  target and side-info models (``fct.source_label/_sha256/_version``, ``fct.target_*``,
  ``fct.side_info_*``; see :func:`transformation_tags`) and its measured cross-model
  ``fct.cmc_top1``, ``fct.cmc_top5``, ``fct.map`` (fractions in [0, 1]).

Aliases (e.g. ``champion``) replace the deprecated stages and are resolved only
through ``MlflowClient.get_model_version_by_alias``. The default store needs no
server: SQLite at ``<root>/registry/mlflow.db`` with artifacts under
``<root>/registry/artifacts``. This is the only module that imports mlflow.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args

from fct_registry.chains import Edge
from fct_registry.embedding_set import ModelRef
from fct_registry.errors import RegistryError

Role = Literal["backbone", "side-info", "transformation"]
ROLES: tuple[str, ...] = get_args(Role)
TAG_PREFIX = "fct."
EXPERIMENT_NAME = "fct-registry"
_IDENTITY_TAGS = ("fct.role", "fct.label", "fct.sha256")
_EDGE_TAGS = ("fct.source_label", "fct.source_sha256", "fct.target_label", "fct.target_sha256")


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


def default_tracking_uri(root: str | os.PathLike) -> str:
    """The embedded store: ``sqlite:///<root>/registry/mlflow.db`` (absolute path)."""
    return f"sqlite:///{Path(root).resolve() / 'registry' / 'mlflow.db'}"


class ModelRegistry:
    """Register, tag, alias and fetch ONNX models in an MLflow tracking/registry store.

    Args:
        root: Project root; holds ``registry/`` (SQLite store, artifacts, downloads).
        tracking_uri: Tracking and registry URI (e.g. from ``params.yaml``). When None,
            ``MLFLOW_TRACKING_URI`` is used if set, else :func:`default_tracking_uri`.
        prefix: Registered model names are ``f"{prefix}-{role}"``.

    Nothing is started: the store is opened on first use. :meth:`register` needs the
    fluent MLflow API (``log_model``; the registry store resolves ``models:/<id>``
    through it), so it sets the process-wide tracking URI for the call and restores
    it afterwards; everything else goes through an ``MlflowClient`` bound to the URI.
    """

    def __init__(self, root: str | os.PathLike = ".", tracking_uri: str | None = None, prefix: str = "fct"):
        self.root = Path(root).resolve()
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)
        self.prefix = prefix
        self._experiment: str | None = None

    @cached_property
    def _client(self) -> Any:
        """``MlflowClient`` bound to :attr:`tracking_uri` (opening a SQLite store creates it)."""
        from mlflow import MlflowClient

        if self.tracking_uri == default_tracking_uri(self.root):
            (self.root / "registry").mkdir(parents=True, exist_ok=True)
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    # ----- names and lookups -------------------------------------------------------------------

    def model_name(self, role: str) -> str:
        """Registered model name of a role, e.g. ``"fct-backbone"``.

        Raises:
            RegistryError: ``role`` is not one of :data:`ROLES`.
        """
        if role not in ROLES:
            raise RegistryError(f"unknown model role {role!r}; expected one of {', '.join(ROLES)}")
        return f"{self.prefix}-{role}"

    def versions(self, role: str) -> list[RegisteredVersion]:
        """All versions of a role, oldest first, with their aliases (empty when none is registered)."""
        name = self.model_name(role)
        found = self._search(f"name = '{name}'")
        if not found:
            return []
        aliases = self._client.get_registered_model(name).aliases  # search results carry none
        return sorted(
            (replace(v, aliases=tuple(sorted(a for a, n in aliases.items() if int(n) == v.version))) for v in found),
            key=lambda v: v.version,
        )

    def get(self, role: str, version_or_label: str | int) -> RegisteredVersion:
        """Look up a version by MLflow version number, project label or ``@alias``.

        Args:
            role: Model role.
            version_or_label: An int or digit string is an MLflow version number;
                ``"@champion"`` resolves an alias (see :meth:`resolve_alias`); anything
                else is a label (``"v2"``) and selects the newest version with it.

        Raises:
            RegistryError: Unknown version or label (message lists the known ones), or
                an alias that does not resolve.
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
        """Point ``alias`` (e.g. ``champion``) at a version (number, label or ``@alias``).

        Raises:
            RegistryError: Unknown version, or MLflow refuses the alias name (``v<n>``
                is reserved by MLflow).
        """
        from mlflow.exceptions import MlflowException

        chosen = self.get(role, version)
        try:
            self._client.set_registered_model_alias(chosen.name, alias, str(chosen.version))
        except MlflowException as e:
            raise RegistryError(f"cannot set alias {alias!r} on {chosen}: {_first_line(e)}") from e
        return self.get(role, chosen.version)

    def resolve_alias(self, role: str, alias: str) -> RegisteredVersion:
        """The version an alias points to, via ``get_model_version_by_alias`` only.

        Raises:
            RegistryError: The alias was never set, or the version it pointed to was
                deleted (MLflow drops aliases of deleted versions).
        """
        from mlflow.exceptions import MlflowException

        name = self.model_name(role)
        try:
            found = self._client.get_model_version_by_alias(name, alias)
        except MlflowException as e:
            raise RegistryError(
                f"alias {alias!r} of {name} points to no existing version (never set, or its version "
                f"was deleted): {_first_line(e)}"
            ) from e
        return self._to_version(found)

    # ----- writing -----------------------------------------------------------------------------

    def register(
        self,
        onnx_path: str | os.PathLike,
        role: str,
        ref: ModelRef,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> RegisteredVersion:
        """Log an ONNX file with MLflow's ONNX flavor and register it as a model version.

        Idempotent by content: when a version of ``role`` with the same ``fct.sha256``
        exists it is returned unchanged and nothing is logged.

        Args:
            onnx_path: Self-contained ``.onnx`` file (no external-data sidecar).
            role: ``"backbone"``, ``"side-info"`` or ``"transformation"``.
            ref: Identity of the file; ``ref.sha256`` must equal the file's sha256.
            tags: Extra version tags; a key without the ``fct.`` prefix gets it; values
                that are not strings are stored as JSON (``True`` -> ``"true"``).
            params: Training params, logged to the run and stored as ``fct.params`` JSON.
            metrics: Measured metrics (fractions in [0, 1], e.g. ``cmc_top1``, ``map``),
                logged to the run and stored as ``fct.<key>`` tags.

        Returns:
            The new (or already registered) version.

        Raises:
            RegistryError: Missing file, sha256 mismatch with ``ref``, the same bytes
                registered under another label, a transformation without the
                source/target tags of :func:`transformation_tags`, or MLflow refusing
                the run or version (e.g. an invalid param name).
        """
        path = Path(onnx_path)
        if not path.is_file():
            raise RegistryError(f"ONNX file {path} does not exist")
        sha = file_sha256(path)
        if sha != ref.sha256:
            raise RegistryError(f"{path} has sha256 {sha[:12]}, but its ModelRef {ref} expects {ref.sha256[:12]}")
        name = self.model_name(role)
        existing = self._search(f"name = '{name}' AND tags.`fct.sha256` = '{sha}'")
        if existing:
            return _same_label(existing[0], ref)
        version_tags = {
            **format_tags(tags or {}),
            **format_tags(metrics or {}),
            "fct.role": role,
            "fct.label": ref.label,
            "fct.sha256": sha,
            "fct.params": json.dumps(dict(params or {}), sort_keys=True, default=str),
        }
        if role == "transformation":
            _require_tags(version_tags, _EDGE_TAGS, f"transformation {ref} (see transformation_tags())")
        from mlflow.exceptions import MlflowException

        # The registry store itself resolves ``models:/<id>`` through the process-wide URI.
        with _fluent_tracking_uri(self.tracking_uri):
            try:
                model_uri, model_id, run_id = self._log_onnx(path, name, ref, version_tags, params or {},
                                                             metrics or {})
                return self._create_version(name, model_uri, model_id, run_id, version_tags)
            except MlflowException as e:
                raise RegistryError(f"cannot register {path} as {name} {ref}: {_first_line(e)}") from e

    def set_tags(self, version: RegisteredVersion, tags: Mapping[str, Any]) -> RegisteredVersion:
        """Add or overwrite version tags (e.g. metrics measured after registration).

        Keys and values are formatted as in :meth:`register`. Returns the refreshed version.

        Raises:
            RegistryError: A tag would change the version's identity (role, label, sha256).
        """
        formatted = format_tags(tags)
        changed = [k for k in _IDENTITY_TAGS if k in formatted and formatted[k] != version.tags.get(k)]
        if changed:
            raise RegistryError(f"refusing to change identity tags {', '.join(changed)} of {version}")
        for key, value in formatted.items():
            self._client.set_model_version_tag(version.name, str(version.version), key, value)
        return self.get(version.role, version.version)

    def log_run(
        self,
        name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, Any],
        artifacts: Iterable[str | os.PathLike] = (),
        metrics: Mapping[str, float] | None = None,
    ) -> str:
        """Record a finished piece of work (e.g. an upgrade: input set, chain, output set) as a run.

        Args:
            name: Run name, e.g. ``"upgrade gallery-v1 -> v3"``.
            params: Run params (stringified by MLflow).
            tags: Run tags, formatted as in :meth:`register` (``fct.`` prefix, JSON values).
            artifacts: Files or directories to attach (a directory keeps its name).
            metrics: Optional numeric results (e.g. ``rows``, ``seconds``).

        Returns:
            The MLflow run id.
        """
        from mlflow.entities import Metric, Param

        run = self._client.create_run(self._experiment_id(), run_name=name, tags=format_tags(tags))
        run_id = run.info.run_id
        status = "FAILED"
        try:
            now = int(time.time() * 1000)
            self._client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
                params=[Param(k, str(v)) for k, v in params.items()],
            )
            for artifact in map(Path, artifacts):
                if artifact.is_dir():
                    self._client.log_artifacts(run_id, str(artifact), artifact_path=artifact.name)
                else:
                    self._client.log_artifact(run_id, str(artifact))
            status = "FINISHED"
        finally:
            self._client.set_terminated(run_id, status)
        return run_id

    # ----- reading models back -----------------------------------------------------------------

    def onnx_path(self, version: RegisteredVersion) -> Path:
        """Local path of a version's ONNX file, downloaded once into ``<root>/registry/downloads``.

        The file is checked against the version's ``fct.sha256``; a cached copy that no
        longer matches is fetched again. The download goes to a temp dir beside the
        cache and is moved in atomically.

        Raises:
            RegistryError: The artifact cannot be downloaded or its bytes do not match
                ``fct.sha256`` (corrupted store).
        """
        from mlflow.exceptions import MlflowException

        cached = self.root / "registry" / "downloads" / version.name / str(version.version) / "model.onnx"
        if cached.is_file() and file_sha256(cached) == version.ref.sha256:
            return cached
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".tmp-") as tmp:
            try:
                local = Path(self._download_model_dir(version, Path(tmp)))
            except (MlflowException, OSError) as e:
                raise RegistryError(f"cannot download {version}: {_first_line(e)}") from e
            onnx_file = local / _onnx_data_file(local)
            if file_sha256(onnx_file) != version.ref.sha256:
                raise RegistryError(f"ONNX artifact of {version} does not match its fct.sha256 (corrupted store)")
            os.replace(onnx_file, cached)
        return cached

    def transformation_edges(self) -> list[Edge]:
        """The compatibility graph's edges: one :class:`~fct_registry.chains.Edge` per transformation.

        ``Edge.map`` is the version's ``fct.map`` tag (None when absent).

        Raises:
            RegistryError: A transformation version lacks its source/target tags.
        """
        edges = []
        for version in self.versions("transformation"):
            tags = version.tags
            _require_tags(tags, _EDGE_TAGS, str(version))
            side = _ref_from_tags(tags, "side_info") if "fct.side_info_sha256" in tags else None
            edges.append(Edge(
                source=_ref_from_tags(tags, "source"),
                target=_ref_from_tags(tags, "target"),
                side_info=side,
                transformation=f"{version.name}/{version.version}",
                map=float(tags["fct.map"]) if "fct.map" in tags else None,
            ))
        return edges

    # ----- MLflow plumbing ---------------------------------------------------------------------

    def _search(self, filter_string: str) -> list[RegisteredVersion]:
        return [self._to_version(mv) for mv in self._client.search_model_versions(filter_string)]

    def _to_version(self, mv: Any) -> RegisteredVersion:
        tags = dict(mv.tags)
        _require_tags(tags, _IDENTITY_TAGS, f"{mv.name}/{mv.version}")
        return RegisteredVersion(
            name=mv.name,
            version=int(mv.version),
            role=tags["fct.role"],
            ref=ModelRef(label=tags["fct.label"], sha256=tags["fct.sha256"]),
            tags=tags,
            aliases=tuple(sorted(mv.aliases)),
        )

    def _experiment_id(self) -> str:
        """Id of the ``fct-registry`` experiment, created with artifacts under ``registry/artifacts``."""
        if self._experiment is None:
            found = self._client.get_experiment_by_name(EXPERIMENT_NAME)
            if found is not None:
                self._experiment = found.experiment_id
            else:
                location = None
                if self.tracking_uri.startswith("sqlite:"):
                    location = (self.root / "registry" / "artifacts").as_uri()
                self._experiment = self._client.create_experiment(EXPERIMENT_NAME, artifact_location=location)
        return self._experiment

    def _log_onnx(
        self, path: Path, name: str, ref: ModelRef, tags: Mapping[str, str],
        params: Mapping[str, Any], metrics: Mapping[str, float],
    ) -> tuple[str, str, str]:
        """Log the ONNX bytes (ONNX flavor, no external data) in a new run; returns (uri, model id, run id)."""
        import mlflow
        import mlflow.onnx

        with mlflow.start_run(experiment_id=self._experiment_id(), run_name=f"register {name} {ref}") as run:
            mlflow.set_tags(tags)
            mlflow.log_params({k: str(v) for k, v in params.items()})
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
            info = mlflow.onnx.log_model(
                path.read_bytes(),
                name="model",
                save_as_external_data=False,
                pip_requirements=mlflow.onnx.get_default_pip_requirements(),
            )
        return info.model_uri, info.model_id, run.info.run_id

    def _create_version(
        self, name: str, model_uri: str, model_id: str, run_id: str, tags: Mapping[str, str]
    ) -> RegisteredVersion:
        """Create the registered model if needed, then one version carrying all its tags at once."""
        from mlflow.exceptions import MlflowException

        try:
            self._client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise RegistryError(f"cannot create registered model {name}: {_first_line(e)}") from e
        mv = self._client.create_model_version(name, source=model_uri, run_id=run_id, tags=dict(tags),
                                               model_id=model_id)
        return self._to_version(mv)

    def _download_model_dir(self, version: RegisteredVersion, dst: Path) -> str:
        import mlflow.artifacts

        uri = self._client.get_model_version_download_uri(version.name, str(version.version))
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst),
                                                   tracking_uri=self.tracking_uri)


def format_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """``fct.``-prefixed keys and string values (strings kept, anything else as JSON)."""
    return {
        (key if key.startswith(TAG_PREFIX) else TAG_PREFIX + key): (
            value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        )
        for key, value in tags.items()
    }


@contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at ``uri`` for the block, then restore it.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``; restoring the
    variable's previous value (None unsets both) leaves the process as it was.
    """
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def _onnx_data_file(model_dir: Path) -> str:
    """Relative path of the ONNX file inside a downloaded MLflow model dir (from its MLmodel)."""
    from mlflow.models import Model

    return Model.load(str(model_dir / "MLmodel")).flavors["onnx"]["data"]


def _same_label(existing: RegisteredVersion, ref: ModelRef) -> RegisteredVersion:
    """Return ``existing`` when it carries ``ref``'s label; identical bytes under two labels is an error."""
    if existing.ref.label != ref.label:
        raise RegistryError(
            f"these ONNX bytes are already registered as {existing}; refusing to register them again as {ref.label!r}"
        )
    return existing


def _require_tags(tags: Mapping[str, str], keys: Iterable[str], what: str) -> None:
    """Raise RegistryError naming ``what`` and every key of ``keys`` missing from ``tags``."""
    missing = [k for k in keys if k not in tags]
    if missing:
        raise RegistryError(f"{what} lacks tags {', '.join(missing)}")


def _ref_from_tags(tags: Mapping[str, str], prefix: str) -> ModelRef:
    return ModelRef(label=tags[f"fct.{prefix}_label"], sha256=tags[f"fct.{prefix}_sha256"])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
