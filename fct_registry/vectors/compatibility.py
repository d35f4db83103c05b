"""The compatibility table: every (query model, gallery) case of FCT's evaluation, aggregated over seeds,
written as a Markdown table (the charts are in :mod:`fct_registry.vectors.plots`).

Cases are named ``<query>_vs_<gallery>`` (FCT, Ramanujan et al., CVPR 2022, Table 1): ``old_vs_old``,
``new_vs_new``, ``new_vs_old``, ``bct_vs_old``, ``bct_vs_bct``, ``new_vs_upgraded_noside``,
``new_vs_upgraded``, ``v3_vs_v3``, ``v3_vs_upgraded_chain``, ``v3_vs_upgraded_direct``.

Besides CMC top-k and mAP, every case after an update carries ``negative_flips`` and ``positive_flips``
(:mod:`fct_registry.vectors.flips`; Yan et al., CVPR 2021): the share of queries whose top-1 neighbour was right
before the update and is wrong after it (and the reverse), "before" being the stored gallery's own model searching
it (``old_vs_old``; ``new_vs_new`` for a gallery stored by the new model, ``v3_vs_upgraded_from_v2``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fct_registry.core.errors import SearchError

Metrics = dict[str, float]


def mean_std(runs: Sequence[Metrics]) -> Metrics:
    """Mean of each metric over runs (e.g. seeds of h), plus ``<key>_std`` (sample std, ddof=1) and ``n_seeds``.

    A single run gets no ``_std`` keys.
    """
    keys = list(runs[0])
    out = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    if len(runs) > 1:
        out |= {f"{k}_std": float(np.std([r[k] for r in runs], ddof=1)) for k in keys}
    out["n_seeds"] = float(len(runs))
    return out


def summary(cases: dict[str, Metrics]) -> dict[str, float]:
    """Headline numbers: fraction of the old->new gap closed by FCT (with and without side-info) and side-info's gain.

    Keys: ``fct_gap_closed_top1``, ``fct_gap_closed_map``, ``noside_gap_closed_top1``,
    ``noside_gap_closed_map``, ``side_info_gain_top1``, ``side_info_gain_map`` (fractions; gains in absolute
    fraction points), ``fct_minus_bct_top1`` (FCT's cross-model top-1 minus BCT's) when BCT ran, and the negative
    flip rates ``fct_negative_flips``, ``noside_negative_flips``, ``bct_negative_flips`` (``bct_vs_old``) of the
    cases that carry them.
    """
    old, new = cases["old_vs_old"], cases["new_vs_new"]
    out = {}
    for name, case in (("fct", "new_vs_upgraded"), ("noside", "new_vs_upgraded_noside")):
        for metric, key in (("top1", "cmc_top1"), ("map", "map")):
            out[f"{name}_gap_closed_{metric}"] = gap_closed(old[key], new[key], cases[case][key])
    for metric, key in (("top1", "cmc_top1"), ("map", "map")):
        out[f"side_info_gain_{metric}"] = cases["new_vs_upgraded"][key] - cases["new_vs_upgraded_noside"][key]
    if "bct_vs_old" in cases:
        out["fct_minus_bct_top1"] = cases["new_vs_upgraded"]["cmc_top1"] - cases["bct_vs_old"]["cmc_top1"]
    for name, case in (("fct", "new_vs_upgraded"), ("noside", "new_vs_upgraded_noside"), ("bct", "bct_vs_old")):
        if "negative_flips" in cases.get(case, {}):
            out[f"{name}_negative_flips"] = cases[case]["negative_flips"]
    return out


def headline(cases: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The few numbers ``dvc metrics show`` prints (``metrics/fct.json``): FCT's cross-model CMC top-1 and mAP
    (``new_vs_upgraded``, mean over seeds of h) and the share of the old->new gap each closes (fractions).

    Keys: ``top1``, ``map``, ``top1_gap_closed``, ``map_gap_closed``; with negative flips measured, also
    ``negative_flips`` (FCT with side-info) and ``bct_negative_flips`` (BCT queries against the old gallery,
    ``bct_vs_old``), fractions of the queries (Yan et al., CVPR 2021; lower is better).

    Raises:
        KeyError: ``old_vs_old``, ``new_vs_new`` or ``new_vs_upgraded`` is missing.
        SearchError: new/new equals old/old (no gap to close).
    """
    old, new, fct = cases["old_vs_old"], cases["new_vs_new"], cases["new_vs_upgraded"]
    out = {"top1": fct["cmc_top1"], "map": fct["map"],
           "top1_gap_closed": gap_closed(old["cmc_top1"], new["cmc_top1"], fct["cmc_top1"]),
           "map_gap_closed": gap_closed(old["map"], new["map"], fct["map"])}
    if "negative_flips" in fct:
        out["negative_flips"] = fct["negative_flips"]
    if "negative_flips" in cases.get("bct_vs_old", {}):
        out["bct_negative_flips"] = cases["bct_vs_old"]["negative_flips"]
    return out


def compatibility_table(cases: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table, one row per case (e.g. ``old_vs_old``, ``new_vs_upgraded``), one column per metric.

    Columns are the metric keys in first-seen order; values are printed as fractions with 4 decimals
    (``0.6840``), a metric missing from a case as ``-``.

    Args:
        cases: ``{case name: {metric key: value}}``.

    Returns:
        The table as a string: header, separator and one line per case, newline-terminated.

    Raises:
        SearchError: ``cases`` is empty.
    """
    names = _metric_names(cases)
    lines = ["| case | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for case, values in cases.items():
        cells = [f"{values[n]:.4f}" if n in values else "-" for n in names]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gap_closed(old: float, new: float, fct: float) -> float:
    """Fraction of the old->new gap closed by FCT: ``(fct - old) / (new - old)``.

    FCT reports e.g. ImageNet CMC top-1 old/old 46.4, new/new 68.4, FCT 65.1 -> 0.85 (arXiv 2112.02805, Sec. 5).
    Values may be fractions or percentages (the ratio is the same); the result is 1.0 when FCT matches the
    new model, 0.0 when it matches the old one, and can leave [0, 1].

    Raises:
        SearchError: ``new == old`` (no gap to close).
    """
    if new == old:
        raise SearchError(f"new == old == {old}: there is no gap to close")
    return (fct - old) / (new - old)


def _metric_names(cases: Mapping[str, Mapping[str, float]]) -> list[str]:
    if not cases:
        raise SearchError("cases is empty: expected at least one {case: {metric: value}} entry")
    return list(dict.fromkeys(name for values in cases.values() for name in values))
