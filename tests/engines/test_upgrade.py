"""Upgrading a stored embedding set through a chain of real ONNX forward transformations (local and Ray engines)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from engine_world import (
    D_MID,
    D_NEW,
    D_OLD,
    D_SIDE,
    S1,
    S2,
    V1,
    V2,
    V3,
    by_hand,
    chain,
    digests,
    leftovers,
    make_set,
    step,
)

from fct_registry.core.errors import UpgradeError
from fct_registry.engines.chain import ChainStep, apply_chain, validate_chain
from fct_registry.engines.run import upgrade_set
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.vectors.batch import with_model
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.set_writer import write_embedding_set


def test_two_hop_upgrade_equals_torch_by_hand(h, tmp_path):
    source = make_set(tmp_path / "gallery-v1")
    before = digests(source.path)
    calls = []
    upgraded = upgrade_set(source.path, chain(h), tmp_path / "gallery-v3", batch_rows=64,
                           progress=lambda done, total: calls.append((done, total)))

    got, want = EmbeddingSet.open(upgraded.path, verify=True).read(), source.read()
    np.testing.assert_allclose(got.embeddings, by_hand(h, ["h1", "h2"], want), atol=1e-4)
    assert got.embeddings.shape == (300, D_NEW)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.side_info, want.side_info)
    m = upgraded.manifest
    assert (m.model, m.side_info_model, m.dim, m.side_info_dim, m.count) == (V3, S1, D_NEW, D_SIDE, 300)
    assert (m.metric, m.normalized) == (source.manifest.metric, source.manifest.normalized)
    assert [s.rows for s in m.shards] == [128, 128, 44]
    assert m.lineage == ["gallery v1 embedded",
                         f"upgraded {V1} -> {V2} via fct-transformation/h1 with side-info {S1}",
                         f"upgraded {V2} -> {V3} via fct-transformation/h2 with side-info {S1}"]
    assert calls == [(128, 300), (256, 300), (300, 300)]  # after each shard: 128, 128, 44 rows
    assert digests(source.path) == before
    assert leftovers(tmp_path) == []


def test_kept_side_info_lets_the_upgraded_set_be_upgraded_again(h, tmp_path):
    source = make_set(tmp_path / "v1")
    two_hops = upgrade_set(source.path, chain(h), tmp_path / "v3-direct").read()
    v2 = upgrade_set(source.path, chain(h)[:1], tmp_path / "v2")
    assert v2.manifest.model == V2 and v2.manifest.side_info_model == S1
    one_by_one = upgrade_set(v2.path, chain(h)[1:], tmp_path / "v3-stepwise").read()
    np.testing.assert_array_equal(one_by_one.ids, two_hops.ids)
    np.testing.assert_allclose(one_by_one.embeddings, two_hops.embeddings, atol=1e-6)


def test_transformation_without_side_info_on_a_set_without_side_info(h, tmp_path):
    source = make_set(tmp_path / "v1", side=False)
    upgraded = upgrade_set(source.path, [step(h, "noside", V1, V2, side=None)], tmp_path / "v2")
    got = upgraded.read()
    np.testing.assert_allclose(got.embeddings, by_hand(h, ["noside"], source.read()), atol=1e-4)
    assert got.side_info is None and upgraded.manifest.side_info_model is None


def test_validate_chain_returns_one_session_per_step(h, tmp_path):
    models = validate_chain(chain(h), make_set(tmp_path / "v1"))
    assert [m.output_dim for m in models] == [D_MID, D_NEW]


def _corrupt(h, tmp_path: Path) -> list[ChainStep]:
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(h["h1"].path.read_bytes()[:200])
    return [step(h, "h1", V1, V2).model_copy(update={"onnx_path": bad})]


BAD_CHAINS = {
    "empty chain": (lambda h, t: [], True, r"already at target v1@"),
    "wrong source": (lambda h, t: [step(h, "h2", V2, V3)], True,
                     rf"step 1 .*reads {V2} vectors, but set .*v1 holds {V1} vectors"),
    "broken link": (lambda h, t: [step(h, "h1", V1, V2), step(h, "h2", V3, V3)], True,
                    rf"step 2 \(fct-transformation/h2\) reads {V3} vectors, but step 1 outputs {V2} vectors"),
    "set dim mismatch": (lambda h, t: [step(h, "h2", V1, V2)], True,
                         r"step 1 .*'old_embedding' has shape \('batch', 6\), but the set provides width 4"),
    "link dim mismatch": (lambda h, t: [step(h, "h1", V1, V2), step(h, "h1", V2, V3)], True,
                          r"step 2 .*'old_embedding' has shape \('batch', 4\), but step 1 provides width 6"),
    "missing side-info": (lambda h, t: chain(h), False, rf"needs side-info {S1}, but set .*v1 stores no side-info"),
    "other side-info": (lambda h, t: [step(h, "h1", V1, V2, side=S2)], True,
                        rf"needs side-info {S2}, but set .*v1 stores side-info {S1}"),
    "inputs differ from step": (lambda h, t: [step(h, "h1", V1, V2, side=None)], True,
                                r"has inputs \['old_embedding', 'side_info'\]; expected \['old_embedding'\]"),
    "corrupted onnx": (_corrupt, True, r"step 1 \(fct-transformation/h1\): cannot load ONNX model .*corrupt\.onnx"),
}


@pytest.mark.parametrize("case", BAD_CHAINS)
def test_bad_chain_is_refused_and_nothing_is_written(h, tmp_path, case):
    make_steps, side, message = BAD_CHAINS[case]
    source = make_set(tmp_path / "v1", side=side)
    before = digests(source.path)
    with pytest.raises(UpgradeError, match=message) as info:
        upgrade_set(source.path, make_steps(h, tmp_path), tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert digests(source.path) == before


@pytest.mark.parametrize("workers", [1, 3])
def test_nan_output_is_refused_and_nothing_is_written(h, tmp_path, workers):
    """Rows 7 and 70 poisoned, in batches 0 and 1 of 64 rows: however many threads run the batches, the error
    names the first bad item of the first failing batch."""
    source = make_set(tmp_path / "v1", side=False)
    batch = source.read()
    batch.embeddings[[7, 70], 2] = 20.0  # log(100 - 400) = NaN
    poisoned = write_embedding_set(tmp_path / "poisoned", with_model(batch, V1), model=V1)
    with pytest.raises(UpgradeError, match=rf"step 1 \(fct-transformation/nan\) produced NaN/inf for item_id "
                                           rf"{batch.ids[7]} \(1 rows in this batch\)"):
        upgrade_set(poisoned.path, [step(h, "nan", V1, V2, side=None)], tmp_path / "out", batch_rows=64,
                    workers=workers)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_destination_rules_and_bad_arguments(h, tmp_path):
    source = make_set(tmp_path / "v1")
    existing = upgrade_set(source.path, chain(h), tmp_path / "v3")
    with pytest.raises(UpgradeError, match="already exists; pass overwrite=True"):
        upgrade_set(source.path, chain(h), existing.path)
    replaced = upgrade_set(source.path, chain(h), existing.path, overwrite=True, batch_rows=7)
    np.testing.assert_allclose(replaced.read().embeddings, existing.read().embeddings, atol=1e-6)
    for inside in (tmp_path / "v1" / ".." / "v1", source.path / "v3"):
        with pytest.raises(UpgradeError, match="is or lies inside the source set"):
            upgrade_set(source.path, chain(h), inside, overwrite=True)
    with pytest.raises(UpgradeError, match="batch_rows must be an integer >= 1, got 0"):
        upgrade_set(source.path, chain(h), tmp_path / "x", batch_rows=0)
    with pytest.raises(UpgradeError, match="engine must be 'local' or 'ray', got 'spark'"):
        upgrade_set(source.path, chain(h), tmp_path / "x", engine="spark")
    assert not (tmp_path / "x").exists() and leftovers(tmp_path) == []


KILL_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from fct_registry.engines.chain import ChainStep
    from fct_registry.engines.run import upgrade_set

    def progress(done, total):
        print(done, flush=True)
        time.sleep(0.05)

    steps = [ChainStep.model_validate(s) for s in json.loads(sys.argv[1])]
    upgrade_set(sys.argv[2], steps, sys.argv[3], batch_rows=500, progress=progress)
""")


def test_kill_9_mid_upgrade_leaves_source_intact_and_rerun_completes(h, tmp_path):
    source = make_set(tmp_path / "v1", n=20_000, shard_rows=2_000)
    before = digests(source.path)
    dest = tmp_path / "v3"
    steps = chain(h)
    args = [json.dumps([s.model_dump(mode="json") for s in steps]), str(source.path), str(dest)]
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *args], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if int(line) >= 6_000:  # three output shards are on disk in the temp dir
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the upgrade finished before it could be killed"

    (partial,) = leftovers(tmp_path)
    assert partial.startswith(".tmp-v3.new-") and (tmp_path / partial / "part-00002.parquet").exists()
    assert not dest.exists()
    assert digests(source.path) == before
    EmbeddingSet.open(source.path, verify=True)

    rerun = upgrade_set(source.path, steps, dest, batch_rows=4096)
    assert EmbeddingSet.open(dest, verify=True).manifest.count == 20_000 == rerun.manifest.count
    assert leftovers(tmp_path) == []
    np.testing.assert_allclose(rerun.read().embeddings, by_hand(h, ["h1", "h2"], source.read()), atol=1e-4)


@pytest.mark.slow
def test_ray_engine_writes_the_same_set_as_the_local_engine(h, tmp_path):
    import ray

    source = make_set(tmp_path / "v1", n=300, shard_rows=128)  # 3 shards
    local = upgrade_set(source.path, chain(h), tmp_path / "local", batch_rows=64)
    calls = []
    distributed = upgrade_set(source.path, chain(h), tmp_path / "ray", batch_rows=64, engine="ray",
                              progress=lambda done, total: calls.append((done, total)))
    assert not ray.is_initialized()  # the call started Ray, so it shut it down
    assert digests(distributed.path) == digests(local.path)  # byte-identical shards and manifest
    np.testing.assert_allclose(distributed.read().embeddings, by_hand(h, ["h1", "h2"], source.read()), atol=1e-4)
    assert distributed.manifest.model == V3 and sorted(calls)[-1] == (300, 300) and len(calls) == 3
    assert leftovers(tmp_path) == []


def test_without_ids_a_nan_row_skips_the_remaining_steps_and_comes_out_nan(h):
    """The Ray actors' mode (the driver checks the output): ONNX Runtime refuses NaN/inf input, so a row that is
    NaN, or becomes NaN at a step, skips the later steps instead of failing the whole batch."""
    steps = [step(h, "nan", V1, V2, side=None), step(h, "noside", V2, V3, side=None)]
    models = [OnnxModel(s.onnx_path) for s in steps]
    x = np.random.default_rng(0).normal(size=(5, D_OLD)).astype(np.float32)
    x[1, 0] = 20.0  # log(100 - 400) = NaN at step 1
    x[3, 2] = np.nan  # stored NaN
    out, sigma = apply_chain(models, steps, x, None)
    assert sigma is None
    assert out.shape == (5, D_MID) and np.isnan(out[[1, 3]]).all()
    np.testing.assert_array_equal(out[[0, 2, 4]], apply_chain(models, steps, x[[0, 2, 4]], None)[0])
    x[3, 2] = 0.0  # with ids (the local engine, which refuses stored NaN first) a NaN output is an error
    with pytest.raises(UpgradeError, match=r"step 1 \(fct-transformation/nan\) produced NaN/inf for item_id 11 "):
        apply_chain(models, steps, x, None, ids=np.arange(10, 15))
