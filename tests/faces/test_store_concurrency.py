"""The embedded registry store under concurrent first use, and a store left broken (issue 10).

Before the store was created under a lock, 4 processes registering into a new SQLite store failed in 4 of 4
trials (``duplicate column name``, ``table experiments already exists``), sometimes leaving a half-migrated store.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest
import torch
from cli_checks import fails, succeeds, table_rows
from store_workers import run_in_lock_step
from torch import nn
from typer.testing import CliRunner

from fct_registry.cli.app import app
from fct_registry.onnx_boundary.contract import InputContract
from fct_registry.onnx_boundary.user_export import export_embedding_model
from fct_registry.registry.model_registry import ModelRegistry

runner = CliRunner(env={"COLUMNS": "250"})
CONTRACT = ["--height", "8", "--width", "8", "--color", "grayscale"]
ROUNDS = int(os.environ.get("FCT_STRESS_ROUNDS", "2"))  # the 20-round run: bench/store_stress.py
READERS = [["models", "list"], ["sets", "list"], ["lineage"], ["promote", "v9"]]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four different tiny ONNX backbones, (B, 1, 8, 8) -> (B, 4)."""
    folder = tmp_path_factory.mktemp("backbones")
    files = []
    for seed in range(4):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).eval()
        files.append(export_embedding_model(model, InputContract(height=8, width=8, color="grayscale"),
                                            folder / f"b{seed}.onnx") and folder / f"b{seed}.onnx")
    return files


def cli(root: Path, *args: object):
    return runner.invoke(app, ["--root", str(root), *map(str, args)])


def register(root: Path, file: Path, label: str) -> list[str]:
    return ["--root", str(root), "models", "add", "backbone", str(file), "--label", label, "--metric", "l2",
            *CONTRACT]


def in_lock_step(argvs_per_worker: list[list[list[str]]]) -> list[tuple[int, int, int, str, str]]:
    """Run every worker's argvs in separate processes, round by round; returns (worker, round, exit, out, err)."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(len(argvs_per_worker)), context.Queue()
    workers = [context.Process(target=run_in_lock_step, args=(index, argvs, barrier, results))
               for index, argvs in enumerate(argvs_per_worker)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=900) for argvs in argvs_per_worker for _ in argvs]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    return outcomes


def test_eight_processes_on_a_fresh_project_register_and_read_together(tmp_path, backbones):
    folders = [tmp_path / f"round{r}" for r in range(ROUNDS)]
    for folder in folders:
        folder.mkdir()
    writers = [[register(f, backbones[i], f"b{i}") for f in folders] for i in range(4)]
    readers = [[["--root", str(f), *argv] for f in folders] for argv in READERS]
    outcomes = in_lock_step(writers + readers)
    for worker, round_number, code, stdout, stderr in outcomes:
        context = f"worker {worker} round {round_number}: exit {code}\n{stdout}\n{stderr}"
        if worker < 4 or READERS[worker - 4][0] != "promote":
            assert code == 0 and stderr == "", context
        else:  # promote v9 fails in one line whatever the store's state
            assert code == 1 and stderr.startswith("error: ") and stderr.count("\n") == 1, context
            assert "unknown fct-backbone version 'v9'" in stderr, context
    for folder in folders:
        registry = ModelRegistry(folder)
        assert [v.version for v in registry.versions("backbone")] == [1, 2, 3, 4]
        assert sorted(v.ref.label for v in registry.versions("backbone")) == ["b0", "b1", "b2", "b3"]
        succeeds(cli(folder, "promote", "b2", "--alias", "champion"))  # the store stays usable
        assert registry.resolve_alias("backbone", "champion").ref.label == "b2"


def test_the_same_bytes_registered_by_four_processes_at_once_give_one_version(tmp_path, backbones):
    outcomes = in_lock_step([[register(tmp_path, backbones[0], "b0")] for _ in range(4)])
    assert [code for _, _, code, _, _ in outcomes] == [0] * 4, [err for *_, err in outcomes]
    (version,) = ModelRegistry(tmp_path).versions("backbone")
    assert version.ref.label == "b0" and {out.split(":")[0] for *_, out, _ in outcomes} == {
        f"registered fct-backbone/{version.version}"}


def test_read_only_commands_on_an_empty_folder_create_nothing(tmp_path):
    outcomes = in_lock_step([[["--root", str(tmp_path), *argv]] for argv in READERS])
    assert sorted(code for *_, code, _, _ in outcomes) == [0, 0, 0, 1]
    assert [r for r in (table_rows(out) for *_, out, _ in outcomes) if r] == []
    fails(cli(tmp_path, "search", "nonexistent.png"), "query image 'nonexistent.png' is not a file")
    fails(cli(tmp_path, "upgrade", "gallery"), "no embedding set 'gallery'")
    fails(cli(tmp_path / "missing", "models", "list"), f"--root '{tmp_path / 'missing'}' is not an existing folder")
    assert list(tmp_path.iterdir()) == []


def test_a_half_migrated_store_is_reported_with_how_to_recover(tmp_path, backbones):
    succeeds(runner.invoke(app, register(tmp_path, backbones[0], "b0")))
    db = tmp_path / "registry" / "mlflow.db"
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE _alembic_tmp_experiments (id INTEGER)")
    before = db.read_bytes()
    line = fails(runner.invoke(app, register(tmp_path, backbones[1], "b1")), f"registry store {db} is broken",
                 "_alembic_tmp_experiments", "mlflow db upgrade")
    assert db.read_bytes() == before, line
    with sqlite3.connect(db) as connection:
        connection.execute("DROP TABLE _alembic_tmp_experiments")
        connection.execute("UPDATE alembic_version SET version_num = 'f00'")
    fails(cli(tmp_path, "models", "list"), f"registry store {db} is not usable", "f00", "mlflow db upgrade")


def test_an_error_inside_a_library_is_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://registry")
    line = fails(cli(tmp_path, "promote", "v2"))
    assert line.startswith("error: UnsupportedModelRegistryStoreURIException: "), line
    result = runner.invoke(app, ["--root", str(tmp_path), "--debug", "promote", "v2"])
    assert result.exit_code == 1 and result.exception is not None and "error: " not in result.stderr
    assert list(tmp_path.iterdir()) == []
