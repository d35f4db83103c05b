"""Compatibility graph of model versions and the upgrade-chain planner.

Nodes are backbone versions (:class:`~fct_registry.core.refs.ModelRef`); each
registered forward transformation ``h: (old_embedding, side_info) -> embedding``
(FCT: Ramanujan et al., CVPR 2022, arXiv 2112.02805, Sec. 3) is a directed edge
from its source backbone to its target backbone. Upgrading a stored gallery from
version ``a`` to version ``c`` without a backfill applies the transformations of a
chain ``a -> b -> c`` one after the other.

Pure Python: the registry (``model_registry.py``) turns MLflow model versions into
:class:`Edge` objects; this module only plans over them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from fct_registry.core.errors import ChainError
from fct_registry.core.refs import ModelRef


@dataclass(frozen=True)
class Edge:
    """One registered forward transformation, an edge of the compatibility graph.

    Attributes:
        source: Backbone whose embeddings (B, d_old) the transformation reads.
        target: Backbone whose embedding space (B, d_new) it writes into.
        side_info: Side-information model whose vectors (B, d_side) it also reads, or
            None when the transformation takes only ``old_embedding``.
        transformation: Registered model version, e.g. ``"fct-transformation/3"``.
        map: Registered cross-model mAP (fraction in [0, 1]) of target-model queries
            against the transformed gallery, or None when not measured.
    """

    source: ModelRef
    target: ModelRef
    side_info: ModelRef | None
    transformation: str
    map: float | None = None

    def __str__(self) -> str:
        side = f" + side-info {self.side_info}" if self.side_info is not None else ""
        return f"{self.source} -> {self.target} via {self.transformation}{side}"


def plan_chain(
    source: ModelRef,
    target: ModelRef,
    edges: Iterable[Edge],
    available_side_info: Collection[ModelRef] | None = None,
) -> list[Edge]:
    """Plan the chain of transformations that brings ``source`` embeddings to ``target``.

    Rule: the chain with the fewest hops wins. Among chains of equal length the one
    with the higher *minimum* link mAP wins (a chain is only as good as its weakest
    transformation), then the higher *product* of link mAPs, then the
    lexicographically smallest sequence of transformation names (deterministic). A
    link without a registered mAP counts as mAP 0 for this ranking. Cycles in the
    graph are harmless: the search is a breadth-first search over visited nodes.

    Args:
        source: Model version the stored embeddings were computed with.
        target: Model version to upgrade to.
        edges: Registered transformations (see
            :meth:`fct_registry.registry.model_registry.ModelRegistry.transformation_edges`).
        available_side_info: Side-info models stored with the set. None skips the
            check; otherwise only transformations without side-info or with a listed
            side-info model are usable (pass ``[]`` for a set without side-info).

    Returns:
        The edges to apply in order; ``chain[0].source == source`` and
        ``chain[-1].target == target``; never empty.

    Raises:
        ChainError: ``source == target`` (already at target); ``source`` is beyond
            ``target`` (a chain exists only the other way); no chain exists (message
            names the versions reachable from ``source`` and the missing hop to
            ``target``); or every chain needs side-info the set lacks.
    """
    edges = list(edges)
    if source == target:
        raise ChainError(f"set is already at target {target}: nothing to upgrade")
    usable = _usable_edges(edges, available_side_info)
    paths = list(_shortest_paths(source, target, usable))
    if not paths:
        raise _no_chain_error(source, target, edges, usable, available_side_info)
    return list(min(paths, key=_path_rank))


def _usable_edges(edges: list[Edge], available_side_info: Collection[ModelRef] | None) -> list[Edge]:
    """Edges whose side-info requirement the set meets (all edges when unchecked)."""
    if available_side_info is None:
        return edges
    return [e for e in edges if e.side_info is None or e.side_info in available_side_info]


def _successors(edges: Iterable[Edge]) -> dict[ModelRef, list[Edge]]:
    """Adjacency list: node -> outgoing edges, in input order."""
    out: dict[ModelRef, list[Edge]] = {}
    for edge in edges:
        out.setdefault(edge.source, []).append(edge)
    return out


def _hop_distances(start: ModelRef, edges: Iterable[Edge]) -> dict[ModelRef, int]:
    """Breadth-first hop count from ``start`` to every reachable node (cycle-safe)."""
    succ = _successors(edges)
    dist = {start: 0}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for edge in succ.get(node, []):
            if edge.target not in dist:
                dist[edge.target] = dist[node] + 1
                queue.append(edge.target)
    return dist


def _shortest_paths(source: ModelRef, target: ModelRef, edges: list[Edge]) -> Iterator[tuple[Edge, ...]]:
    """Every shortest chain from ``source`` to ``target`` (none when unreachable).

    Only edges that advance the BFS layer by exactly one hop are followed, so the
    walk is acyclic and finite even when the graph has cycles.
    """
    dist = _hop_distances(source, edges)
    if target not in dist:
        return
    succ = _successors(e for e in edges if e.source in dist and dist.get(e.target) == dist[e.source] + 1)

    def walk(node: ModelRef, prefix: tuple[Edge, ...]) -> Iterator[tuple[Edge, ...]]:
        if node == target:
            yield prefix
            return
        for edge in succ.get(node, []):
            if dist[edge.target] <= dist[target]:
                yield from walk(edge.target, prefix + (edge,))

    yield from walk(source, ())


def _path_rank(path: Sequence[Edge]) -> tuple[float, float, tuple[str, ...]]:
    """Sort key (smaller is better): -(min link mAP), -(product of link mAPs), names."""
    maps = [e.map if e.map is not None else 0.0 for e in path]
    return (-min(maps), -math.prod(maps), tuple(e.transformation for e in path))


def _no_chain_error(
    source: ModelRef,
    target: ModelRef,
    edges: list[Edge],
    usable: list[Edge],
    available_side_info: Collection[ModelRef] | None,
) -> ChainError:
    """Explain why no chain exists: missing side-info, beyond target, or missing hop."""
    if len(usable) < len(edges) and target in _hop_distances(source, edges):
        have = ", ".join(str(s) for s in available_side_info or ()) or "none"
        needed = sorted({str(e.side_info) for e in edges if e not in usable})
        return ChainError(
            f"every chain {source} -> {target} needs side-info {', '.join(needed)}; the set has: {have}"
        )
    if source in _hop_distances(target, edges):
        return ChainError(f"set at {source} is already beyond target {target}: chains only run forward")
    reachable = sorted(str(node) for node in _hop_distances(source, usable))
    return ChainError(
        f"no chain {source} -> {target}: missing a transformation from any of "
        f"[{', '.join(reachable)}] to {target}"
    )


def lineage_tree(
    versions: Iterable[ModelRef],
    edges: Iterable[Edge],
    notes: Mapping[ModelRef, str] | None = None,
) -> str:
    """Render which backbone version came from which as a text tree.

    Roots are the versions no transformation leads to (or, in a pure cycle, the
    first listed). Children are the targets of a version's transformations, each
    line naming the transformation, its side-info and its registered mAP. A
    version already shown is printed again but not expanded (``(see above)``).

    Args:
        versions: Backbone versions (nodes), in display order.
        edges: Registered transformations between them.
        notes: Optional text appended to a version's line (e.g. its MLflow version
            and aliases: ``"fct-backbone/3 @champion"``).

    Returns:
        The tree, one version per line, using ``├──``/``└──`` connectors.
    """
    edges = list(edges)
    nodes = list(dict.fromkeys([*versions, *(e.source for e in edges), *(e.target for e in edges)]))
    succ = _successors(edges)
    targets = {e.target for e in edges}
    roots = [n for n in nodes if n not in targets] or nodes[:1]
    notes = notes or {}
    lines: list[str] = []
    shown: set[ModelRef] = set()

    def label(node: ModelRef) -> str:
        return f"{node} {notes[node]}" if node in notes else str(node)

    def expand(node: ModelRef, indent: str) -> None:
        shown.add(node)
        children = succ.get(node, [])
        for i, edge in enumerate(children):
            last = i == len(children) - 1
            seen = edge.target in shown
            lines.append(f"{indent}{'└── ' if last else '├── '}{label(edge.target)}  {_edge_note(edge)}"
                         + ("  (see above)" if seen else ""))
            if not seen:
                expand(edge.target, indent + ("    " if last else "│   "))

    for root in roots:
        if root in shown:
            continue
        lines.append(label(root))
        expand(root, "")
    for node in nodes:  # versions only reachable through a cycle not entered from a root
        if node not in shown:
            lines.append(label(node))
            expand(node, "")
    return "\n".join(lines)


def _edge_note(edge: Edge) -> str:
    """``[via fct-transformation/3, side-info s1@..., mAP 0.412]`` for a tree line."""
    parts = [f"via {edge.transformation}"]
    if edge.side_info is not None:
        parts.append(f"side-info {edge.side_info}")
    parts.append(f"mAP {edge.map:.3f}" if edge.map is not None else "mAP n/a")
    return "[" + ", ".join(parts) + "]"
