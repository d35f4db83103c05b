"""Backfill curves (FastFill, Jaeckle et al., ICLR 2023): orders, mixed galleries and curve points against the
plain-loop oracle, on hand-built embeddings with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from metric_oracle import exact_score, oracle_flips, oracle_metrics, oracle_top1

from fct_registry.core.errors import SearchError
from fct_registry.vectors.backfill_curve import backfill_curve, backfill_order, curve_auc, mixed_gallery
from fct_registry.vectors.backfill_report import summarise, targets

# 6 items, 2 classes on a line: new vectors sit with their class; transformed vectors of items 1 and 4 landed in
# the other class's cluster (h got them wrong), the others near their own.
LABELS = np.array([0, 0, 0, 1, 1, 1])
IDS = np.arange(100, 106)
NEW = np.array([[0], [1], [2], [10], [11], [12]], dtype=np.float32)
TRANSFORMED = np.array([[0], [11], [2], [10], [1], [12]], dtype=np.float32)


def oracle_point(gallery, before):
    args = (NEW.tolist(), LABELS.tolist(), gallery.tolist(), LABELS.tolist(), "l2", IDS.tolist(), IDS.tolist())
    point = oracle_metrics(*args, top_k=(1, 5), score=exact_score)
    point["negative_flips"] = oracle_flips(before, oracle_top1(*args, score=exact_score))["negative_flips"]
    return point


def test_orders():
    sigma = np.array([0.1, 2.0, 0.1, -1.0, 3.0, 0.5], dtype=np.float32)
    np.testing.assert_array_equal(backfill_order("uncertainty", 6, sigma=sigma), [4, 1, 5, 0, 2, 3])  # ties: position
    distance = np.linalg.norm(NEW - TRANSFORMED, axis=1)
    assert set(backfill_order("distance", 6, distance=distance)[:2]) == {1, 4}
    random = backfill_order("random", 6, seed=3)
    np.testing.assert_array_equal(random, backfill_order("random", 6, seed=3))
    assert sorted(random) == list(range(6)) and random.dtype == np.int64
    with pytest.raises(SearchError, match=r"order 'uncertainty' needs sigma as \(6,\) finite values, got None"):
        backfill_order("uncertainty", 6)
    with pytest.raises(SearchError, match="backfill order must be one of"):
        backfill_order("loss", 6)


def test_mixed_gallery_takes_the_first_items_of_the_order_from_new():
    gallery = mixed_gallery(TRANSFORMED, NEW, np.array([4, 1, 0, 2, 3, 5]), 1)
    np.testing.assert_array_equal(gallery[:, 0], [0, 11, 2, 10, 11, 12])
    assert TRANSFORMED[4, 0] == 1  # the input is not modified


def test_curve_points_equal_the_oracle_and_the_uncertainty_order_repairs_first():
    before = [True] * 6  # every query right before the update
    order = backfill_order("uncertainty", 6, sigma=np.array([0, 5, 0, 0, 4, 0], dtype=np.float32))
    curve = backfill_curve(NEW, LABELS, IDS, TRANSFORMED, NEW, LABELS, IDS, order, "l2", (1, 5),
                           before=np.ones(6, bool), points=4)
    assert [p["backfilled"] for p in curve] == [0, 2, 4, 6] and [p["fraction"] for p in curve] == [0, 1 / 3, 2 / 3, 1]
    for point in curve:
        want = oracle_point(mixed_gallery(TRANSFORMED, NEW, order, int(point["backfilled"])), before)
        for key, value in want.items():
            assert point[key] == pytest.approx(float(value), abs=1e-9), (point, key)
    assert curve[0]["negative_flips"] > 0 and curve[1]["negative_flips"] == 0 == curve[-1]["negative_flips"]
    assert curve[1]["map"] == curve[-1]["map"] > curve[0]["map"]  # the two bad items were backfilled first
    auc = curve_auc(curve)
    assert auc["map"] == pytest.approx(np.mean([p["map"] for p in curve]))
    assert set(auc) == {"cmc_top1", "cmc_top5", "map", "negative_flips"}


def test_bad_curves_are_refused():
    with pytest.raises(SearchError, match="permutation"):
        backfill_curve(NEW, LABELS, IDS, TRANSFORMED, NEW, LABELS, IDS, np.zeros(6, np.int64), "l2")
    with pytest.raises(SearchError, match="points >= 2"):
        backfill_curve(NEW, LABELS, IDS, TRANSFORMED, NEW, LABELS, IDS, np.arange(6), "l2", points=1)
    with pytest.raises(SearchError, match="at least one point"):
        curve_auc([])


def test_summary_and_targets_from_two_seeds():
    point = lambda m, f: {"fraction": f, "backfilled": f * 10, "cmc_top1": m, "cmc_top5": m, "map": m}  # noqa: E731
    curves = {name: [[point(a, 0.0), point(1.0, 1.0)], [[point(b, 0.0), point(1.0, 1.0)]][0]]
              for name, a, b in (("fct_random", 0.5, 0.7), ("fct_random_noside", 0.4, 0.4),
                                 ("fastfill_uncertainty", 0.9, 0.9), ("fastfill_uncertainty_noside", 0.8, 0.8))}
    summary = summarise(curves)
    assert summary["fct_random"]["auc"]["map"] == pytest.approx((0.75 + 0.85) / 2)
    assert summary["fct_random"]["points"][0]["map"] == pytest.approx(0.6)
    reference = {"old_vs_old": {"cmc_top1": 0.0, "map": 0.0}, "new_vs_new": {"cmc_top1": 1.0, "map": 1.0}}
    got = targets(summary, reference)
    assert got["fastfill_map_auc_minus_new_new_map"] == pytest.approx(0.95 - 1.0)
    assert got["noside_uncertainty_share_of_fct_random_to_new_new"] == pytest.approx((0.9 - 0.7) / (1 - 0.7))
    assert got["fastfill_map_gap_closed_at_0"] == pytest.approx(0.9)
