"""Issue 11, "Progress and the command line": search names the hits' labels (and class names and image files for a
set embedded from an image folder), long CLI steps are visible in logs, and the listings stay light (no torch)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import factories
import pytest
from cli_checks import succeeds, table_rows
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from fct_registry.cli.app import app
from fct_registry.cli.common import progress
from fct_registry.vectors.embedding_set import EmbeddingSet

runner = CliRunner(env={"COLUMNS": "250"})  # wide enough that rich never wraps a table cell


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> factories.World:
    return factories.shared_world(tmp_path_factory)


def cli(world: factories.World, sets_root: Path, *args: object):
    return runner.invoke(app, ["--root", str(world.root), "--sets-root", str(sets_root), *map(str, args)])


def header(stdout: str) -> list[str]:
    """The column names of the first rich table in ``stdout``."""
    line = next(line for line in stdout.splitlines() if "rank" in line and "item_id" in line)
    return [cell.strip() for cell in line.split("┃")[1:-1]]


def test_search_names_the_stored_label_of_every_hit_in_the_table_and_in_json(world, tmp_path):
    split = world.zoo.splits["test"]
    Image.fromarray(split.images[7, 0]).save(tmp_path / "q.png")
    stdout = succeeds(cli(world, world.sets_root, "search", tmp_path / "q.png", "--k", "5", "--model", "v1"))
    assert header(stdout) == ["rank", "item_id", "score", "label"]  # no class names: not an image-folder set
    stored = EmbeddingSet.open(world.gallery).read()
    label_of = dict(zip(stored.ids.tolist(), stored.labels.tolist(), strict=True))
    rows = table_rows(stdout)
    assert len(rows) == 5 and int(rows[0][1]) == split.item_ids[7]
    assert [int(r[3]) for r in rows] == [label_of[int(r[1])] for r in rows]
    assert int(rows[0][3]) == split.labels[7]

    found = json.loads(succeeds(cli(world, world.sets_root, "search", tmp_path / "q.png", "--k", "5", "--model",
                                    "v1", "--json")))
    assert found["model"] == world.versions["v1"].ref.model_dump() and found["gallery"] == str(world.gallery)
    (query,) = found["queries"]
    assert query["image"] == str(tmp_path / "q.png")
    assert [(h["rank"], h["item_id"], h["label"]) for h in query["hits"]] == [
        (int(r[0]), int(r[1]), int(r[3])) for r in rows]
    assert [f"{h['score']:.4f}" for h in query["hits"]] == [r[2] for r in rows]
    assert all("class" not in h and "file" not in h for h in query["hits"])


def test_search_of_a_set_embedded_from_class_folders_names_classes_and_files(world, tmp_path):
    split = world.zoo.splits["test"]
    picks = {0: "a", 3: "b", 11: "c", 12: "d", 25: "e", 47: "f"}  # classes 0, 0, 1, 1, 2, 4
    names = {"class0": "sandal", "class1": "shirt", "class2": "bag", "class4": "sneaker"}
    for i, stem in picks.items():
        folder = tmp_path / "images" / names[f"class{split.labels[i]}"]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(split.images[i, 0]).save(folder / f"{stem}.png")
    sets_root = tmp_path / "sets"
    stdout = succeeds(cli(world, sets_root, "sets", "embed", tmp_path / "images", "--model", "v1", "--name",
                          "from_images", "--batch-size", "4"))
    assert "embedding images: 6 images in " in stdout  # the step's summary line (no terminal: rich draws nothing)

    Image.fromarray(split.images[11, 0]).save(tmp_path / "q.png")
    stdout = succeeds(cli(world, sets_root, "search", tmp_path / "q.png", "--k", "3", "--model", "v1", "--gallery",
                          "from_images"))
    assert f"(images under {(tmp_path / 'images').resolve()})" in " ".join(stdout.split())  # may wrap at 250
    assert header(stdout) == ["rank", "item_id", "score", "label", "class", "file"]
    rows = table_rows(stdout)
    # sorted class folders bag, sandal, shirt, sneaker -> labels 0..3; item ids follow the sorted file list
    files = ["bag/e.png", "sandal/a.png", "sandal/b.png", "shirt/c.png", "shirt/d.png", "sneaker/f.png"]
    classes = ["bag", "sandal", "shirt", "sneaker"]
    assert rows[0][1:] == ["3", rows[0][2], "2", "shirt", "shirt/c.png"]  # the query image itself
    for _, item, _, label, name, file in rows:
        assert file == files[int(item)] and name == classes[int(label)] == file.split("/")[0]

    found = json.loads(succeeds(cli(world, sets_root, "search", tmp_path / "q.png", "--k", "3", "--model", "v1",
                                    "--gallery", "from_images", "--json")))
    hits = found["queries"][0]["hits"]
    assert [(h["item_id"], h["label"], h["class"]) for h in hits] == [(int(r[1]), int(r[3]), r[4]) for r in rows]
    assert hits[0]["file"] == str((tmp_path / "images" / "shirt" / "c.png").resolve())


def test_sets_import_and_export_print_one_summary_line_per_step_off_a_terminal(world, tmp_path):
    sets_root = factories.copy_sets(world, tmp_path / "sets")
    stdout = succeeds(cli(world, sets_root, "sets", "export", "gallery_v1", "--out", tmp_path / "g.parquet"))
    assert "exporting gallery_v1: 50 vectors in " in stdout and " vectors/s" in stdout
    stdout = succeeds(cli(world, sets_root, "sets", "import", tmp_path / "g.parquet", "--model", "v1",
                          "--side-info", "s1", "--name", "back"))
    assert "importing g.parquet: 50 vectors in " in stdout
    assert stdout.index("importing g.parquet") < stdout.index("wrote ")


def test_the_progress_helper_logs_while_running_and_draws_a_bar_with_rate_and_eta_in_a_terminal():
    log = io.StringIO()
    with progress("embedding x", "images", out=Console(file=log, width=200), log_every_s=0) as step:
        step(10, 40)
        step(40, 40)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("embedding x: 10/40 images, ") and lines[0].endswith(" s left")
    assert lines[-1].startswith("embedding x: 40 images in ") and lines[-1].endswith(" images/s")

    failed = io.StringIO()
    with pytest.raises(RuntimeError), progress("failing", out=Console(file=failed, width=200)) as step:
        step(1, 2)
        raise RuntimeError("boom")
    assert failed.getvalue() == ""  # no summary line for a step that failed

    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=200)
    with progress("embedding y", "images", out=terminal) as step:
        for done in range(0, 41, 10):
            step(done, 40)
    drawn = screen.getvalue()
    assert "embedding y" in drawn and "40/40" in drawn and "━" in drawn


LISTING_IMPORTS = """
import sys
from typer.testing import CliRunner
from fct_registry.cli.app import app
for command in (["models", "list"], ["sets", "list"], ["lineage"]):
    result = CliRunner().invoke(app, ["--root", sys.argv[1], *command])
    assert result.exit_code == 0, result.output
print(sorted(m for m in ("torch", "faiss", "PIL") if m in sys.modules))
"""


def test_the_listings_import_neither_torch_nor_faiss_nor_pillow(tmp_path):
    done = subprocess.run([sys.executable, "-c", LISTING_IMPORTS, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
