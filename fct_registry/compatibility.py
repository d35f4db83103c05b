"""The compatibility table: every (query model, gallery) case of FCT's evaluation, aggregated over seeds.

Cases are named ``<query>_vs_<gallery>`` (FCT, Ramanujan et al., CVPR 2022, Table 1): ``old_vs_old``,
``new_vs_new``, ``new_vs_old``, ``bct_vs_old``, ``bct_vs_bct``, ``new_vs_upgraded_noside``,
``new_vs_upgraded``, ``v3_vs_v3``, ``v3_vs_upgraded_chain``, ``v3_vs_upgraded_direct``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fct_registry.evaluation import gap_closed

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
    fraction points), and ``fct_minus_bct_top1`` (FCT's cross-model top-1 minus BCT's) when BCT ran.
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
    return out
