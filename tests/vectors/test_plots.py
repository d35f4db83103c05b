"""The charts of the compatibility table and of the sweep, on small hand-built cases: fitted y range, reference
lines, error bars from ``_std`` keys, the share of the gap written on the chart, PNG size; the rows for dvc plots."""

from __future__ import annotations

import json
import struct

import pytest
from matplotlib.container import ErrorbarContainer

from fct_registry.core.errors import SearchError
from fct_registry.vectors.compatibility import compatibility_table
from fct_registry.vectors.plots import (
    case_rows,
    compatibility_chart,
    fitted_limits,
    protocol_title,
    save_png,
    sweep_chart,
    sweep_rows,
    write_compatibility_reports,
)

# top-1: old 0.70, new 0.90 -> FCT 0.86 closes 80 % of the gap, no side-info 0.83 closes 65 %
CASES = {"old_vs_old": {"cmc_top1": 0.70, "map": 0.50},
         "new_vs_new": {"cmc_top1": 0.90, "map": 0.80},
         "bct_vs_old": {"cmc_top1": 0.60, "map": 0.55},
         "new_vs_upgraded_noside": {"cmc_top1": 0.83, "map": 0.74, "cmc_top1_std": 0.01, "map_std": 0.005,
                                    "n_seeds": 3.0},
         "new_vs_upgraded": {"cmc_top1": 0.86, "map": 0.77, "cmc_top1_std": 0.002, "map_std": 0.001, "n_seeds": 3.0}}


def _run(old_dim: int, side_dim: int, old: float, fct: float) -> dict:
    return {"old_dim": old_dim, "side_dim": side_dim,
            "old_vs_old": {"cmc_top1": old, "map": old - 0.2}, "new_vs_new": {"cmc_top1": 0.9, "map": 0.8},
            "new_vs_upgraded_noside": {"cmc_top1": 0.8, "map": 0.7, "cmc_top1_std": 0.004, "map_std": 0.002},
            "new_vs_upgraded": {"cmc_top1": fct, "map": fct - 0.06, "cmc_top1_std": 0.002, "map_std": 0.001}}


RUNS = [_run(8, 32, 0.7, 0.85), _run(8, 128, 0.7, 0.86), _run(128, 32, 0.8, 0.87), _run(128, 128, 0.8, 0.88)]


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _reference_levels(ax) -> set[float]:
    """y of the dashed horizontal lines (old/old, new/new)."""
    return {round(float(line.get_ydata()[0]), 6) for line in ax.lines
            if line.get_linestyle() == "--" and len(set(line.get_ydata())) == 1}


def _yerr_containers(ax) -> list[ErrorbarContainer]:
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.has_yerr]


def test_compatibility_chart_fits_y_to_the_data_and_draws_references_and_gap():
    fig = compatibility_chart(CASES, protocol_title("fashion_mnist", "class_subset", "l2", 10000))
    top1, map_ = fig.axes
    low, high = top1.get_ylim()
    assert 0.5 < low < 0.6 and 0.90 < high < 0.95  # fitted: 0.60..0.90 plus a margin, not [0, 1]
    assert map_.get_ylim()[0] > 0.4 and map_.get_ylim()[1] < 0.85
    assert _reference_levels(top1) == {0.7, 0.9} and _reference_levels(map_) == {0.5, 0.8}
    assert "closes 80.0% of the old->new gap" in top1.get_title(loc="left")
    assert "without side-info 65.0%" in top1.get_title(loc="left")
    assert {"80.0% of the gap", "65.0% of the gap"} <= {t.get_text() for t in top1.texts}
    title = fig.get_suptitle()
    assert title.startswith("Fashion-MNIST class_subset: query = gallery (test split, 10,000 images)")
    assert "own item excluded, L2" in title and "3 seeds" in title


def test_error_bars_come_from_std_keys_only():
    fig = compatibility_chart(CASES, "t")
    bars = _yerr_containers(fig.axes[0])
    assert len(bars) == 2  # the two h cases; single runs get none
    heights = sorted(float(seg[1, 1] - seg[0, 1]) for c in bars for seg in c.lines[2][0].get_segments())
    assert heights == pytest.approx([0.004, 0.02])  # ± std
    plain = {name: {m: v for m, v in values.items() if not m.endswith("_std")} for name, values in CASES.items()}
    assert _yerr_containers(compatibility_chart(plain, "t").axes[0]) == []
    single = compatibility_chart({"a_vs_b": {"map": 0.3}}, "t")
    assert "one run per case" in single.get_suptitle() and len(single.axes) == 1  # no top-1 panel without top-1


def test_save_png_has_the_figure_size_in_pixels(tmp_path):
    fig = compatibility_chart(CASES, "t")
    path = save_png(fig, tmp_path / "deep" / "chart.png", dpi=50)
    width, height = fig.get_size_inches() * 50
    assert path == tmp_path / "deep" / "chart.png"
    assert _png_size(path) == (round(width), round(height)) == (400, 370)


def test_sweep_chart_one_line_per_side_info_with_references_and_gap_shares(tmp_path):
    fig = sweep_chart(RUNS, "sweep")
    top1, map_, top1_gap, map_gap = fig.axes
    labels = [c.get_label() for c in _yerr_containers(top1)]
    assert labels == ["h(old), no side-info", "h(old, side-info 32-d)", "h(old, side-info 128-d)"]
    old_line = next(line for line in top1.lines if line.get_label() == "old/old")
    assert list(old_line.get_xdata()) == [8, 128] and list(old_line.get_ydata()) == [0.7, 0.8]
    assert 0.65 < top1.get_ylim()[0] < 0.7 and 0.9 < top1.get_ylim()[1] < 0.95
    fct128 = _yerr_containers(top1_gap)[2]
    assert list(fct128.lines[0].get_ydata()) == pytest.approx([0.8, 0.8])  # (0.86-0.7)/0.2, (0.88-0.8)/0.1
    assert 1.0 in _reference_levels(top1_gap) and top1_gap.get_ylim()[1] < 1.1
    assert top1_gap.get_xlabel() == "old embedding dim" and map_gap.get_ylim()[0] > 0.3
    assert _png_size(save_png(fig, tmp_path / "sweep.png", dpi=40)) == (416, 300)
    with pytest.raises(SearchError, match="runs is empty"):
        sweep_chart([], "sweep")


def test_fitted_limits():
    low, high = fitted_limits([0.83, 0.86])
    assert low == pytest.approx(0.83 - 0.08 * 0.03) and high == pytest.approx(0.86 + 0.08 * 0.03)
    assert fitted_limits([0.5, 0.6], [0.0, 0.1], margin=0.0) == pytest.approx((0.5, 0.7))
    assert fitted_limits([0.5], margin=0.0, min_span=0.02) == pytest.approx((0.49, 0.51))
    assert fitted_limits([0.001, 0.5])[0] == 0.0  # fractions: never below 0
    assert fitted_limits([-0.2, 0.5])[0] < -0.2  # a negative gap share stays visible
    assert fitted_limits([float("nan"), 0.4, 0.6], margin=0.0) == pytest.approx((0.4, 0.6))
    with pytest.raises(SearchError, match="every value is missing"):
        fitted_limits([float("nan")])
    with pytest.raises(SearchError, match="cases is empty"):
        compatibility_chart({}, "t")
    with pytest.raises(SearchError, match="no case has a metric to plot; cases: a_vs_b"):
        compatibility_chart({"a_vs_b": {"n_seeds": 1.0}}, "t")


def test_rows_for_dvc_plots_are_flat():
    rows = case_rows(CASES)
    assert rows[0] == {"case": "old_vs_old", "cmc_top1": 0.70, "cmc_top1_std": 0.0, "map": 0.50, "map_std": 0.0}
    assert rows[-1] == {"case": "new_vs_upgraded", "cmc_top1": 0.86, "cmc_top1_std": 0.002, "map": 0.77,
                        "map_std": 0.001}
    assert sweep_rows(RUNS, metrics=("cmc_top1",)) == [
        {"old_dim": 8, "cmc_top1_old_vs_old": 0.7, "cmc_top1_new_vs_new": 0.9, "cmc_top1_none": 0.8,
         "cmc_top1_side32": 0.85, "cmc_top1_side128": 0.86},
        {"old_dim": 128, "cmc_top1_old_vs_old": 0.8, "cmc_top1_new_vs_new": 0.9, "cmc_top1_none": 0.8,
         "cmc_top1_side32": 0.87, "cmc_top1_side128": 0.88}]


def test_write_compatibility_reports(tmp_path):
    paths = write_compatibility_reports(CASES, "t", tmp_path / "reports")
    assert [p.name for p in paths] == ["retrieval.md", "retrieval.png", "retrieval_plot.json"]
    assert paths[0].read_text() == compatibility_table(CASES)
    assert json.loads(paths[2].read_text()) == case_rows(CASES)
    assert _png_size(paths[1]) == (960, 888)
