"""Chain planner and lineage tree over hand-built compatibility graphs (no MLflow)."""

from __future__ import annotations

import hashlib

import pytest

from fct_registry.core.errors import ChainError
from fct_registry.core.refs import ModelRef
from fct_registry.registry.chains import Edge, lineage_tree, plan_chain


def ref(label: str) -> ModelRef:
    return ModelRef(label=label, sha256=hashlib.sha256(label.encode()).hexdigest())


V1, V2, V2B, V3, V4, S1 = (ref(x) for x in ("v1", "v2", "v2b", "v3", "v4", "s1"))


def edge(source: ModelRef, target: ModelRef, name: str, map_: float | None = None,
         side: ModelRef | None = None) -> Edge:
    return Edge(source=source, target=target, side_info=side, transformation=name, map=map_)


def test_direct_edge():
    e12 = edge(V1, V2, "t/1", 0.4, S1)
    assert plan_chain(V1, V2, [e12]) == [e12]


def test_two_hops_in_order():
    e12, e23 = edge(V1, V2, "t/1"), edge(V2, V3, "t/2")
    assert plan_chain(V1, V3, [e23, e12]) == [e12, e23]


def test_no_path_names_reachable_versions_and_target():
    edges = [edge(V1, V2, "t/1"), edge(V3, V4, "t/2")]
    with pytest.raises(ChainError) as err:
        plan_chain(V1, V4, edges)
    message = str(err.value)
    assert f"no chain {V1} -> {V4}" in message
    assert f"[{V1}, {V2}]" in message  # the frontier from which the hop to v4 is missing
    with pytest.raises(ChainError, match="no chain"):
        plan_chain(V1, V2, [])


def test_cycle_is_walked_once():
    e12, e21, e23 = edge(V1, V2, "t/1"), edge(V2, V1, "t/2"), edge(V2, V3, "t/3")
    edges = [e12, e21, e23]
    assert plan_chain(V1, V3, edges) == [e12, e23]
    assert plan_chain(V2, V1, edges) == [e21]
    with pytest.raises(ChainError, match="no chain"):
        plan_chain(V1, V4, edges)  # terminates although v1 <-> v2 loops


def test_shortest_chain_wins_over_better_map():
    e12, e23, e13 = edge(V1, V2, "t/1", 0.9), edge(V2, V3, "t/2", 0.9), edge(V1, V3, "t/3", 0.1)
    assert plan_chain(V1, V3, [e12, e23, e13]) == [e13]


def test_equal_length_higher_minimum_map_wins_before_product():
    # path A: min 0.3, product 0.27; path B: min 0.5, product 0.25 -> B (weakest link rule).
    a = [edge(V1, V2, "t/1", 0.9), edge(V2, V3, "t/2", 0.3)]
    b = [edge(V1, V2B, "t/3", 0.5), edge(V2B, V3, "t/4", 0.5)]
    assert plan_chain(V1, V3, a + b) == b


def test_equal_minimum_then_higher_product_wins():
    # both minima 0.5; products 0.45 vs 0.30 -> A.
    a = [edge(V1, V2, "t/1", 0.5), edge(V2, V3, "t/2", 0.9)]
    b = [edge(V1, V2B, "t/3", 0.5), edge(V2B, V3, "t/4", 0.6)]
    assert plan_chain(V1, V3, b + a) == a


def test_parallel_edges_unknown_map_counts_as_zero_and_names_break_ties():
    unknown, measured = edge(V1, V2, "t/1", None), edge(V1, V2, "t/2", 0.1)
    assert plan_chain(V1, V2, [unknown, measured]) == [measured]
    first, second = edge(V1, V2, "t/8", 0.3), edge(V1, V2, "t/7", 0.3)
    assert plan_chain(V1, V2, [first, second]) == [second]


def test_already_at_target_is_an_error():
    with pytest.raises(ChainError, match=f"already at target {V2}"):
        plan_chain(V2, V2, [edge(V1, V2, "t/1")])


def test_set_beyond_target_is_named():
    with pytest.raises(ChainError, match=f"{V2} is already beyond target {V1}"):
        plan_chain(V2, V1, [edge(V1, V2, "t/1")])


def test_missing_side_info_is_named_and_avoided_when_possible():
    with_side = edge(V1, V3, "t/1", 0.9, side=S1)
    assert plan_chain(V1, V3, [with_side], available_side_info=[S1]) == [with_side]
    with pytest.raises(ChainError, match=f"needs side-info {S1}; the set has: none"):
        plan_chain(V1, V3, [with_side], available_side_info=[])
    detour = [edge(V1, V2, "t/2", 0.5), edge(V2, V3, "t/3", 0.5)]
    assert plan_chain(V1, V3, [with_side, *detour], available_side_info=[]) == detour
    assert plan_chain(V1, V3, [with_side, *detour]) == [with_side]  # unchecked: shortest


def test_lineage_tree_text():
    edges = [edge(V1, V2, "t/1", 0.4, S1), edge(V2, V3, "t/2"), edge(V1, V3, "t/3", 0.35, S1)]
    tree = lineage_tree([V1, V2, V3], edges, notes={V3: "fct-backbone/3 @champion"})
    assert tree.splitlines() == [
        f"{V1}",
        f"├── {V2}  [via t/1, side-info {S1}, mAP 0.400]",
        f"│   └── {V3} fct-backbone/3 @champion  [via t/2, mAP n/a]",
        f"└── {V3} fct-backbone/3 @champion  [via t/3, side-info {S1}, mAP 0.350]  (see above)",
    ]


def test_lineage_tree_with_cycle_and_isolated_version():
    edges = [edge(V1, V2, "t/1"), edge(V2, V1, "t/2")]
    assert lineage_tree([V1, V2, V4], edges).splitlines() == [
        f"{V4}",
        f"{V1}",
        f"└── {V2}  [via t/1, mAP n/a]",
        f"    └── {V1}  [via t/2, mAP n/a]  (see above)",
    ]
