"""``fct-registry backfill`` through Typer's CliRunner over a real MLflow SQLite registry, real ONNX models and the
tiny world's prepared split (``backfill_world``: a FastFill h v1 + s1 -> v2 and the upgraded gallery)."""

from __future__ import annotations

from pathlib import Path

import backfill_world
import factories
import numpy as np
import pytest
from cli_checks import fails, succeeds
from typer.testing import CliRunner

from fct_registry.cli.app import app
from fct_registry.vectors.embedding_set import EmbeddingSet

runner = CliRunner(env={"COLUMNS": "250"})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> factories.World:
    return backfill_world.fastfill_world(tmp_path_factory)


@pytest.fixture
def sets_root(world: factories.World, tmp_path: Path) -> Path:
    return factories.copy_sets(world, tmp_path / "sets")


def cli(world: factories.World, sets_root: Path, *args: object):
    return runner.invoke(app, ["--root", str(world.root), "--sets-root", str(sets_root), *map(str, args)])


def said(result) -> str:
    """stdout of a successful command, its lines joined (rich wraps a long line at the terminal's width)."""
    return " ".join(succeeds(result).split())


def test_help_reads_as_the_workflow():
    text = " ".join(runner.invoke(app, ["backfill", "--help"]).stdout.split())
    assert "After `upgrade`" in text and "most uncertain items first" in text and "--fraction" in text
    assert "6. backfill" in " ".join(runner.invoke(app, ["--help"]).stdout.split())


def test_upgrade_then_backfill_in_steps(world, sets_root):
    v2 = world.versions["v2"]
    upgraded = sets_root / "gallery_v1@v2"
    stdout = said(cli(world, sets_root, "backfill", "gallery_v1@v2", "--to", "v2", "--fraction", "0.2"))
    assert (f"wrote {upgraded}: 10 of 50 items backfilled with {v2.ref} (10 re-embedded now, uncertainty order) "
            f"from prepared split {world.root / 'data' / 'prepared' / 'test.npz'}") in stdout
    assert "new-backbone queries (50 labelled items) against the mixed gallery: cmc_top1" in stdout
    assert "backfilling gallery_v1@v2: 60 images in" in stdout  # 50 queries + 10 items, off a terminal
    stdout = said(cli(world, sets_root, "backfill", "gallery_v1@v2", "--to", "v2", "--fraction", "0.3"))
    assert "15 of 50 items backfilled" in stdout and "(5 re-embedded now" in stdout
    untouched = factories.tree(sets_root)
    stdout = said(cli(world, sets_root, "backfill", "gallery_v1@v2", "--to", "v2", "--fraction", "0.1"))
    assert stdout == (f"nothing to do: 15 of 50 items of {upgraded} are already backfilled, at "
                                        "least round(0.1 x 50) = 5; pass a larger --fraction to backfill more")
    assert factories.tree(sets_root) == untouched
    assert EmbeddingSet.open(upgraded).read().backfilled.sum() == 15


def test_out_writes_a_new_set_and_a_rerun_completes(world, sets_root):
    source = factories.tree(sets_root / "gallery_v1@v2")
    args = ("backfill", "gallery_v1@v2", "--to", "v2", "--fraction", "1", "--order", "random", "--seed", "3",
            "--out", sets_root / "full", "--eval-queries", "0")
    stdout = said(cli(world, sets_root, *args))
    assert "50 of 50 items backfilled" in stdout and "random order" in stdout and "queries" not in stdout
    assert factories.tree(sets_root / "gallery_v1@v2") == source
    full = EmbeddingSet.open(sets_root / "full").read()
    assert full.backfilled.all()
    stdout = said(cli(world, sets_root, *args))
    assert f"{sets_root / 'full'} already holds this backfill (50 of 50 items, verified)" in stdout
    other_seed = [("4" if arg == "3" else arg) for arg in args]
    fails(cli(world, sets_root, *other_seed), "already exists and is not this backfill")


def test_errors_are_one_line_and_write_nothing(world, sets_root, tmp_path):
    before = factories.tree(sets_root)
    v2, v3 = world.versions["v2"].ref, world.versions["v3"].ref
    fails(cli(world, sets_root, "backfill", "gallery_v1@v2", "--fraction", "0.2"),  # --to defaults to @champion v3
          f"holds vectors of {v2}, not of --to {v3}; upgrade it to v3 first")
    fails(cli(world, sets_root, "backfill", "gallery_v1", "--to", "v1", "--fraction", "0.2"),
          "has no uncertainty column", "use --order random")
    for fraction in ("0", "1.01", "-1"):
        fails(cli(world, sets_root, "backfill", "gallery_v1@v2", "--to", "v2", "--fraction", fraction),
              f"fraction {float(fraction)} is outside (0, 1]")
    data = tmp_path / "data"
    data.mkdir()
    split = world.zoo.splits["test"]
    images = split.images.copy()
    images[7, 0, 0, 0] ^= 1  # one pixel of one image
    np.savez(data / "test.npz", images=images, labels=split.labels, item_ids=split.item_ids)
    fails(cli(world, sets_root, "backfill", "gallery_v1@v2", "--to", "v2", "--fraction", "0.2", "--images", data),
          f"prepared split {data / 'test.npz'} changed since the set was embedded")
    assert factories.tree(sets_root) == before
