"""ModelRegistry against a real MLflow SQLite store in a temp dir.

One store per module keeps MLflow's database setup to a single run; each test
isolates itself with its own registered-model name prefix.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mlflow import MlflowClient
from onnx import TensorProto, helper, numpy_helper

from fct_registry.core.errors import RegistryError
from fct_registry.core.refs import ModelRef
from fct_registry.registry.chains import Edge, plan_chain
from fct_registry.registry.mlflow_store import default_tracking_uri
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import transformation_tags


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("project")


@pytest.fixture
def registry(store_root: Path, request: pytest.FixtureRequest) -> ModelRegistry:
    return ModelRegistry(store_root, prefix=f"t-{request.node.name}")


@pytest.fixture
def client(registry: ModelRegistry) -> MlflowClient:
    return MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)


def scaled_identity(path: Path, label: str, scale: float, dim: int = 3) -> ModelRef:
    """ONNX model embedding = image @ (scale * I): input "image" (batch, dim) -> "embedding" (batch, dim)."""
    weight = numpy_helper.from_array(np.eye(dim, dtype=np.float32) * np.float32(scale), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["image", "w"], ["embedding"])], "scaled_identity",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
        [weight],
    )
    onnx.save(helper.make_model(graph), path)
    return ModelRef(label=label, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def test_default_uri_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert ModelRegistry(tmp_path).tracking_uri == f"sqlite:///{tmp_path.resolve()}/registry/mlflow.db"
    assert default_tracking_uri(tmp_path) == ModelRegistry(tmp_path).tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    assert ModelRegistry(tmp_path).tracking_uri == f"sqlite:///{tmp_path}/env.db"
    given = f"sqlite:///{tmp_path}/given.db"
    assert ModelRegistry(tmp_path, tracking_uri=given).tracking_uri == given
    assert list(tmp_path.iterdir()) == []  # constructing a registry opens no store


def test_register_tags_params_and_metrics(registry: ModelRegistry, client: MlflowClient, tmp_path: Path):
    ref = scaled_identity(tmp_path / "v1.onnx", "v1", 1.0)
    version = registry.register(
        tmp_path / "v1.onnx", "backbone", ref,
        tags={"embedding_dim": 3, "normalized": False, "metric": "l2", "fct.git_commit": "abc123"},
        params={"lr": 0.1, "epochs": 3},
        metrics={"cmc_top1": 0.5, "map": 0.25},
    )
    assert (version.name, version.version, version.role, version.ref) == (registry.model_name("backbone"), 1,
                                                                          "backbone", ref)
    expected = {
        "fct.role": "backbone", "fct.label": "v1", "fct.sha256": ref.sha256, "fct.embedding_dim": "3",
        "fct.normalized": "false", "fct.metric": "l2", "fct.git_commit": "abc123",
        "fct.params": '{"epochs": 3, "lr": 0.1}', "fct.cmc_top1": "0.5", "fct.map": "0.25",
    }
    assert {k: v for k, v in version.tags.items() if k.startswith("fct.")} == expected
    run = client.get_run(client.get_model_version(version.name, "1").run_id)
    assert run.data.params == {"lr": "0.1", "epochs": "3"}
    assert run.data.metrics == {"cmc_top1": 0.5, "map": 0.25}
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the fluent URI was restored


def test_register_is_idempotent_by_content(registry: ModelRegistry, tmp_path: Path):
    ref_a = scaled_identity(tmp_path / "a.onnx", "v1", 1.0)
    first = registry.register(tmp_path / "a.onnx", "backbone", ref_a)
    again = registry.register(tmp_path / "a.onnx", "backbone", ref_a, tags={"note": "ignored"})
    assert again.version == first.version == 1
    assert "fct.note" not in again.tags
    ref_b = scaled_identity(tmp_path / "b.onnx", "v1", 2.0)  # same label, different bytes
    assert registry.register(tmp_path / "b.onnx", "backbone", ref_b).version == 2
    assert [v.version for v in registry.versions("backbone")] == [1, 2]
    with pytest.raises(RegistryError, match=r"already registered as .*/1 \(v1@.*'v9'"):
        registry.register(tmp_path / "a.onnx", "backbone", ModelRef(label="v9", sha256=ref_a.sha256))


def test_register_rejects_bad_inputs(registry: ModelRegistry, tmp_path: Path):
    ref = scaled_identity(tmp_path / "a.onnx", "v1", 1.0)
    with pytest.raises(RegistryError, match="does not exist"):
        registry.register(tmp_path / "missing.onnx", "backbone", ref)
    with pytest.raises(RegistryError, match=f"expects {'0' * 12}"):
        registry.register(tmp_path / "a.onnx", "backbone", ModelRef(label="v1", sha256="0" * 64))
    with pytest.raises(RegistryError, match="unknown model role 'encoder'"):
        registry.register(tmp_path / "a.onnx", "encoder", ref)
    with pytest.raises(RegistryError, match="lacks tags fct.source_label, fct.source_sha256"):
        registry.register(tmp_path / "a.onnx", "transformation", ref)
    assert registry.versions("transformation") == []


def test_onnx_file_loads_back_and_runs(registry: ModelRegistry, store_root: Path, tmp_path: Path):
    ref = scaled_identity(tmp_path / "v2.onnx", "v2", 3.0)
    version = registry.register(tmp_path / "v2.onnx", "backbone", ref)
    path = registry.onnx_path(version)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ref.sha256
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.array([[1.0, -2.0, 0.5]], dtype=np.float32)
    np.testing.assert_array_equal(session.run(["embedding"], {"image": x})[0], [[3.0, -6.0, 1.5]])
    assert not list((store_root / "registry").rglob("*.onnx.data"))  # self-contained artifacts
    path.write_bytes(b"truncated")  # a damaged cached copy is fetched again
    assert registry.onnx_path(version) == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ref.sha256


def test_get_by_number_label_and_alias(registry: ModelRegistry, tmp_path: Path):
    old = registry.register(tmp_path / "a.onnx", "backbone", scaled_identity(tmp_path / "a.onnx", "v1", 1.0))
    new = registry.register(tmp_path / "b.onnx", "backbone", scaled_identity(tmp_path / "b.onnx", "v2", 2.0))
    assert registry.get("backbone", 1).ref == old.ref
    assert registry.get("backbone", "2").ref == new.ref
    assert registry.get("backbone", "v1").version == 1
    assert registry.set_alias("backbone", "champion", "v1").aliases == ("champion",)
    assert registry.resolve_alias("backbone", "champion").version == 1
    registry.set_alias("backbone", "champion", 2)  # moving the alias
    assert registry.get("backbone", "@champion").version == 2
    assert [v.aliases for v in registry.versions("backbone")] == [(), ("champion",)]
    newest = registry.register(tmp_path / "c.onnx", "backbone", scaled_identity(tmp_path / "c.onnx", "v1", 5.0))
    assert registry.get("backbone", "v1").version == newest.version == 3  # newest with the label


def test_unknown_version_lists_the_known_ones(registry: ModelRegistry, tmp_path: Path):
    with pytest.raises(RegistryError, match="version 'v1'; known: none registered"):
        registry.get("backbone", "v1")
    registry.register(tmp_path / "a.onnx", "backbone", scaled_identity(tmp_path / "a.onnx", "v1", 1.0))
    registry.register(tmp_path / "b.onnx", "backbone", scaled_identity(tmp_path / "b.onnx", "v2", 2.0))
    for key in ("v9", 7, "7"):
        with pytest.raises(RegistryError, match=rf"version '{key}'; known: 1 \(v1\), 2 \(v2\)$"):
            registry.get("backbone", key)
    with pytest.raises(RegistryError, match="version '9'"):
        registry.set_alias("backbone", "champion", 9)


def test_alias_to_deleted_version_is_an_error(registry: ModelRegistry, client: MlflowClient, tmp_path: Path):
    with pytest.raises(RegistryError, match="alias 'champion' of .* points to no existing version"):
        registry.resolve_alias("backbone", "champion")
    registry.register(tmp_path / "a.onnx", "backbone", scaled_identity(tmp_path / "a.onnx", "v1", 1.0))
    registry.set_alias("backbone", "champion", 1)
    client.delete_model_version(registry.model_name("backbone"), "1")
    with pytest.raises(RegistryError, match="alias 'champion' of .* points to no existing version"):
        registry.resolve_alias("backbone", "champion")
    with pytest.raises(RegistryError, match="cannot set alias 'v2'"):  # MLflow reserves v<number>
        registry.set_alias("backbone", "v2",
                           registry.register(tmp_path / "b.onnx", "backbone",
                                             scaled_identity(tmp_path / "b.onnx", "v2", 2.0)).version)


def test_transformation_edges_feed_the_planner(registry: ModelRegistry, tmp_path: Path):
    v1, v2, v3 = (registry.register(tmp_path / f"{x}.onnx", "backbone", scaled_identity(tmp_path / f"{x}.onnx", x, s))
                  for x, s in (("v1", 1.0), ("v2", 2.0), ("v3", 4.0)))
    s1 = registry.register(tmp_path / "s1.onnx", "side-info", scaled_identity(tmp_path / "s1.onnx", "s1", 7.0))
    h12 = registry.register(tmp_path / "h12.onnx", "transformation",
                            scaled_identity(tmp_path / "h12.onnx", "h-v1-v2", 2.0, dim=4),
                            tags={**transformation_tags(v1, v2, s1), "side_info_dim": 3},
                            metrics={"cmc_top1": 0.6, "cmc_top5": 0.8, "map": 0.4})
    assert h12.tags["fct.source_version"] == "1" and h12.tags["fct.side_info_label"] == "s1"
    registry.register(tmp_path / "h23.onnx", "transformation",
                      scaled_identity(tmp_path / "h23.onnx", "h-v2-v3", 2.0, dim=5),
                      tags=transformation_tags(v2, v3, None))
    name = registry.model_name("transformation")
    e12 = Edge(source=v1.ref, target=v2.ref, side_info=s1.ref, transformation=f"{name}/1", map=0.4)
    e23 = Edge(source=v2.ref, target=v3.ref, side_info=None, transformation=f"{name}/2", map=None)
    assert registry.transformation_edges() == [e12, e23]
    assert plan_chain(v1.ref, v3.ref, registry.transformation_edges(), [s1.ref]) == [e12, e23]
    updated = registry.set_tags(registry.get("transformation", 2), {"map": 0.3})
    assert updated.tags["fct.map"] == "0.3"
    assert registry.transformation_edges()[1].map == 0.3
    with pytest.raises(RegistryError, match="refusing to change identity tags fct.label"):
        registry.set_tags(updated, {"label": "v7"})


def test_log_run_records_params_tags_metrics_and_artifacts(registry: ModelRegistry, client: MlflowClient,
                                                          tmp_path: Path):
    (tmp_path / "plan.txt").write_text("v1 -> v2 -> v3\n")
    (tmp_path / "out-set").mkdir()
    (tmp_path / "out-set" / "manifest.json").write_text("{}")
    run_id = registry.log_run(
        "upgrade gallery v1 -> v3",
        params={"chain": "fct-transformation/1,fct-transformation/2"},
        tags={"input_set": "gallery-v1", "output_set": "gallery-v3"},
        artifacts=[tmp_path / "plan.txt", tmp_path / "out-set"],
        metrics={"rows": 10},
    )
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "upgrade gallery v1 -> v3"
    assert run.data.params == {"chain": "fct-transformation/1,fct-transformation/2"}
    assert run.data.tags["fct.input_set"] == "gallery-v1" and run.data.tags["fct.output_set"] == "gallery-v3"
    assert run.data.metrics == {"rows": 10.0}
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["out-set", "plan.txt"]
    assert [a.path for a in client.list_artifacts(run_id, "out-set")] == ["out-set/manifest.json"]


def test_a_version_without_identity_tags_is_not_listed_and_a_partial_one_is_an_error(
        registry: ModelRegistry, client: MlflowClient, tmp_path: Path):
    ref = scaled_identity(tmp_path / "a.onnx", "v1", 1.0)
    first = registry.register(tmp_path / "a.onnx", "backbone", ref)
    # what another process's version looks like between its row and its tags (or during its deletion)
    name = registry.model_name("backbone")
    bare = client.create_model_version(name, source=client.get_model_version_download_uri(name, str(first.version)))
    assert [v.version for v in registry.versions("backbone")] == [first.version]
    client.set_model_version_tag(name, bare.version, "fct.role", "backbone")
    with pytest.raises(RegistryError, match=f"{name}/{bare.version} lacks tags fct.label, fct.sha256"):
        registry.versions("backbone")
