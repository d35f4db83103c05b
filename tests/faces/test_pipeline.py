"""A tiny end-to-end `dvc repro` of the real pipeline in a fresh git + DVC repo (a few hundred images, 1 epoch).

Images are synthetic Fashion-MNIST-format idx files (class-dependent bright blocks), so the test needs no
download; every stage script, the MLflow registry and the upgrade chain run for real.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fct_registry.onnx_boundary.model_card import read_model_card
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.vectors.embedding_set import EmbeddingSet

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), compresslevel=1))


def _synthetic_fashion(folder: Path) -> None:
    """Full-size idx files (60k/10k) whose class c lights up block c of a 2x5 grid, plus noise."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for prefix, count in (("train", 60000), ("t10k", 10000)):
        labels = np.arange(count) % 10
        images = np.zeros((count, 28, 28), np.uint8)
        for c in range(10):
            r, q = divmod(c, 5)
            images[labels == c, 2 + 12 * r: 12 + 12 * r, 1 + 5 * q: 6 + 5 * q] = 200
        images[: 2000] += rng.integers(0, 50, (2000, 28, 28), dtype=np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)


def _tiny_params(data_dir: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"] |= {"fashion_mnist_dir": str(data_dir), "train_limit": 400, "test_limit": 150}
    for section in (params["old"], params["new"], params["v3"], params["bct"]["backbone"], params["side_info"]):
        section |= {"epochs": 1, "width": 4, "batch_size": 64}
    params["transformation"] |= {"epochs": 2, "hidden_dim": 32, "seeds": [0, 1]}
    params["backfill"] |= {"points": 4}
    params["threads"] = 1
    params["registry"]["promote_map_floor"] = 0.0  # 2-epoch models on 400 images cannot pass the demo's quality gate
    return params


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                        "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
                        "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC repo holding the project's dvc.yaml and stage scripts, with tiny params; `dvc repro` done."""
    base = tmp_path_factory.mktemp("pipeline")
    _synthetic_fashion(base / "fashion")
    repo = base / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for folder in ("pipelines", "fct_registry"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(yaml.safe_dump(_tiny_params(base / "fashion"), sort_keys=False))
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "t"]):
        assert _run(args, repo).returncode == 0
    done = _run(["dvc", "repro"], repo)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return repo


def test_every_stage_writes_its_outputs(repo):
    assert (repo / "data/prepared/train.npz").is_file() and (repo / "data/prepared/test.npz").is_file()
    for name in ("old", "side_info", "new", "v3", "bct"):
        card = read_model_card(repo / "models" / name)
        assert max(card.parity_max_abs_diff.values()) <= 1e-4 and (repo / "models" / name / "model.onnx").is_file()
    assert read_model_card(repo / "models/old").embedding_dim == 8
    h = read_model_card(repo / "models/transformations/h-v1-v2/seed1")
    assert h.links["source"] == read_model_card(repo / "models/old").ref and h.inputs == {
        "old_embedding": [8], "side_info": [128]}
    assert (repo / "reports/retrieval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gallery_and_upgraded_set_carry_the_right_versions(repo):
    gallery = EmbeddingSet.open(repo / "embeddings/gallery_v1")
    assert gallery.manifest.count == 150 and gallery.manifest.dim == 8 and gallery.manifest.side_info_dim == 128
    assert gallery.manifest.model == read_model_card(repo / "models/old").ref
    upgraded = EmbeddingSet.open(repo / "embeddings/gallery_v1@v3")
    assert upgraded.manifest.model == read_model_card(repo / "models/v3").ref
    assert upgraded.manifest.dim == 128 and upgraded.read().ids.tolist() == gallery.read().ids.tolist()
    report = json.loads((repo / "reports/upgrade.json").read_text())
    assert len(report["chain"]) == 2 and report["count"] == 150
    metrics = json.loads((repo / "metrics/upgrade.json").read_text())
    assert metrics["rows"] == 150 and metrics["map"] == report["v3_vs_stored_upgraded"]["map"]


def test_fastfill_h_backfill_curves_and_the_upgraded_sets_sigma(repo):
    """The registered chain's h's are FastFill's (transformation.loss: fastfill): they output sigma, which the upgraded
    set stores; backbones keep their classifier; the backfill_curve stage measures every curve and the targets."""
    from fct_registry.method.classifier import LinearClassifier
    from fct_registry.onnx_boundary.runtime import OnnxModel

    assert LinearClassifier.load(repo / "models/new").weight.shape == (10, 128)
    assert OnnxModel(repo / "models/transformations/h-v1-v2/seed0/model.onnx").has_uncertainty
    assert not OnnxModel(repo / "models/transformations/h-v1-v2-mse/seed0/model.onnx").has_uncertainty
    upgraded = EmbeddingSet.open(repo / "embeddings/gallery_v1@v3")
    assert upgraded.manifest.uncertainty and np.isfinite(upgraded.read().uncertainty).all()
    result = json.loads((repo / "metrics/backfill.json").read_text())
    seeds = {name: auc["n_seeds"] for name, auc in result["auc"].items()}
    assert seeds == {"fct_random": 2, "fastfill_uncertainty": 2, "fastfill_random": 1, "distance_oracle": 1,
                     "fct_random_noside": 2, "fastfill_uncertainty_noside": 2, "fastfill_random_noside": 1,
                     "distance_oracle_noside": 1}
    assert result["queries"] == 150 and result["points"] == 4 and set(result["targets"]) >= {
        "fastfill_map_auc_minus_new_new_map", "fastfill_map_gap_closed_at_0"}
    assert (repo / "reports/backfill.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    registry = ModelRegistry(repo)
    assert {v.tags["fct.transformation_kind"] for v in registry.versions("transformation")} == {"fastfill"}


def test_retrieval_metrics_cover_every_case(repo):
    result = json.loads((repo / "metrics/retrieval.json").read_text())
    expected = {"old_vs_old", "new_vs_new", "bct_vs_old", "bct_vs_bct", "new_vs_upgraded_noside", "new_vs_upgraded",
                "v3_vs_v3", "v3_vs_upgraded_from_v2", "v3_vs_upgraded_chain", "v3_vs_upgraded_direct"}
    assert set(result["cases"]) == expected
    for case in result["cases"].values():
        assert 0 <= case["cmc_top1"] <= case["cmc_top5"] <= 1 and 0 <= case["map"] <= 1
    assert result["cases"]["new_vs_upgraded"]["n_seeds"] == 2


def test_registry_holds_every_model_and_registration_is_idempotent(repo):
    registry = ModelRegistry(repo)
    before = {role: len(registry.versions(role)) for role in ("backbone", "side-info", "transformation")}
    assert before == {"backbone": 4, "side-info": 1, "transformation": 3}
    assert registry.resolve_alias("backbone", "champion").ref == read_model_card(repo / "models/v3").ref
    again = _run(["dvc", "repro", "--force", "--single-item", "register"], repo)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {role: len(registry.versions(role)) for role in before} == before


def test_bad_data_path_is_one_line_and_writes_nothing(repo, tmp_path):
    shutil.copytree(repo / "pipelines", tmp_path / "pipelines")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["fashion_mnist_dir"] = "/no/such/folder"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = _run([sys.executable, "pipelines/prepare.py"], tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == "error: data.fashion_mnist_dir does not exist: /no/such/folder"
    assert not (tmp_path / "data").exists()


def test_unknown_param_key_is_one_line_and_writes_nothing(repo, tmp_path):
    shutil.copytree(repo / "pipelines", tmp_path / "pipelines")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["old"]["epoch"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = _run([sys.executable, "pipelines/prepare.py"], tmp_path)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "old.epoch" in done.stderr
    assert not (tmp_path / "data").exists()
