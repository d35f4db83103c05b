"""``fct-registry sets import|export|embed`` through Typer's CliRunner, over a real MLflow SQLite registry and real
ONNX models (the shared tiny world of ``factories``)."""

from __future__ import annotations

import json
from pathlib import Path

import factories
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_checks import fails, succeeds
from PIL import Image
from typer.testing import CliRunner

from fct_registry.cli.app import app
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.usecases.project import image_sources
from fct_registry.vectors.embedding_set import EmbeddingSet

runner = CliRunner(env={"COLUMNS": "250"})


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> factories.World:
    return factories.shared_world(tmp_path_factory)


@pytest.fixture
def sets_root(world: factories.World, tmp_path: Path) -> Path:
    return factories.copy_sets(world, tmp_path / "sets")


def cli(world: factories.World, sets_root: Path, *args: object):
    return runner.invoke(app, ["--root", str(world.root), "--sets-root", str(sets_root), *map(str, args)])


def user_parquet(world: factories.World, path: Path, poison_row: int | None = None) -> Path:
    """The world's v1 gallery as a user's own Parquet file: columns pk, cls, vec (list<double>), aux."""
    batch = EmbeddingSet.open(world.gallery).read()
    if poison_row is not None:
        batch.embeddings[poison_row, 3] = np.nan
    table = pa.table({"pk": batch.ids, "cls": batch.labels,
                      "vec": pa.array(batch.embeddings.astype(np.float64).tolist(), pa.list_(pa.float64())),
                      "aux": pa.array(batch.side_info.tolist(), pa.list_(pa.float32()))})
    pq.write_table(table, path, row_group_size=16)
    return path


COLUMNS = ("--id-column", "pk", "--vector-column", "vec", "--side-info-column", "aux", "--label-column", "cls")


def test_import_a_parquet_gallery_for_registered_models(world, sets_root, tmp_path):
    source = user_parquet(world, tmp_path / "mine.parquet")
    stdout = succeeds(cli(world, sets_root, "sets", "import", source, "--model", "v1", "--side-info", "s1",
                          "--name", "imported", *COLUMNS, "--batch-rows", "7"))
    v1, s1 = world.versions["v1"], world.versions["s1"]
    assert f"wrote {sets_root / 'imported'}: 50 items of {v1.ref} (8-d, side-info {s1.ref} (6-d)), metric l2" in stdout
    imported = EmbeddingSet.open(sets_root / "imported")
    m = imported.manifest
    assert (m.model, m.side_info_model, m.metric, m.normalized, m.count) == (v1.ref, s1.ref, "l2", False, 50)
    assert m.lineage == [f"imported from {source.resolve()} (parquet), vectors of {v1.ref} with side-info {s1.ref}"]
    got, want = imported.read(), EmbeddingSet.open(world.gallery).read()
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.embeddings, want.embeddings)
    np.testing.assert_array_equal(got.side_info, want.side_info)


def test_import_errors_are_one_line_and_write_nothing(world, sets_root, tmp_path):
    before = factories.tree(sets_root)
    source = user_parquet(world, tmp_path / "mine.parquet")
    v2 = world.versions["v2"]
    fails(cli(world, sets_root, "sets", "import", source, "--model", "v2", "--side-info", "s1", "--name", "x",
              *COLUMNS), f"column 'vec' of {source} (parquet) holds 8-d vectors, but {v2} makes 16-d vectors")
    fails(cli(world, sets_root, "sets", "import", source, "--model", "v1", "--name", "x"),
          f"{source} has no column 'item_id'; columns present: pk, cls, vec, aux")
    poisoned = user_parquet(world, tmp_path / "nan.parquet", poison_row=33)
    fails(cli(world, sets_root, "sets", "import", poisoned, "--model", "v1", "--side-info", "s1", "--name", "x",
              *COLUMNS, "--batch-rows", "8"), "row 33 (item_id 1033)", "column 'vec' holds NaN or inf")
    fails(cli(world, sets_root, "sets", "import", source, "--model", "v1", "--name", "gallery_v1", *COLUMNS[:4]),
          "already exists")
    assert factories.tree(sets_root) == before
    assert not list(sets_root.glob(".tmp-*"))


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_export_then_import_back_from_the_export(world, sets_root, fmt):
    before = factories.tree(sets_root)
    out = f"exports/gallery.{fmt}"
    stdout = succeeds(cli(world, sets_root, "sets", "export", "gallery_v1", "--format", fmt, "--out", out,
                          "--batch-rows", "9"))
    exported = world.root / out
    files = "ids.npy, labels.npy, embeddings.npy, side_info.npy" if fmt == "npy" else "gallery.parquet"
    assert sorted(files.split(", ")) == sorted(stdout.split("(")[1].split(")")[0].split(": ")[1].split(", "))
    assert f"wrote {exported}" in stdout and "50 items" in stdout
    assert factories.tree(sets_root) == before
    want = EmbeddingSet.open(world.gallery).read()
    if fmt == "npy":
        np.testing.assert_array_equal(np.load(exported / "ids.npy"), want.ids)
        np.testing.assert_array_equal(np.load(exported / "embeddings.npy"), want.embeddings)
    else:
        table = pq.read_table(exported)
        assert table.column_names == ["item_id", "label", "embedding", "side_info"]
        np.testing.assert_array_equal(table.column("label").to_numpy(), want.labels)
    fails(cli(world, sets_root, "sets", "export", "gallery_v1", "--format", fmt, "--out", out), "already exists")
    succeeds(cli(world, sets_root, "sets", "import", exported, "--model", "v1", "--side-info", "s1", "--name",
                 f"back_{fmt}"))
    back = EmbeddingSet.open(sets_root / f"back_{fmt}").read()
    np.testing.assert_array_equal(back.embeddings, want.embeddings)
    np.testing.assert_array_equal(back.side_info, want.side_info)
    np.testing.assert_array_equal(back.labels, want.labels)


def test_embed_a_folder_of_pngs_with_class_subfolders(world, sets_root, tmp_path):
    split = world.zoo.splits["test"]
    picks = [0, 3, 11, 12, 25, 47]  # classes 0, 0, 1, 1, 2, 4
    names = {0: "a", 3: "b", 11: "c", 12: "d", 25: "e", 47: "f"}
    for i in picks:
        folder = tmp_path / "images" / f"class{split.labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(split.images[i, 0]).save(folder / f"{names[i]}.png")
    stdout = succeeds(cli(world, sets_root, "sets", "embed", tmp_path / "images", "--model", "v1", "--side-info",
                          "s1", "--name", "from_images", "--batch-size", "4"))
    v1, s1 = world.versions["v1"], world.versions["s1"]
    assert f"wrote {sets_root / 'from_images'}: 6 items of {v1.ref}" in stdout
    embedded = EmbeddingSet.open(sets_root / "from_images")
    batch = embedded.read()
    images = split.images[picks]
    by_hand = {key: embed_images(OnnxModel(world.zoo.dirs[key] / "model.onnx"), images) for key in ("v1", "s1")}
    np.testing.assert_array_equal(batch.ids, np.arange(6))
    np.testing.assert_array_equal(batch.labels, [0, 0, 1, 1, 2, 3])  # class folders class0, 1, 2, 4 -> 0..3
    np.testing.assert_allclose(batch.embeddings, by_hand["v1"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batch.side_info, by_hand["s1"], rtol=1e-5, atol=1e-6)
    m = embedded.manifest
    assert (m.model, m.side_info_model, m.metric) == (v1.ref, s1.ref, "l2")
    assert m.lineage == [f"embedded from image folder {(tmp_path / 'images').resolve()} (6 images, 4 class folders) "
                         f"by {v1.ref} with side-info {s1.ref}"]
    sources = image_sources(embedded)
    assert sources.classes == ("class0", "class1", "class2", "class4")
    assert sources.files == {0: "class0/a.png", 1: "class0/b.png", 2: "class1/c.png", 3: "class1/d.png",
                             4: "class2/e.png", 5: "class4/f.png"}
    assert json.loads((embedded.path / "sources.json").read_text())["folder"] == str(sources.folder)


def test_embed_errors_write_nothing(world, sets_root, tmp_path):
    before = factories.tree(sets_root)
    (tmp_path / "flat").mkdir()
    Image.fromarray(world.zoo.splits["test"].images[0, 0]).save(tmp_path / "flat" / "ok.png")
    (tmp_path / "flat" / "zz.png").write_text("not an image")
    fails(cli(world, sets_root, "sets", "embed", tmp_path / "flat", "--model", "v1", "--name", "x"),
          "zz.png: image is not a PNG or JPEG")
    fails(cli(world, sets_root, "sets", "embed", tmp_path / "none", "--model", "v1", "--name", "x"),
          "does not exist or is not a folder")
    assert factories.tree(sets_root) == before
    assert not list(sets_root.glob(".tmp-*"))
