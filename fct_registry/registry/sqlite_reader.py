"""Read-only answers from the embedded MLflow store's SQLite file, without importing mlflow.

Listing what is registered (``models list``, ``sets list``, ``lineage``) needs only a registered model's versions
with their tags, and its aliases. Importing mlflow and building its SQLAlchemy stores to read them takes seconds;
reading the same rows with :mod:`sqlite3` takes milliseconds. :class:`SqliteReader` does that, reproducing the
queries of MLflow 3.17's SQLAlchemy model registry store (``mlflow/store/model_registry/sqlalchemy_store.py``:
``search_model_versions`` and ``get_registered_model``): default workspace only, deleted versions and prompts left
out, MLflow's default order and page size.

It answers only when it can answer exactly as MLflow would: the database exists, its schema revision is one this
code was written for (:data:`KNOWN_SCHEMA_HEADS`) and the installed MLflow's head, no migration was interrupted,
workspaces are off and every object is in the default workspace, and the query is one it knows. Otherwise, or on
any :mod:`sqlite3` error, it answers None and the caller asks MLflow (which also reports a broken store).

The file is opened read-only (``mode=ro``): the reader never creates, writes or locks a file (SQLite's shared read
lock is an advisory lock on the database itself; no journal or lock file is made).
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Callable
from contextlib import closing
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import TypeVar

from fct_registry.registry.versions import RegisteredVersion, has_identity, version_from_tags

KNOWN_SCHEMA_HEADS = frozenset({"dc11669786a5"})
"""Alembic revisions of MLflow's schema whose tables and columns this reader was written for: the head of MLflow
3.17's migrations (``mlflow/store/db_migrations/versions``). After an MLflow upgrade, check the model registry's
tables (``mlflow/store/model_registry/dbmodels/models.py``) and the store's queries again, then replace the head
here; until then the reader is not used and tests/registry/test_sqlite_reader.py fails."""

DEFAULT_WORKSPACE = "default"  # mlflow.utils.workspace_utils.DEFAULT_WORKSPACE_NAME
DELETED_STAGE = "Deleted_Internal"  # mlflow.entities.model_registry.model_version_stages.STAGE_DELETED_INTERNAL
PROMPT_TAG = "mlflow.prompt.is_prompt"  # mlflow.prompt.constants.IS_PROMPT_TAG_KEY
MAX_RESULTS = 10000  # mlflow.store.model_registry.SEARCH_MODEL_VERSION_MAX_RESULTS_DEFAULT
NAME_FILTER = re.compile(r"name = '([\w.-]+)'")
"""The only search filter answered here: the one ``ModelRegistry.versions`` uses."""

_LEFTOVERS = r"SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '\_alembic\_tmp\_%' ESCAPE '\'"
_FOREIGN = ("SELECT 1 FROM registered_models WHERE workspace != :ws UNION ALL "
            "SELECT 1 FROM webhooks WHERE workspace != :ws UNION ALL "
            "SELECT 1 FROM experiments WHERE workspace != :ws LIMIT 1")
_VERSIONS = ("SELECT mv.name, mv.version FROM model_versions AS mv WHERE mv.workspace = :ws AND mv.name = :name "
             "AND mv.current_stage != :deleted AND NOT EXISTS (SELECT 1 FROM model_version_tags AS p "
             "WHERE p.workspace = mv.workspace AND p.name = mv.name AND p.key = :prompt AND p.value = 'true') "
             "ORDER BY mv.last_updated_time DESC, mv.name ASC, mv.version DESC LIMIT :limit")
_TAGS = "SELECT version, key, value FROM model_version_tags WHERE workspace = :ws AND name = :name"
T = TypeVar("T")


class SqliteReader:
    """Versions and aliases read straight from MLflow's SQLite database ``db`` (None: ask MLflow instead)."""

    def __init__(self, db: Path) -> None:
        self.db = db

    def search_versions(self, filter_string: str) -> list[RegisteredVersion] | None:
        """What ``MlflowClient.search_model_versions(filter_string)`` gives, as versions without aliases; None for
        any filter other than ``name = '<name>'``, or when the reader cannot answer."""
        match = NAME_FILTER.fullmatch(filter_string)
        if match is None:
            return None
        params = {"ws": DEFAULT_WORKSPACE, "name": match.group(1), "deleted": DELETED_STAGE, "prompt": PROMPT_TAG,
                  "limit": MAX_RESULTS}

        def query(connection: sqlite3.Connection) -> list[tuple[str, int, dict[str, str]]]:
            found = connection.execute(_VERSIONS, params).fetchall()
            tags: dict[int, dict[str, str]] = {version: {} for _, version in found}
            for version, key, value in connection.execute(_TAGS, params):
                if version in tags:
                    tags[version][key] = value
            return [(name, version, tags[version]) for name, version in found]

        rows = self._read(query)
        return None if rows is None else [version_from_tags(name, version, tags) for name, version, tags in rows
                                          if has_identity(tags)]

    def aliases(self, name: str) -> dict[str, int] | None:
        """``{alias: version number}`` of a registered model, as ``MlflowClient.get_registered_model`` gives them;
        None when the model does not exist (MLflow raises) or the reader cannot answer."""
        params = {"ws": DEFAULT_WORKSPACE, "name": name}

        def query(connection: sqlite3.Connection) -> dict[str, int] | None:
            if connection.execute("SELECT 1 FROM registered_models WHERE workspace = :ws AND name = :name",
                                  params).fetchone() is None:
                return None
            rows = connection.execute("SELECT alias, version FROM registered_model_aliases WHERE workspace = :ws "
                                      "AND name = :name", params)
            return {alias: int(version) for alias, version in rows}

        return self._read(query)

    def _read(self, query: Callable[[sqlite3.Connection], T]) -> T | None:
        """``query``'s answer, read in one transaction of a read-only connection; None when the store is not one
        this reader knows, or on any sqlite3 error."""
        if _workspaces_enabled() or not self.db.is_file():
            return None
        try:
            uri = f"{self.db.resolve().as_uri()}?mode=ro"
            with closing(sqlite3.connect(uri, uri=True, isolation_level=None)) as connection:
                connection.execute("BEGIN")
                return query(connection) if _known_schema(connection) else None
        except sqlite3.Error:
            return None


def interrupted_migration_tables(db: Path) -> list[str]:
    """Names of alembic's temporary tables in the SQLite file ``db`` (none when it does not exist)."""
    if not db.is_file():
        return []
    with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as connection:
        return sorted(name for (name,) in connection.execute(_LEFTOVERS))


@cache
def installed_schema_head() -> str | None:
    """The head revision of the installed MLflow's migrations, read once from their files without importing mlflow
    (what alembic's ``ScriptDirectory.get_heads`` finds); None when there is not exactly one."""
    spec = find_spec("mlflow")  # a top-level package: located, not imported
    if spec is None or spec.origin is None:
        return None
    revisions, parents = set(), set()
    try:
        for path in (Path(spec.origin).parent / "store" / "db_migrations" / "versions").glob("*.py"):
            text = path.read_text(encoding="utf-8")
            revisions.update(re.findall(r"""^revision\s*=\s*["']([0-9a-f]+)["']""", text, re.MULTILINE))
            for down in re.findall(r"^down_revision\s*=\s*(.*)$", text, re.MULTILINE):
                parents.update(re.findall(r"""["']([0-9a-f]+)["']""", down))
    except OSError:
        return None
    heads = revisions - parents
    return next(iter(heads)) if len(heads) == 1 else None


def _known_schema(connection: sqlite3.Connection) -> bool:
    """The database is at a known schema revision that the installed MLflow also expects, no migration was
    interrupted, and every experiment, registered model and webhook is in the default workspace."""
    revisions = [revision for (revision,) in connection.execute("SELECT version_num FROM alembic_version")]
    return (len(revisions) == 1 and revisions[0] in KNOWN_SCHEMA_HEADS and revisions[0] == installed_schema_head()
            and connection.execute(_LEFTOVERS).fetchone() is None
            and connection.execute(_FOREIGN, {"ws": DEFAULT_WORKSPACE}).fetchone() is None)


def _workspaces_enabled() -> bool:
    """``MLFLOW_ENABLE_WORKSPACES`` is set to anything but false (MLflow then uses its workspace-aware store)."""
    return os.environ.get("MLFLOW_ENABLE_WORKSPACES", "false").strip().lower() not in ("false", "0", "")
