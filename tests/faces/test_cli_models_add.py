"""``fct-registry models add``: a user's ONNX model validated against its input contract, then registered."""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import factories
import pytest
import torch
from cli_checks import fails, succeeds, table_rows
from torch import nn
from typer.testing import CliRunner

from fct_registry.cli.app import app
from fct_registry.method.models.side_info import SideInfoModel
from fct_registry.onnx_boundary.contract import CONTRACT_TAG, IMAGENET_MEAN, IMAGENET_STD, InputContract
from fct_registry.onnx_boundary.model_files import write_model_dir
from fct_registry.onnx_boundary.user_export import export_embedding_model
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.publishing import publish_model

runner = CliRunner(env={"COLUMNS": "250"})  # wide enough that rich never wraps a table cell
RGB32 = InputContract(height=32, width=32, color="rgb", mean=IMAGENET_MEAN, std=IMAGENET_STD)
RGB_OPTIONS = ["--height", "32", "--width", "32", "--color", "rgb", *(f"--mean={m}" for m in IMAGENET_MEAN),
               *(f"--std={s}" for s in IMAGENET_STD)]


class Tiny(nn.Module):
    """Prepared images (B, 3, H, W) -> (B, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """An empty migrated MLflow SQLite database, created in a child process while the models export."""
    return functools.cache(factories.start_empty_store(tmp_path_factory.mktemp("store")))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, empty_store) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("user-models")
    torch.manual_seed(0)
    export_embedding_model(Tiny().eval(), RGB32, folder / "rgb.onnx")
    (folder / "garbage.onnx").write_bytes(b"this is not an ONNX model")
    (folder / "rgb.json").write_text(RGB32.to_json())
    return {"rgb": folder / "rgb.onnx", "garbage": folder / "garbage.onnx", "rgb_contract": folder / "rgb.json"}


def new_project(root: Path, empty_store: Callable[[], Path]) -> Path:
    """``root`` as a project folder with an empty registry (SQLite store)."""
    (root / "registry").mkdir(parents=True)
    shutil.copy(empty_store(), root / "registry" / "mlflow.db")
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, empty_store) -> Path:
    return new_project(tmp_path_factory.mktemp("project"), empty_store)


def cli(root: Path, *args: object):
    return runner.invoke(app, ["--root", str(root), *map(str, args)])


def test_a_bad_file_writes_nothing_not_even_the_registry(tmp_path, files):
    fails(cli(tmp_path, "models", "add", "backbone", files["garbage"], "--label", "v1", "--metric", "l2",
              *RGB_OPTIONS), f"cannot load ONNX model {files['garbage']}")
    fails(cli(tmp_path, "models", "add", "backbone", files["rgb"], "--label", "v1", "--metric", "l2",
              "--preset", "imagenet"),
          str(files["rgb"]), "has shape ('batch', 3, 32, 32)", "expects (batch, 3, 224, 224)")
    fails(cli(tmp_path, "models", "add", "backbone", files["rgb"], "--label", "v1", "--metric", "l2", "--height",
              "32"), "invalid input contract: width: Field required")
    assert list(tmp_path.iterdir()) == []


def test_add_a_backbone_lists_it_with_its_contract_and_is_idempotent(project, files):
    args = ["models", "add", "backbone", files["rgb"], "--label", "u1", "--metric", "cosine", *RGB_OPTIONS,
            "--description", "tiny rgb net"]
    stdout = succeeds(cli(project, *args))
    registry = ModelRegistry(project)
    (version,) = registry.versions("backbone")
    assert stdout.strip() == (f"registered fct-backbone/{version.version}: label u1, sha256 "
                              f"{version.ref.sha256[:12]}, dim 10, contract rgb 32x32 nchw, metric cosine")
    tags = version.tags
    assert InputContract.model_validate_json(tags["fct.input_contract"]) == RGB32
    assert (tags["fct.origin"], tags["fct.metric"], tags["fct.normalized"], tags["fct.embedding_dim"]) == (
        "user", "cosine", "false", "10")
    assert json.loads(tags["fct.inputs"]) == {"image": [3, 32, 32]}
    assert tags["fct.description"] == "tiny rgb net" and tags["fct.source_file"] == "rgb.onnx"
    assert 0 <= float(tags["fct.batch_max_rel_diff"]) <= 1e-4
    rows = table_rows(succeeds(cli(project, "models", "list")))
    assert rows == [["backbone", f"fct-backbone/{version.version}", "u1", version.ref.sha256[:12], "10", "", "",
                     "rgb 32x32 nchw"]]
    # the same bytes again: the same version, nothing new
    assert succeeds(cli(project, *args)) == stdout
    assert [v.version for v in registry.versions("backbone")] == [version.version]
    fails(cli(project, "models", "add", "backbone", files["rgb"], "--label", "u2", "--metric", "cosine",
              *RGB_OPTIONS), f"already registered as {version}", "refusing to register them again as 'u2'")
    fails(cli(project, "models", "add", "backbone", files["rgb"], "--label", "u1", "--metric", "cosine",
              "--height", "32", "--width", "32", "--color", "rgb"),
          "already registered as", "refusing a different contract")
    assert [v.version for v in registry.versions("backbone")] == [version.version]


def test_add_side_info_from_a_contract_file_and_refuse_bad_files_without_a_new_version(project, files):
    # the same bytes may be a backbone and a side-info model: each role is its own registered model
    stdout = succeeds(cli(project, "models", "add", "side-info", files["rgb"], "--label", "s-rgb", "--metric", "l2",
                          "--contract", files["rgb_contract"]))
    assert stdout.startswith("registered fct-side-info/1: label s-rgb") and "contract rgb 32x32 nchw," in stdout
    registry = ModelRegistry(project)
    before = {role: [v.version for v in registry.versions(role)] for role in ("backbone", "side-info")}
    assert before == {"backbone": [1], "side-info": [1]}
    fails(cli(project, "models", "add", "side-info", files["rgb"], "--label", "s2", "--metric", "l2",
              *RGB_OPTIONS, "--layout", "nhwc"),
          "input 'image' has shape ('batch', 3, 32, 32)", "rgb 32x32 nhwc contract expects (batch, 32, 32, 3)")
    fails(cli(project, "models", "add", "side-info", files["rgb"], "--label", "s2", "--metric", "l2",
              "--preset", "grayscale01", "--height", "32", "--width", "32"), "expects (batch, 1, 32, 32)")
    fails(cli(project, "models", "add", "side-info", files["rgb"], "--label", "s2", "--metric", "l2",
              "--normalized", "--contract", files["rgb_contract"]), "declared L2-normalised")
    fails(cli(project, "models", "add", "side-info", files["garbage"], "--label", "s2", "--metric", "l2",
              "--contract", files["rgb_contract"]), "cannot load ONNX model")
    fails(cli(project, "models", "add", "side-info", files["rgb"], "--label", "s2", "--metric", "l2",
              "--contract", files["rgb_contract"], "--preset", "imagenet"), "excludes a preset")
    fails(cli(project, "models", "add", "side-info", files["rgb"], "--label", "7", "--metric", "l2",
              "--contract", files["rgb_contract"]), "label '7'", "not be all digits")
    assert {role: [v.version for v in registry.versions(role)] for role in ("backbone", "side-info")} == before
    rows = table_rows(succeeds(cli(project, "models", "list", "--role", "side-info")))
    assert [(r[2], r[-1]) for r in rows] == [("s-rgb", "rgb 32x32 nchw")]


def test_pipeline_models_carry_the_project_contract_even_when_registered_before_contracts(tmp_path, empty_store):
    root = new_project(tmp_path / "project", empty_store)
    torch.manual_seed(0)
    card = write_model_dir(SideInfoModel(6, projection_dim=4, width=4).eval(), tmp_path / "s1", "side-info", "s1",
                           {}, image_shape=(1, 20, 24))
    registry = ModelRegistry(root)
    # a version registered before input contracts existed: no fct.input_contract tag
    old = registry.register(tmp_path / "s1" / "model.onnx", "side-info", card.ref, tags={"embedding_dim": 6})
    assert CONTRACT_TAG not in old.tags
    version = publish_model(registry, tmp_path / "s1", "l2", "md5", "commit", {})
    assert version.version == old.version
    assert InputContract.model_validate_json(version.tags[CONTRACT_TAG]) == InputContract(
        height=20, width=24, color="grayscale")
    (row,) = table_rows(succeeds(cli(root, "models", "list")))
    assert row[2] == "s1" and row[-1] == "grayscale 20x24 nchw"
