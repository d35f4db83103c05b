"""A tiny but real FCT world for tests: torch models exported to ONNX, registered in a real MLflow SQLite store,
and a stored v1 gallery with side-info.

What a world holds (keys are the project's version labels):

- backbones ``v1`` (8-d, small CNN), ``v2`` (16-d, deeper CNN), ``v3`` (12-d, wider small CNN) on images
  (B, 1, 28, 28) float32 in [0, 1], random seeded weights; side-info model ``s1`` (6-d);
- forward transformations (FCT, Ramanujan et al., CVPR 2022, arXiv 2112.02805) ``h-v1-v2`` (v1 + s1 -> v2,
  registered mAP 0.62) and ``h-v2-v3`` (v2 + s1 -> v3, registered mAP 0.45); no direct v1 -> v3 link, so the
  planned upgrade of the gallery is the 2-hop chain;
- alias ``champion`` -> v3; ``params.yaml`` with ``registry.promote_map_floor`` 0.5 (so promoting v3 fails the
  mAP gate: its chain's weakest link is 0.45);
- ``data/prepared/{train,test}.npz``: 5 classes of noisy templates; the 50 test images are the gallery;
- ``embeddings/gallery_v1``: the test split embedded by v1 with s1 side-info (``world.gallery``).

Cost: exporting the six models (~13 s) and, concurrently, creating MLflow's database (~8 s) happen once per
test session (:func:`session_models`); each further world built from them costs ~3 s.

Use the shared world from a session-scoped fixture (the modules import this file as ``factories``; pytest puts
``tests/`` on ``sys.path``)::

    @pytest.fixture(scope="session")
    def world(tmp_path_factory):
        return factories.shared_world(tmp_path_factory)

The shared world is read-only for tests: copy its sets (:func:`copy_sets`) before writing sets, set aliases
other than ``champion``, and never register models into it. A test that must change registered models builds
its own world with :func:`fresh_world`.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import blake3
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torch import nn

from fct_registry.core.config import BackboneParams, BctParams, Params, RegistryParams
from fct_registry.method.data import Split, save_prepared
from fct_registry.method.models.backbone import Backbone
from fct_registry.method.models.side_info import SideInfoModel
from fct_registry.method.models.transformation import ForwardTransformation
from fct_registry.onnx_boundary.model_card import ModelCard
from fct_registry.onnx_boundary.model_files import write_model_dir
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.publishing import publish_model
from fct_registry.registry.versions import RegisteredVersion
from fct_registry.usecases.sets import build_gallery
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import MANIFEST, EmbeddingSet, ShardInfo
from fct_registry.vectors.set_writer import write_embedding_set
from fct_registry.vectors.vector_column import vector_array, vector_matrix

IMAGE_SHAPE = (1, 28, 28)
N_CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 5, 4, 10
DIMS = {"v1": 8, "v2": 16, "v3": 12, "s1": 6}
LINKS = {"h-v1-v2": ("v1", "v2"), "h-v2-v3": ("v2", "v3")}
"""Transformation key -> (source, target); every transformation takes s1 side-info."""
LINK_METRICS = {"h-v1-v2": {"cmc_top1": 0.7, "cmc_top5": 0.9, "map": 0.62},
                "h-v2-v3": {"cmc_top1": 0.6, "cmc_top5": 0.85, "map": 0.45}}
MAP_FLOOR = 0.5
CHAMPION = "v3"
T = TypeVar("T")
_SESSION: dict[tuple[Path, str], Any] = {}


def striped_split(n: int, seed: int = 0) -> Split:
    """``n`` 28x28 grayscale images whose class (0..3) is which quarter of the rows is bright: trivially
    separable, for training loops that must learn something in a few steps (seeded)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 40, (n, 1, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 0, 7 * c:7 * c + 7] = 250
    return Split(images, labels.astype(np.int64), np.arange(n, dtype=np.int64))


def make_splits(seed: int = 0) -> dict[str, Split]:
    """Train (20) and test (50) splits: images (N, 1, 28, 28) uint8, a noisy template per class, labels 0..4.

    Item ids are 0..19 (train) and 1000..1049 (test).
    """
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(N_CLASSES, *IMAGE_SHAPE))

    def split(per_class: int, first_id: int) -> Split:
        labels = np.repeat(np.arange(N_CLASSES, dtype=np.int64), per_class)
        images = np.clip(templates[labels] + rng.normal(0, 40, size=(len(labels), *IMAGE_SHAPE)), 0, 255)
        return Split(images.astype(np.uint8), labels, np.arange(first_id, first_id + len(labels), dtype=np.int64))

    return {"train": split(TRAIN_PER_CLASS, 0), "test": split(TEST_PER_CLASS, 1000)}


@dataclass(frozen=True)
class Zoo:
    """The exported models, shared by every world of a session.

    Attributes:
        modules: key -> torch module in eval mode (what the ONNX files must reproduce).
        dirs: key -> model folder (``model.pt``, ``model.onnx``, ``model.json``).
        cards: key -> model card (``card.ref`` is the model's identity).
        splits: ``train`` and ``test`` images (see :func:`make_splits`).
    """

    modules: dict[str, nn.Module]
    dirs: dict[str, Path]
    cards: dict[str, ModelCard]
    splits: dict[str, Split]


def _modules() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "v1": Backbone("small_cnn", DIMS["v1"], width=4),
        "v2": Backbone("cnn", DIMS["v2"], width=4),
        "v3": Backbone("small_cnn", DIMS["v3"], width=6),
        "s1": SideInfoModel(DIMS["s1"], projection_dim=4, width=4),
        **{key: ForwardTransformation(DIMS[src], DIMS[dst], DIMS["s1"], hidden_dim=16)
           for key, (src, dst) in LINKS.items()},
    }


def build_zoo(folder: Path) -> Zoo:
    """Export every model of :func:`_modules` into ``folder/<key>`` with ``write_model_dir`` (ONNX parity checked)."""
    modules = {key: module.eval() for key, module in _modules().items()}
    dirs = {key: folder / key for key in modules}
    cards = {}
    for key, module in modules.items():
        if key in LINKS:
            src, dst = LINKS[key]
            links = {"source": cards[src].ref, "target": cards[dst].ref, "side_info": cards["s1"].ref}
            cards[key] = write_model_dir(module, dirs[key], "transformation", key, {}, links=links)
        else:
            role = "side-info" if key == "s1" else "backbone"
            cards[key] = write_model_dir(module, dirs[key], role, key, {}, image_shape=IMAGE_SHAPE)
    return Zoo(modules, dirs, cards, make_splits())


def start_empty_store(folder: Path) -> Callable[[], Path]:
    """Start creating an empty, migrated MLflow SQLite database in a child process (~8 s of schema migrations,
    overlapping the model exports); the returned function waits for it and gives the database path to copy."""
    script = ("from fct_registry.registry.model_registry import ModelRegistry; "
              f"ModelRegistry({str(folder)!r}).store.client")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)

    def wait() -> Path:
        output, _ = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"creating the MLflow store in {folder} failed:\n{output}")
        return folder / "registry" / "mlflow.db"

    return wait


def write_params(root: Path, map_floor: float = MAP_FLOOR) -> Path:
    """A valid ``params.yaml`` for the tiny world; ``registry.promote_map_floor`` is ``map_floor``."""
    def backbone(label: str, dim: int) -> BackboneParams:
        return BackboneParams(version=label, arch="small_cnn", width=4, embedding_dim=dim)

    params = Params(old=backbone("v1", DIMS["v1"]), new=backbone("v2", DIMS["v2"]), v3=backbone("v3", DIMS["v3"]),
                    bct=BctParams(backbone=backbone("v2-bct", DIMS["v1"])),
                    registry=RegistryParams(promote_map_floor=map_floor))
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return path


@dataclass(frozen=True)
class World:
    """A project folder with a registry, prepared data and a stored gallery.

    Attributes:
        root: Project root (``params.yaml``, ``registry/``, ``data/prepared``, ``embeddings/``).
        zoo: The models it registered.
        registry: Its registry (SQLite store under ``root/registry``).
        versions: key -> registered version.
    """

    root: Path
    zoo: Zoo
    registry: ModelRegistry
    versions: dict[str, RegisteredVersion]

    @property
    def sets_root(self) -> Path:
        """The folder of stored sets (the CLI's default ``--sets-root``)."""
        return self.root / "embeddings"

    @property
    def gallery(self) -> Path:
        """The v1 gallery set (50 items, side-info s1)."""
        return self.sets_root / "gallery_v1"


def build_world(root: Path, zoo: Zoo, store: Path, keys: Iterable[str] | None = None) -> World:
    """Register ``keys`` of the zoo (default: all) in a copy of ``store``, store the v1 gallery, alias champion -> v3.

    Backbones and s1 must come before the transformations that link them (the zoo's order does).
    """
    (root / "registry").mkdir(parents=True)
    shutil.copy(store, root / "registry" / "mlflow.db")
    write_params(root)
    save_prepared(zoo.splits, [f"class{i}" for i in range(N_CLASSES)], root / "data" / "prepared", "image_folder")
    registry = ModelRegistry(root)
    versions = {key: publish_model(registry, zoo.dirs[key], "l2", "test-data-md5", "test-commit", {"key": key},
                                   metrics=LINK_METRICS.get(key))
                for key in (keys or zoo.dirs)}
    embed_set(zoo, "v1", root / "embeddings" / "gallery_v1")
    if CHAMPION in versions:
        registry.set_alias("backbone", "champion", versions[CHAMPION].version)
    return World(root, zoo, registry, versions)


def _cached(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[], T]) -> T:
    key = (tmp_path_factory.getbasetemp(), name)
    if key not in _SESSION:
        _SESSION[key] = build()
    return _SESSION[key]


def session_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Zoo, Path]:
    """The zoo and an empty migrated MLflow database, made once per test session (concurrently)."""
    def build() -> tuple[Zoo, Path]:
        store = start_empty_store(tmp_path_factory.mktemp("store"))
        zoo = build_zoo(tmp_path_factory.mktemp("zoo"))
        return zoo, store()

    return _cached(tmp_path_factory, "models", build)


def shared_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The session's read-only world (see the module docstring)."""
    return _cached(tmp_path_factory, "world", lambda: fresh_world(tmp_path_factory))


def fresh_world(tmp_path_factory: pytest.TempPathFactory, keys: Iterable[str] | None = None) -> World:
    """A new world of its own (~3 s) that a test may change freely."""
    zoo, store = session_models(tmp_path_factory)
    return build_world(tmp_path_factory.mktemp("world"), zoo, store, keys)


# ----- sets ---------------------------------------------------------------------------------------------------


def embed_set(zoo: Zoo, backbone: str, dest: Path, side_info: bool = True) -> EmbeddingSet:
    """The test split embedded by ``backbone`` (ONNX Runtime), with s1 side-info unless ``side_info`` is False."""
    side_onnx = zoo.dirs["s1"] / "model.onnx" if side_info else None
    side_ref = zoo.cards["s1"].ref if side_info else None
    return build_gallery(zoo.splits["test"], zoo.dirs[backbone] / "model.onnx", zoo.cards[backbone].ref, side_onnx,
                         side_ref, dest, "l2")


def copy_sets(world: World, dest: Path) -> Path:
    """Copy the world's sets folder to ``dest`` (a sets root a test may write into)."""
    shutil.copytree(world.sets_root, dest)
    return dest


def without_side_info(source: Path, dest: Path) -> EmbeddingSet:
    """A copy of the set at ``source`` without its side-info column (same model, ids, embeddings)."""
    stored = EmbeddingSet.open(source)
    batch = stored.read()
    return write_embedding_set(dest, EmbeddingBatch(batch.ids, batch.labels, batch.embeddings,
                                                    model=stored.manifest.model),
                               stored.manifest.model, lineage=stored.manifest.lineage)


def poison_set(path: Path, row: int, column: str = "embedding") -> int:
    """Write NaN into one row of a stored set's first shard, keeping its manifest consistent (checksum updated).

    ``write_embedding_set`` refuses NaN, so this edits the shard the way a bad producer or a bit flip would.

    Returns:
        The poisoned item's id.
    """
    stored = EmbeddingSet.open(path)
    shard = stored.shard_paths[0]
    table = pq.read_table(shard)
    width = stored.manifest.dim if column == "embedding" else stored.manifest.side_info_dim
    values = vector_matrix(table.column(column), width, column)
    values[row, 0] = np.nan
    poisoned = vector_array(values)
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, poisoned), shard)
    rewritten = ShardInfo(file=stored.manifest.shards[0].file, rows=stored.manifest.shards[0].rows,
                          blake3=blake3.blake3(shard.read_bytes()).hexdigest())
    shards = [rewritten, *stored.manifest.shards[1:]]
    (path / MANIFEST).write_text(stored.manifest.model_copy(update={"shards": shards}).model_dump_json(indent=2))
    return int(table.column("item_id")[row].as_py())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (to assert that nothing was written)."""
    return {str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# ----- models -------------------------------------------------------------------------------------------------


def upgrade_by_hand(zoo: Zoo, keys: Iterable[str], batch: EmbeddingBatch) -> np.ndarray:
    """Apply the torch transformations ``keys`` in order to a stored batch: (n, d_old) -> (n, d_new) float32."""
    x = torch.from_numpy(batch.embeddings)
    side = torch.from_numpy(batch.side_info)
    with torch.inference_mode():
        for key in keys:
            x = zoo.modules[key](old_embedding=x, side_info=side)
    return x.numpy()


def corrupt_artifact(world: World, key: str) -> Path:
    """Overwrite the stored ONNX artifact of a registered model with garbage and drop the local download cache.

    Returns:
        The corrupted artifact file.
    """
    sha = world.versions[key].ref.sha256
    (artifact,) = [p for p in (world.root / "registry" / "artifacts").rglob("*.onnx") if _sha256(p) == sha]
    artifact.write_bytes(b"not an onnx model")
    shutil.rmtree(world.root / "registry" / "downloads", ignore_errors=True)
    return artifact
