"""The MLflow side of the registry: the only module that imports mlflow.

:class:`MlflowStore` turns MLflow's client and fluent APIs into a few plain operations (search versions, aliases,
tags, log a run, log + register an ONNX file, download it) and MLflow's exceptions into
:class:`~fct_registry.core.errors.RegistryError` with one line. The default store needs no server: SQLite at
``<root>/registry/mlflow.db`` with artifacts under ``<root>/registry/artifacts``. Aliases (e.g. ``champion``) replace
the deprecated stages and are resolved only through ``MlflowClient.get_model_version_by_alias``.

The embedded store is created (tables and migrations) once, by the first writer, under a file lock
(``mlflow.db.lock`` beside it), so processes that start at the same moment never migrate it twice; a store left
half-migrated is reported with how to recover, never used. Reading a store that does not exist yet sees an empty
registry and creates nothing. Listing an embedded store's versions and aliases skips mlflow altogether when
:class:`~fct_registry.registry.sqlite_reader.SqliteReader` can read them as MLflow would (read-only, milliseconds).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

from fct_registry.core.errors import RegistryError
from fct_registry.core.refs import ModelRef
from fct_registry.registry.onnx_io import OnnxIO
from fct_registry.registry.sqlite_reader import SqliteReader, interrupted_migration_tables
from fct_registry.registry.versions import RegisteredVersion, format_tags, has_identity, version_from_tags

EXPERIMENT_NAME = "fct-registry"
DB_FILE = "mlflow.db"
LOCK_FILE = "mlflow.db.lock"
STORE_LOCK_TIMEOUT_S = 600


def default_tracking_uri(root: str | os.PathLike) -> str:
    """The embedded store: ``sqlite:///<root>/registry/mlflow.db`` (absolute path)."""
    return f"sqlite:///{Path(root).resolve() / 'registry' / DB_FILE}"


class MlflowStore:
    """MLflow tracking + model registry behind one URI; nothing is opened until first use.

    Args:
        tracking_uri: Tracking and registry URI (``sqlite:///...``, ``http://host:port``, ...).
        local_root: For the embedded SQLite store, the folder that holds ``mlflow.db`` and ``artifacts/``
            (created on first use); None for a remote store.
    """

    def __init__(self, tracking_uri: str, local_root: Path | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.local_root = local_root
        self._experiment: str | None = None
        self._reader = SqliteReader(local_root / DB_FILE) if local_root is not None else None

    @property
    def exists(self) -> bool:
        """False only for an embedded store whose database file has not been created yet."""
        return self.local_root is None or (self.local_root / DB_FILE).is_file()

    @cached_property
    def client(self) -> Any:
        """``MlflowClient`` bound to :attr:`tracking_uri`; an embedded store is created or checked first.

        Raises:
            RegistryError: the embedded store is broken (half-applied migration, unknown schema revision).
        """
        from mlflow import MlflowClient

        if self.local_root is not None:
            prepare_sqlite_store(self.tracking_uri, self.local_root)
        else:  # over a tracking server MLflow writes "View run/experiment at <url>" to stdout after every run
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
            # MLflow's default (7 retries with backoff) takes minutes to report a server that is down
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def search_versions(self, filter_string: str) -> list[RegisteredVersion]:
        """Model versions matching an MLflow filter string (without aliases: search results carry none); none
        when the embedded store does not exist yet. Read without mlflow when the store's reader can."""
        if not self.exists:
            return []
        read = self._reader.search_versions(filter_string) if self._reader is not None else None
        if read is not None:
            return read
        return [_to_version(mv) for mv in self.client.search_model_versions(filter_string) if has_identity(mv.tags)]

    def aliases(self, name: str) -> dict[str, int]:
        """``{alias: version number}`` of a registered model (read without mlflow when the store's reader can)."""
        read = self._reader.aliases(name) if self._reader is not None else None
        if read is not None:
            return read
        return {alias: int(number) for alias, number in self.client.get_registered_model(name).aliases.items()}

    def version_by_alias(self, name: str, alias: str) -> RegisteredVersion:
        """The version ``alias`` points to.

        Raises:
            RegistryError: the alias was never set, or its version was deleted, or nothing is registered yet.
        """
        from mlflow.exceptions import MlflowException

        if not self.exists:
            raise RegistryError(f"alias {alias!r} of {name} points to no version: nothing is registered yet "
                                f"(no store at {self.local_root})")
        try:
            return _to_version(self.client.get_model_version_by_alias(name, alias))
        except MlflowException as e:
            raise RegistryError(f"alias {alias!r} of {name} points to no existing version (never set, or its "
                                f"version was deleted): {first_line(e)}") from e

    def set_alias(self, version: RegisteredVersion, alias: str) -> None:
        """Point ``alias`` at ``version``.

        Raises:
            RegistryError: MLflow refuses the alias name (``v<n>`` is reserved by MLflow).
        """
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_registered_model_alias(version.name, alias, str(version.version))
        except MlflowException as e:
            raise RegistryError(f"cannot set alias {alias!r} on {version}: {first_line(e)}") from e

    def set_tags(self, version: RegisteredVersion, tags: Mapping[str, str]) -> None:
        """Add or overwrite string tags of a version."""
        for key, value in tags.items():
            self.client.set_model_version_tag(version.name, str(version.version), key, value)

    def log_run(self, name: str, params: Mapping[str, Any], tags: Mapping[str, Any],
                artifacts: Iterable[str | os.PathLike] = (), metrics: Mapping[str, float] | None = None) -> str:
        """Record a finished piece of work as a run of the ``fct-registry`` experiment; returns the run id.

        Tags are formatted as in :func:`~fct_registry.registry.versions.format_tags`; a directory artifact keeps
        its name. The run ends FINISHED, or FAILED when logging raised.
        """
        from mlflow.entities import Metric, Param

        run_id = self.client.create_run(self._experiment_id(), run_name=name, tags=format_tags(tags)).info.run_id
        status = "FAILED"
        try:
            now = int(time.time() * 1000)
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
                                  params=[Param(k, str(v)) for k, v in params.items()])
            for artifact in map(Path, artifacts):
                if artifact.is_dir():
                    self.client.log_artifacts(run_id, str(artifact), artifact_path=artifact.name)
                else:
                    self.client.log_artifact(run_id, str(artifact))
            status = "FINISHED"
        finally:
            self.client.set_terminated(run_id, status)
        return run_id

    def run_ids(self, filter_string: str) -> list[str]:
        """Ids of the ``fct-registry`` experiment's runs matching an MLflow run filter (e.g.
        ``params.output_set = '...'``); none when the store or the experiment does not exist yet."""
        if not self.exists:
            return []
        experiment = self.client.get_experiment_by_name(EXPERIMENT_NAME)
        if experiment is None:
            return []
        runs = self.client.search_runs([experiment.experiment_id], filter_string=filter_string)
        return [run.info.run_id for run in runs]

    def register_onnx(self, path: Path, name: str, ref: ModelRef, tags: Mapping[str, str],
                      params: Mapping[str, Any], metrics: Mapping[str, float], io: OnnxIO | None = None
                      ) -> RegisteredVersion:
        """Log ONNX bytes with MLflow's ONNX flavor (signature: ``io``) in a new run and register them as a version.

        Raises:
            RegistryError: MLflow refuses the run or the version (e.g. an invalid param name).
        """
        from mlflow.exceptions import MlflowException

        # The registry store itself resolves ``models:/<id>`` through the process-wide URI.
        with _fluent_tracking_uri(self.tracking_uri):
            try:
                model_uri, model_id, run_id = self._log_onnx(path, name, ref, tags, params, metrics, io)
                return _create_version(self.client, name, model_uri, model_id, run_id, tags)
            except MlflowException as e:
                raise RegistryError(f"cannot register {path} as {name} {ref}: {first_line(e)}") from e

    def delete_version(self, version: RegisteredVersion) -> None:
        """Delete a model version (its run and artifacts stay, as MLflow keeps them)."""
        self.client.delete_model_version(version.name, str(version.version))

    def download_onnx(self, version: RegisteredVersion, dst: Path) -> Path:
        """Download a version's model folder into ``dst``; returns the path of its ONNX file there.

        Raises:
            RegistryError: the artifact cannot be downloaded.
        """
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException
        from mlflow.models import Model

        try:
            uri = self.client.get_model_version_download_uri(version.name, str(version.version))
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst),
                                                             tracking_uri=self.tracking_uri))
        except (MlflowException, OSError) as e:
            raise RegistryError(f"cannot download {version}: {first_line(e)}") from e
        return local / Model.load(str(local / "MLmodel")).flavors["onnx"]["data"]

    def _experiment_id(self) -> str:
        """Id of the ``fct-registry`` experiment (artifacts under ``<local_root>/artifacts`` for SQLite)."""
        from mlflow.exceptions import MlflowException

        if self._experiment is None:
            found = self.client.get_experiment_by_name(EXPERIMENT_NAME)
            if found is None:
                location = (self.local_root / "artifacts").as_uri() if self.local_root is not None else None
                try:
                    self._experiment = self.client.create_experiment(EXPERIMENT_NAME, artifact_location=location)
                    return self._experiment
                except MlflowException as e:  # another process created it first
                    if e.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise RegistryError(f"cannot create experiment {EXPERIMENT_NAME}: {first_line(e)}") from e
                    found = self.client.get_experiment_by_name(EXPERIMENT_NAME)
            self._experiment = found.experiment_id
        return self._experiment

    def _log_onnx(self, path: Path, name: str, ref: ModelRef, tags: Mapping[str, str], params: Mapping[str, Any],
                  metrics: Mapping[str, float], io: OnnxIO | None) -> tuple[str, str, str]:
        """Log the ONNX bytes (ONNX flavor, no external data) in a new run; returns (uri, model id, run id)."""
        import mlflow
        import mlflow.onnx

        logged_name = "".join("-" if c in "/:.%\"'" else c for c in f"{tags.get('fct.role', 'model')}-{ref.label}")
        with mlflow.start_run(experiment_id=self._experiment_id(), run_name=f"{name} · {ref.label}") as run:
            mlflow.set_tags(tags)
            mlflow.log_params({k: str(v) for k, v in params.items()})
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
            info = mlflow.onnx.log_model(path.read_bytes(), name=logged_name, save_as_external_data=False,
                                         signature=_signature(io),
                                         pip_requirements=mlflow.onnx.get_default_pip_requirements())
        return info.model_uri, info.model_id, run.info.run_id


def _create_version(client: Any, name: str, model_uri: str, model_id: str, run_id: str, tags: Mapping[str, str]
                    ) -> RegisteredVersion:
    """Create the registered model if needed, then one version carrying all its tags at once."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise RegistryError(f"cannot create registered model {name}: {first_line(e)}") from e
    mv = client.create_model_version(name, source=model_uri, run_id=run_id, tags=dict(tags), model_id=model_id)
    return _to_version(mv)


def name_run(store: MlflowStore, version: RegisteredVersion, title: str, note: str) -> None:
    """Name the run that logged ``version`` ``title`` and give it the Markdown description ``note``."""
    run_id = store.client.get_model_version(version.name, str(version.version)).run_id
    if run_id:
        store.client.update_run(run_id, name=title)
        store.client.set_tag(run_id, "mlflow.note.content", note)


def set_descriptions(store: MlflowStore, name: str, model_text: str, version_texts: Mapping[int, str]) -> None:
    """Set the Markdown descriptions of the registered model ``name`` and of its versions (only those that differ)."""
    if (store.client.get_registered_model(name).description or "") != model_text:
        store.client.update_registered_model(name, description=model_text)
    from mlflow.exceptions import MlflowException

    for mv in store.client.search_model_versions(f"name = '{name}'"):
        text = version_texts.get(int(mv.version))
        if text is not None and (mv.description or "") != text:
            try:
                store.client.update_model_version(name, mv.version, description=text)
            except MlflowException as e:  # deleted meanwhile by another process (a duplicate it registered)
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise


def keep_run_files(store: MlflowStore, kind: str, run_name: str, digest: str, write: Callable[[Path], None],
                   note: str = "") -> tuple[str, str]:
    """Keep one run tagged ``fct.kind = kind`` whose files are what ``write(folder)`` makes for ``digest``.

    The oldest such run is reused (created, named ``run_name``, when there is none); its files are logged again, and
    its description set to ``note``, only when its ``fct.digest`` tag is not ``digest``. Returns (experiment id,
    run id).
    """
    from mlflow.entities import RunTag

    client, experiment = store.client, store._experiment_id()
    runs = client.search_runs([experiment], filter_string=f"tags.`fct.kind` = '{kind}'",
                              order_by=["attributes.start_time ASC"], max_results=1)
    if runs and runs[0].data.tags.get("fct.digest") == digest:
        return experiment, runs[0].info.run_id
    run_id = runs[0].info.run_id if runs else client.create_run(experiment, run_name=run_name,
                                                                 tags={"fct.kind": kind}).info.run_id
    with tempfile.TemporaryDirectory() as folder:
        write(Path(folder))
        client.log_artifacts(run_id, folder)
    client.log_batch(run_id, tags=[RunTag("fct.digest", digest), RunTag("mlflow.note.content", note)])
    if not runs:
        client.set_terminated(run_id)
    return experiment, run_id


def prepare_sqlite_store(tracking_uri: str, local_root: Path) -> None:
    """Create or check the embedded store at ``tracking_uri`` under ``<local_root>/mlflow.db.lock``.

    The first process to hold the lock creates the tables and applies MLflow's migrations; every later one finds
    them complete. Waiting for the lock is bounded by :data:`STORE_LOCK_TIMEOUT_S` seconds.

    Raises:
        RegistryError: the lock is not released in time, or the store is broken: leftover ``_alembic_tmp_*``
            tables of an interrupted migration, or a schema revision other than this MLflow's head (the message
            says how to recover).
    """
    from filelock import FileLock, Timeout
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    local_root.mkdir(parents=True, exist_ok=True)
    db = local_root / DB_FILE
    recovery = (f"back up {db}, then run `mlflow db upgrade {tracking_uri}`, or restore the backup, or move "
                f"{local_root} away to start an empty registry")
    try:
        with FileLock(local_root / LOCK_FILE, timeout=STORE_LOCK_TIMEOUT_S):
            leftovers = interrupted_migration_tables(db)
            if leftovers:
                raise RegistryError(f"registry store {db} is broken: an interrupted migration left "
                                    f"{', '.join(leftovers)}; {recovery}")
            try:
                SqlAlchemyStore(tracking_uri, (local_root / "artifacts").as_uri())
            except MlflowException as e:
                raise RegistryError(f"registry store {db} is not usable ({first_line(e)}); {recovery}") from e
    except Timeout as e:
        raise RegistryError(f"registry store {db} stayed locked for {STORE_LOCK_TIMEOUT_S} s by another "
                            f"process ({local_root / LOCK_FILE}); retry when it has finished") from e


def _signature(io: OnnxIO | None) -> Any:
    """MLflow's ``ModelSignature`` of tensor specs for ``io`` (None without it)."""
    if io is None:
        return None
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def schema(tensors: Iterable[Any]) -> Any:
        return Schema([TensorSpec(np.dtype(t.dtype), t.shape, t.name) for t in tensors])

    return ModelSignature(inputs=schema(io.inputs), outputs=schema(io.outputs))


def _to_version(mv: Any) -> RegisteredVersion:
    return version_from_tags(mv.name, mv.version, mv.tags, mv.aliases)


@contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at ``uri`` for the block, then restore it.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``; restoring the variable's previous value
    (None unsets both) leaves the process as it was.
    """
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
