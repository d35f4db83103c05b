"""The read-only SQLite fast path of the embedded store: it answers exactly what MLflow answers, only for a schema it
knows, creates no file, and lets the listings run without importing mlflow."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import factories
import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

from fct_registry.core.errors import RegistryError
from fct_registry.registry import sqlite_reader
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.sqlite_reader import KNOWN_SCHEMA_HEADS, SqliteReader, installed_schema_head
from fct_registry.registry.versions import ROLES, RegisteredVersion, version_from_tags


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> factories.World:
    return factories.fresh_world(tmp_path_factory)  # the tests below move aliases and delete a version


def reader_of(registry: ModelRegistry) -> SqliteReader:
    return SqliteReader(registry.root / "registry" / "mlflow.db")


def mlflow_versions(registry: ModelRegistry, name: str) -> list[RegisteredVersion]:
    """What MlflowStore.search_versions gives through MLflow."""
    client = registry.store.client
    return [version_from_tags(mv.name, mv.version, mv.tags, mv.aliases)
            for mv in client.search_model_versions(f"name = '{name}'")]


def mlflow_aliases(registry: ModelRegistry, name: str) -> dict[str, int]:
    return {alias: int(n) for alias, n in registry.store.client.get_registered_model(name).aliases.items()}


def assert_same_as_mlflow(registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """For every role: the reader answers (not None), exactly as MLflow does, and the registry's listings agree."""
    reader = reader_of(registry)
    for role in ROLES:
        name = registry.model_name(role)
        read = reader.search_versions(f"name = '{name}'")
        assert read is not None and read == mlflow_versions(registry, name), role
        assert reader.aliases(name) == mlflow_aliases(registry, name), role
    fast = {role: registry.versions(role) for role in ROLES}
    edges = registry.transformation_edges()
    with monkeypatch.context() as patch:
        patch.setattr(registry.store, "_reader", None)  # the MLflow path
        assert {role: registry.versions(role) for role in ROLES} == fast
        assert registry.transformation_edges() == edges


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def copy_store(world: factories.World, root: Path) -> ModelRegistry:
    """A project at ``root`` whose registry folder holds only a copy of the world's database."""
    (root / "registry").mkdir(parents=True)
    shutil.copy(world.root / "registry" / "mlflow.db", root / "registry" / "mlflow.db")
    return ModelRegistry(root)


def test_the_pinned_schema_is_the_installed_mlflow_head():
    import mlflow.store.db_migrations

    config = Config()
    config.set_main_option("script_location", os.path.dirname(mlflow.store.db_migrations.__file__))
    heads = ScriptDirectory.from_config(config).get_heads()
    assert heads == [installed_schema_head()]
    assert heads[0] in KNOWN_SCHEMA_HEADS, (
        f"MLflow's schema head is now {heads[0]}: check the model registry tables and queries sqlite_reader.py "
        "reproduces, then pin the new head in KNOWN_SCHEMA_HEADS")


def test_reader_answers_as_mlflow_through_tags_aliases_and_deletion(world: factories.World,
                                                                     monkeypatch: pytest.MonkeyPatch):
    registry = world.registry
    assert_same_as_mlflow(registry, monkeypatch)

    registry.set_tags(world.versions["v2"], {"note": "re-measured", "cmc_top1": 0.75})
    registry.set_tags(world.versions["h-v1-v2"], {"map": 0.64})
    registry.set_alias("backbone", "champion", world.versions["v2"].version)  # moved from v3
    registry.set_alias("backbone", "candidate", world.versions["v1"].version)
    registry.set_alias("transformation", "best", world.versions["h-v2-v3"].version)
    assert_same_as_mlflow(registry, monkeypatch)
    assert reader_of(registry).aliases("fct-backbone") == {"champion": 2, "candidate": 1}

    registry.store.client.delete_model_version("fct-backbone", str(world.versions["v1"].version))
    assert_same_as_mlflow(registry, monkeypatch)
    assert [v.ref.label for v in registry.versions("backbone")] == ["v2", "v3"]
    assert reader_of(registry).aliases("fct-backbone") == {"champion": 2}  # MLflow dropped the deleted one's alias


def test_other_filters_and_unknown_models_go_to_mlflow(world: factories.World):
    reader = reader_of(world.registry)
    sha = world.versions["v3"].ref.sha256
    assert reader.search_versions(f"name = 'fct-backbone' AND tags.`fct.sha256` = '{sha}'") is None
    assert reader.search_versions("name = 'fct-backbone' ") is None
    assert reader.search_versions("name = 'no-such-model'") == []  # as MLflow: no versions
    assert reader.aliases("no-such-model") is None  # MLflow raises: its error is the one to report
    found = world.registry.store.search_versions(f"name = 'fct-backbone' AND tags.`fct.sha256` = '{sha}'")
    assert [v.ref for v in found] == [world.versions["v3"].ref]


def test_an_unknown_schema_revision_falls_back_to_mlflow(world: factories.World, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    registry = copy_store(world, tmp_path / "known")
    fast = {role: registry.versions(role) for role in ROLES}
    with monkeypatch.context() as patch:  # a revision the code was not written for: MLflow answers, the same
        patch.setattr(sqlite_reader, "KNOWN_SCHEMA_HEADS", frozenset({"0123456789ab"}))
        assert reader_of(registry).search_versions("name = 'fct-backbone'") is None
        assert reader_of(registry).aliases("fct-backbone") is None
        assert {role: ModelRegistry(registry.root).versions(role) for role in ROLES} == fast

    other = copy_store(world, tmp_path / "other")
    with closing(sqlite3.connect(other.root / "registry" / "mlflow.db")) as connection, connection:
        connection.execute("UPDATE alembic_version SET version_num = '0123456789ab'")
    assert reader_of(other).search_versions("name = 'fct-backbone'") is None
    with pytest.raises(RegistryError, match="0123456789ab"):  # MLflow refuses the store; so does the listing
        other.versions("backbone")


def test_a_broken_file_falls_back_to_mlflow(tmp_path: Path):
    db = tmp_path / "registry" / "mlflow.db"
    db.parent.mkdir()
    db.write_bytes(b"not a database")
    assert SqliteReader(db).search_versions("name = 'fct-backbone'") is None
    assert SqliteReader(tmp_path / "missing.db").aliases("fct-backbone") is None
    assert not (tmp_path / "missing.db").exists()


def test_reading_creates_changes_and_locks_no_file(world: factories.World, tmp_path: Path):
    registry = copy_store(world, tmp_path)
    before = folder_state(tmp_path)
    for role in ROLES:
        assert registry.versions(role)
    registry.transformation_edges()
    assert folder_state(tmp_path) == before
    with closing(sqlite3.connect(tmp_path / "registry" / "mlflow.db", timeout=0)) as connection, connection:
        connection.execute("BEGIN EXCLUSIVE")  # no reader left a lock behind


LISTINGS = """
import json, sys
from typer.testing import CliRunner
from fct_registry.cli.app import app
root = sys.argv[1]
outputs = [CliRunner().invoke(app, ["--root", root, *command]) for command in
           (["models", "list", "--json"], ["sets", "list"], ["lineage", "--json"])]
heavy = sorted(m for m in ("mlflow", "torch", "onnxruntime", "faiss", "sqlalchemy") if m in sys.modules)
print(json.dumps({"exit": [o.exit_code for o in outputs], "heavy": heavy, "models": json.loads(outputs[0].stdout)}))
"""


def test_listings_import_no_mlflow_torch_onnxruntime_or_faiss(world: factories.World, tmp_path: Path):
    registry = copy_store(world, tmp_path)
    shutil.copytree(world.sets_root, tmp_path / "embeddings")
    before = folder_state(tmp_path / "registry")
    result = subprocess.run([sys.executable, "-c", LISTINGS, str(tmp_path)], capture_output=True, text=True,
                            check=True)
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["exit"] == [0, 0, 0] and found["heavy"] == [], found
    assert len(found["models"]) == sum(len(registry.versions(role)) for role in ROLES)
    assert folder_state(tmp_path / "registry") == before
