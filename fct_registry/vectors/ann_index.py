"""Approximate nearest-neighbour indexes for serving: faiss IVF-Flat, IVF-PQ and HNSW over one embedding set.

- ``ivf``: inverted lists over ``nlist`` k-means cells; a query scans the ``nprobe`` nearest cells exactly
  (Jegou, Douze & Schmid, "Product quantization for nearest neighbor search", TPAMI 2011, Sec. IV; faiss
  ``IndexIVFFlat``).
- ``ivfpq``: the same cells, each item's residual stored as ``pq_m`` sub-quantizer codes of ``pq_nbits`` bits
  (same paper, Sec. IV-A; faiss ``IndexIVFPQ``): ``pq_m`` bytes per item at 8 bits instead of 4·d; scores are the
  PQ-approximated distances.
- ``hnsw``: a hierarchical navigable small-world graph with ``hnsw_m`` links per node, searched with a candidate
  list of ``ef_search`` (Malkov & Yashunin, TPAMI 2018; faiss ``IndexHNSWFlat``).

Scores follow :mod:`fct_registry.vectors.search` (larger is better: -Euclidean distance, or cosine similarity on
L2-normalised vectors). A build streams the set twice (a sample to train on and the held-out queries, then every
batch added), so memory is the index plus one batch. Recall@10 is measured at build time against exact search on
``recall_queries`` items of the set sampled with ``seed`` (each query's own item excluded), and the held-out queries
with their exact neighbours are stored so that other search knobs can be measured again at load time.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from fct_registry.core.config import ServingParams
from fct_registry.core.errors import ConfigError, EmbeddingSetError, SearchError
from fct_registry.vectors.ann_store import (
    ANN_KINDS,
    HELDOUT_FILE,
    IDS_FILE,
    INDEX_FILE,
    RECORD_FILE,
    IndexRecord,
    index_key,
    manifest_sha256,
    read_record,
    requested_knobs,
    search_knobs,
)
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.search import GalleryIndex
from fct_registry.vectors.set_writer import remove_path, swap_in

RECALL_K = 10
MIN_POINTS_PER_CELL = 39
"""faiss' own floor of training vectors per k-means centroid; the automatic ``nlist`` keeps above it."""
TRAIN_PER_CELL = 64
"""Training vectors per cell when ``train_size`` is None."""
Progress = Callable[[int, int], None]


class AnnIndex(GalleryIndex):
    """A :class:`GalleryIndex` whose faiss index is approximate (IVF-Flat, IVF-PQ or HNSW): same search contract.

    A query whose probed cells (or graph walk) yield fewer than k items is searched again with twice the ``nprobe``
    (``ef_search``) until it has k or the whole index was searched, so answers always hold k items.

    Args:
        index: A trained faiss index holding the gallery at positions 0..n_gallery-1.
        kind: ``ivf``, ``ivfpq`` or ``hnsw``.
        metric: ``l2`` or ``cosine`` (the index holds L2-normalised vectors for cosine).
        ids: (n_gallery,) int64 item ids in gallery order.
        model: The model version of the vectors.
        knobs: Search knobs: ``{"nprobe": int}`` (IVF kinds) or ``{"ef_search": int}`` (hnsw).
    """

    def __init__(self, index: faiss.Index, kind: str, metric: str, ids: np.ndarray, model, knobs: dict[str, int]):
        self._index, self.kind, self.metric, self.ids, self.model = index, kind, metric, ids, model
        self.knobs = dict(knobs)

    def with_knobs(self, knobs: dict[str, int]) -> AnnIndex:
        """The same stored index searched with other knobs (shares the faiss index; nothing is copied)."""
        return AnnIndex(self._index, self.kind, self.metric, self.ids, self.model, knobs)

    def _limit(self) -> int:
        return self._index.nlist if self.kind != "hnsw" else max(len(self), 1)

    def _params(self, scale: int) -> faiss.SearchParameters:
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=min(self.knobs["ef_search"] * scale, self._limit()))
        return faiss.SearchParametersIVF(nprobe=min(self.knobs["nprobe"] * scale, self._limit()))

    def _raw_search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        raw, positions = self._index.search(vectors, k, params=self._params(1))
        scale = 1
        base = self.knobs["ef_search" if self.kind == "hnsw" else "nprobe"]
        while (positions < 0).any() and base * scale < self._limit():
            scale *= 2
            rows = np.flatnonzero((positions < 0).any(axis=1))
            raw[rows], positions[rows] = self._index.search(vectors[rows], k, params=self._params(scale))
        return raw, positions

    def score_all(self, queries: object, first_row: int = 0, row_ids: np.ndarray | None = None) -> np.ndarray:
        """Not available: an approximate index does not score every item (metrics use the exact index).

        Raises:
            SearchError: always.
        """
        raise SearchError(f"a {self.kind} index cannot score every gallery item; full rankings (mAP, compatibility "
                          "metrics) use the exact index (index_for_set)")


def resolve_knobs(params: ServingParams, count: int, dim: int) -> dict[str, int]:
    """The build knobs of ``params.index`` for a set of ``count`` (n_gallery) ``dim``-d vectors, checked.

    ``nlist`` None: the power of two nearest sqrt(count), at most count / 39 (and at least 1). ``train_size`` None:
    64 vectors per k-means centroid (the nlist cells, plus the 2**pq_nbits of the PQ for ivfpq); at most ``count``.

    Raises:
        ConfigError: a knob that cannot work for this set (naming it, its value and what is expected): ``nlist``
            above the set's size, ``nprobe`` above an explicit ``nlist``, ``train_size`` below ``nlist`` (or below
            2**pq_nbits for ivfpq), ``pq_m`` not dividing ``dim``; or ``params.index`` is ``exact``.
    """
    if params.index not in ANN_KINDS:
        raise ConfigError(f"serving.index {params.index!r} has no stored index; expected one of {ANN_KINDS}")
    if params.index == "hnsw":
        return {"hnsw_m": params.hnsw_m, "ef_construction": params.ef_construction}
    if params.index == "ivfpq" and dim % params.pq_m:
        raise ConfigError(f"serving.pq_m {params.pq_m} does not divide the set's dim {dim}; expected a divisor of "
                          f"{dim}")
    if params.nlist is not None and params.nlist > count:
        raise ConfigError(f"serving.nlist {params.nlist} exceeds the set's {count} items; expected at most {count} "
                          "(or null: chosen from the size)")
    if params.nlist is not None and params.nprobe > params.nlist:
        raise ConfigError(f"serving.nprobe {params.nprobe} exceeds serving.nlist {params.nlist}; expected at most "
                          "nlist cells probed")
    auto = 2 ** round(np.log2(max(np.sqrt(count), 1.0)))
    nlist = params.nlist or max(1, min(auto, count // MIN_POINTS_PER_CELL))
    cells = nlist + (2**params.pq_nbits if params.index == "ivfpq" else 0)  # k-means centroids + PQ centroids
    train = min(count, params.train_size or TRAIN_PER_CELL * cells)
    knobs = {"nlist": nlist, "train_size": train, "seed": params.seed}
    floor = max(nlist, 2**params.pq_nbits if params.index == "ivfpq" else 1)
    if train < floor:
        raise ConfigError(f"serving.train_size {params.train_size or train} is below {floor} (nlist {nlist}"
                          + (f", 2**pq_nbits {2**params.pq_nbits}" if params.index == "ivfpq" else "")
                          + f"); expected at least {floor} training vectors (the set has {count})")
    if params.index == "ivfpq":
        knobs |= {"pq_m": params.pq_m, "pq_nbits": params.pq_nbits}
    return knobs


def effective_search_knobs(params: ServingParams, build: dict[str, int]) -> dict[str, int]:
    """The search knobs of ``params`` for an index built with ``build`` (``nprobe`` at most the index's nlist)."""
    knobs = search_knobs(params)
    if "nprobe" in knobs:
        knobs["nprobe"] = min(knobs["nprobe"], build["nlist"])
    return knobs


def _empty_index(kind: str, dim: int, metric: str, knobs: dict[str, int]) -> faiss.Index:
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, knobs["hnsw_m"], faiss_metric)
        index.hnsw.efConstruction = knobs["ef_construction"]
        return index
    quantizer = faiss.IndexFlat(dim, faiss_metric)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, knobs["nlist"], faiss_metric)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, knobs["nlist"], knobs["pq_m"], knobs["pq_nbits"], faiss_metric)
    index.cp.seed = knobs["seed"]
    index.cp.min_points_per_centroid = 1  # the knobs were checked; no warnings printed by faiss
    if kind == "ivfpq":  # each sub-quantizer's k-means: at most 64 residuals per code, 10 iterations as the cells'
        pq = index.pq.cp  # (faiss' 25 took 2x as long for the same recall@10, 0.837, on 1e5 Fashion-MNIST replicas)
        pq.min_points_per_centroid, pq.max_points_per_centroid, pq.niter = 1, TRAIN_PER_CELL, index.cp.niter
    return index


def _prepared(vectors: np.ndarray, metric: str, ids: np.ndarray) -> np.ndarray:
    """Stored vectors as faiss takes them: float32, L2-normalised for cosine (a zero vector is refused)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine":
        zero = np.flatnonzero(~vectors.any(axis=1))
        if zero.size:
            raise SearchError(f"item_id {int(ids[zero[0]])} is a zero vector; cosine needs a non-zero norm")
        vectors = vectors.copy()
        faiss.normalize_L2(vectors)
    return vectors


def _gather(embedding_set: EmbeddingSet, positions: list[np.ndarray], batch_rows: int) -> list[np.ndarray]:
    """The set's vectors at each sorted array of positions (one streamed pass), prepared for its metric."""
    metric, out = embedding_set.manifest.metric, [[] for _ in positions]
    start = 0
    for batch in embedding_set.iter_batches(batch_rows):
        stop = start + len(batch)
        for wanted, found in zip(positions, out, strict=True):
            rows = wanted[(wanted >= start) & (wanted < stop)] - start
            if rows.size:
                found.append(_prepared(batch.embeddings[rows], metric, batch.ids[rows]))
        start = stop
    dim = embedding_set.manifest.dim
    return [np.concatenate(found) if found else np.empty((0, dim), np.float32) for found in out]


def _without_own(positions: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """(n_query, k) positions: each row's first k entries that are neither the query's own position nor -1."""
    keep = (positions != own[:, None]) & (positions >= 0)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(keep, order, axis=1), np.take_along_axis(positions, order, axis=1), -1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_i ∩ truth_i| / k (recall@k of an approximate search against exact search).

    Args:
        found: (n_query, k) int64 positions returned by the approximate search (-1: no answer, never counted).
        truth: (n_query, k) int64 exact top-k positions.

    Raises:
        SearchError: the shapes differ or there is no query.
    """
    if found.shape != truth.shape or found.ndim != 2 or not found.size:
        raise SearchError(f"recall needs two (n_query >= 1, k >= 1) arrays of one shape, got {found.shape} and "
                          f"{truth.shape}")
    hits = [np.intersect1d(f[f >= 0], t).size for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / truth.shape[1])


@dataclass(frozen=True)
class HeldOut:
    """Held-out queries of a set and their exact neighbours (stored as ``heldout.npz``).

    Attributes:
        positions: (n_query,) int64 gallery positions of the query items (sorted).
        vectors: (n_query, d) float32 query vectors (L2-normalised for cosine).
        truth: (n_query, k) int64 exact top-k gallery positions of each query, its own item excluded.
    """

    positions: np.ndarray
    vectors: np.ndarray
    truth: np.ndarray

    def recall(self, index: AnnIndex) -> float | None:
        """recall@k of ``index`` on these queries; None when there are none (a 1-item set)."""
        if not len(self.positions) or not self.truth.shape[1]:
            return None
        _, found = index._raw_search(self.vectors, self.truth.shape[1] + 1)
        return recall_at_k(_without_own(found, self.positions, self.truth.shape[1]), self.truth)


@dataclass(frozen=True)
class BuiltIndex:
    """An index and what describes it: ``record`` (``index.json``) and the held-out queries."""

    index: AnnIndex
    record: IndexRecord
    heldout: HeldOut


def build_ann_index(embedding_set: EmbeddingSet, params: ServingParams, progress: Progress | None = None,
                    batch_rows: int = 65536) -> BuiltIndex:
    """Build the approximate index ``params`` describes over a set and measure its recall@10 (nothing is written).

    Args:
        embedding_set: The gallery set (n_gallery items, d-dim, its manifest's metric).
        params: ``index`` (``ivf``, ``ivfpq`` or ``hnsw``) and its knobs.
        progress: Called with (items added, n_gallery) after each batch.
        batch_rows: Items read at a time (bounds memory besides the index).

    Returns:
        The index (search knobs of ``params``), its record and the held-out queries.

    Raises:
        ConfigError: a knob does not fit the set (see :func:`resolve_knobs`).
        EmbeddingSetError: the set cannot be read.
        SearchError: a zero vector in a cosine set.
    """
    started = time.perf_counter()
    manifest, digest = embedding_set.manifest, manifest_sha256(embedding_set)
    count, metric = manifest.count, manifest.metric
    knobs = resolve_knobs(params, count, manifest.dim)
    rng = np.random.default_rng(params.seed)
    query_positions = np.sort(rng.choice(count, size=min(params.recall_queries, count), replace=False))
    train_positions = np.sort(rng.choice(count, size=knobs.get("train_size", 0), replace=False))
    queries, train = _gather(embedding_set, [query_positions, train_positions], batch_rows)
    index = _empty_index(params.index, manifest.dim, metric, knobs)
    if params.index != "hnsw":
        index.train(train)
        knobs["train_rows"] = len(train)
    k = min(RECALL_K, count - 1)
    heap = faiss.ResultHeap(len(queries), k + 1, keep_max=metric == "cosine")
    ids, added = [], 0
    for batch in embedding_set.iter_batches(batch_rows):
        vectors = _prepared(batch.embeddings, metric, batch.ids)
        index.add(vectors)
        distances, positions = faiss.knn(queries, vectors, min(k + 1, len(vectors)),
                                         metric=faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)
        heap.add_result(distances, positions + added)
        ids.append(batch.ids)
        added += len(batch)
        if progress is not None:
            progress(added, count)
    heap.finalize()
    heldout = HeldOut(query_positions, queries, _without_own(heap.I, query_positions, k))
    search = effective_search_knobs(params, knobs)
    ann = AnnIndex(index, params.index, metric, np.concatenate(ids).astype(np.int64), manifest.model, search)
    recall = heldout.recall(ann)
    record = IndexRecord(kind=params.index, key=index_key(params, digest), requested=requested_knobs(params),
                         build=knobs, search=search, manifest_sha256=digest, count=count, dim=manifest.dim,
                         metric=metric, recall_at_10=recall, recall_k=k, recall_queries=len(queries),
                         build_seconds=round(time.perf_counter() - started, 3), index_bytes=0,
                         faiss_version=faiss.__version__)
    return BuiltIndex(ann, record, heldout)


def save_ann_index(built: BuiltIndex, folder: str | os.PathLike) -> IndexRecord:
    """Write an index into ``folder`` atomically (a ``.tmp-*`` folder beside it, renamed in; replaces ``folder``).

    Returns:
        The record as written (with ``index_bytes``).

    Raises:
        OSError: the folder cannot be written (nothing is left behind).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}.new-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        faiss.write_index(built.index._index, str(tmp / INDEX_FILE))
        np.save(tmp / IDS_FILE, built.index.ids)
        np.savez(tmp / HELDOUT_FILE, positions=built.heldout.positions, vectors=built.heldout.vectors,
                 truth=built.heldout.truth)
        record = built.record.model_copy(update={"index_bytes": (tmp / INDEX_FILE).stat().st_size})
        (tmp / RECORD_FILE).write_text(record.model_dump_json(indent=2))
        swap_in(tmp, folder)
    except BaseException:
        remove_path(tmp)
        raise
    return record


def load_ann_index(folder: str | os.PathLike, embedding_set: EmbeddingSet, params: ServingParams
                   ) -> tuple[AnnIndex, IndexRecord]:
    """Load a stored index of ``embedding_set`` and search it with the knobs of ``params``.

    When those knobs differ from the ones recall was measured with, recall@10 is measured again on the stored
    held-out queries (the returned record says so; ``index.json`` is left as built).

    Raises:
        EmbeddingSetError: the folder is incomplete or unreadable, or the index is stale: built for another
            manifest (the set changed since), another size, dim or metric, or another kind (naming both).
    """
    folder = Path(folder)
    record = read_record(folder)
    current = manifest_sha256(embedding_set)
    m = embedding_set.manifest
    if record.manifest_sha256 != current or (record.count, record.dim, record.metric) != (m.count, m.dim, m.metric):
        raise EmbeddingSetError(f"index {folder} is stale: built for manifest sha256 {record.manifest_sha256[:12]} "
                                f"({record.count} items), the set's manifest is now {current[:12]} ({m.count} "
                                "items); rebuild it (fct-registry sets index)")
    if record.kind != params.index:
        raise EmbeddingSetError(f"index {folder} is a {record.kind} index; expected {params.index}")
    try:
        index = faiss.read_index(str(folder / INDEX_FILE))
        ids = np.load(folder / IDS_FILE)
        with np.load(folder / HELDOUT_FILE) as stored:
            heldout = HeldOut(stored["positions"], stored["vectors"], stored["truth"])
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise EmbeddingSetError(f"cannot load index {folder}: {' '.join(str(exc).split())[:300]}") from None
    if index.ntotal != m.count or ids.shape != (m.count,):
        raise EmbeddingSetError(f"index {folder} holds {index.ntotal} vectors and {ids.shape[0]} ids; the set has "
                                f"{m.count} items")
    knobs = effective_search_knobs(params, record.build)
    ann = AnnIndex(index, record.kind, m.metric, ids.astype(np.int64), m.model, knobs)
    if knobs != record.search:
        record = record.model_copy(update={"search": knobs, "recall_at_10": heldout.recall(ann)})
    return ann, record
