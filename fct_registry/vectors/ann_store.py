"""Where a set's approximate search indexes are stored, and whether one is still valid for the set (no faiss here).

An approximate index (:mod:`fct_registry.vectors.ann_index`) is a derived artifact of one embedding set, stored
inside the set's folder::

    <set>/ann/<kind>-<key>/index.faiss    the faiss index (vectors addressed by gallery position 0..n-1)
                          ids.npy        (n_gallery,) int64 item ids, in gallery order
                          heldout.npz    held-out queries and their exact top-k (to re-measure recall)
                          index.json     :class:`IndexRecord`: kind, knobs, the set's manifest sha256, recall@10

``<key>`` is a digest of the sha256 of the set's ``manifest.json`` bytes and the build knobs, so a changed set (new
shards, new manifest) never finds the index of its previous contents: such an index is *stale* and is rebuilt or
refused, never reused. Readers of the set ignore the folder (it is not in the manifest); an upgrade that overwrites
the set replaces the whole folder, index included. A build is written in a ``.tmp-*`` folder beside its target and
renamed in (``sets list`` shows an interrupted one, ``sets clean`` removes it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from fct_registry.core.config import ServingParams
from fct_registry.core.errors import EmbeddingSetError
from fct_registry.vectors.embedding_set import MANIFEST, EmbeddingSet

ANN_DIR = "ann"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
HELDOUT_FILE = "heldout.npz"
RECORD_FILE = "index.json"
AnnKind = Literal["ivf", "ivfpq", "hnsw"]
ANN_KINDS: tuple[str, ...] = ("ivf", "ivfpq", "hnsw")
BUILD_KNOBS: dict[str, tuple[str, ...]] = {
    "ivf": ("nlist", "train_size", "seed"),
    "ivfpq": ("nlist", "pq_m", "pq_nbits", "train_size", "seed"),
    "hnsw": ("hnsw_m", "ef_construction"),
}
"""The knobs that shape each kind's stored index (a change means another index)."""
SEARCH_KNOBS: dict[str, tuple[str, ...]] = {"ivf": ("nprobe",), "ivfpq": ("nprobe",), "hnsw": ("ef_search",)}
"""The knobs applied when searching (a change re-measures recall, the stored index stays)."""


class IndexRecord(BaseModel):
    """``index.json``: what an approximate index is, what it was built from, and how well it recalls.

    Attributes:
        kind: ``ivf``, ``ivfpq`` or ``hnsw``.
        key: The folder's digest (manifest sha256 + requested build knobs).
        requested: The build knobs as asked (``nlist``/``train_size`` None: chosen from the set's size).
        build: The build knobs as used (``nlist``, ``train_size`` resolved; ``train_rows`` trained on).
        search: The search knobs ``recall_at_10`` was measured with (``nprobe`` or ``ef_search``).
        manifest_sha256: sha256 (hex) of the set's ``manifest.json`` bytes at build time.
        count, dim, metric: The set's size, dim and metric (``l2`` or ``cosine``).
        recall_at_10: Mean over held-out queries of |approximate top-k ∩ exact top-k| / k, k = ``recall_k``
            (10, fewer for a set of at most 10 items), each query's own item excluded; None for a 1-item set.
        recall_k: The k of ``recall_at_10``.
        recall_queries: Held-out queries measured (items of the set sampled with ``seed``).
        build_seconds: Wall time of the build (training, adding, recall), s.
        index_bytes: Size of ``index.faiss``, bytes.
        faiss_version: The faiss that wrote it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    format_version: Literal[1] = 1
    kind: AnnKind
    key: str
    requested: dict[str, int | None]
    build: dict[str, int]
    search: dict[str, int]
    manifest_sha256: str
    count: int
    dim: int
    metric: Literal["l2", "cosine"]
    recall_at_10: float | None
    recall_k: int
    recall_queries: int
    build_seconds: float
    index_bytes: int
    faiss_version: str


def manifest_sha256(embedding_set: EmbeddingSet) -> str:
    """sha256 (hex) of the set's ``manifest.json`` bytes as they are on disk now.

    Raises:
        EmbeddingSetError: the manifest cannot be read.
    """
    try:
        return hashlib.sha256((embedding_set.path / MANIFEST).read_bytes()).hexdigest()
    except OSError as exc:
        raise EmbeddingSetError(f"cannot read {embedding_set.path / MANIFEST}: {exc.strerror}") from None


def requested_knobs(params: ServingParams) -> dict[str, int | None]:
    """The build knobs of ``params.index`` (see :data:`BUILD_KNOBS`), as given."""
    return {name: getattr(params, name) for name in BUILD_KNOBS[params.index]}


def search_knobs(params: ServingParams) -> dict[str, int]:
    """The search knobs of ``params.index`` (see :data:`SEARCH_KNOBS`)."""
    return {name: getattr(params, name) for name in SEARCH_KNOBS[params.index]}


def index_key(params: ServingParams, manifest_hash: str) -> str:
    """16 hex digits of sha256 over the manifest's sha256, the kind and its requested build knobs."""
    text = json.dumps({"manifest": manifest_hash, "kind": params.index, **requested_knobs(params)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def index_folder(embedding_set: EmbeddingSet, params: ServingParams, manifest_hash: str) -> Path:
    """``<set>/ann/<kind>-<key>``: where the index of ``params`` over the set with that manifest is (or goes).

    Raises:
        EmbeddingSetError: ``params.index`` is ``exact`` (an exact index is never stored).
    """
    if params.index not in ANN_KINDS:
        raise EmbeddingSetError(f"index kind {params.index!r} is not stored; expected one of {ANN_KINDS}")
    return embedding_set.path / ANN_DIR / f"{params.index}-{index_key(params, manifest_hash)}"


def read_record(folder: str | os.PathLike) -> IndexRecord:
    """The ``index.json`` of an index folder.

    Raises:
        EmbeddingSetError: missing, unreadable or invalid (naming the file and the first problem).
    """
    path = Path(folder) / RECORD_FILE
    try:
        return IndexRecord.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise EmbeddingSetError(f"cannot read {path}: {exc.strerror}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        raise EmbeddingSetError(f"invalid {path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


@dataclass(frozen=True)
class StoredIndex:
    """One folder under ``<set>/ann``.

    Attributes:
        path: The folder.
        record: Its ``index.json``, or None when it cannot be read (``problem`` says why).
        stale: The set's manifest changed since the index was built (it is never used).
        problem: Why the folder is unusable (unreadable record, stale), or None.
    """

    path: Path
    record: IndexRecord | None
    stale: bool
    problem: str | None


def stored_indexes(embedding_set: EmbeddingSet) -> list[StoredIndex]:
    """The approximate indexes stored in a set, sorted by folder name (``.tmp-*`` folders of unfinished builds are
    not listed here; :func:`~fct_registry.vectors.embedding_set.scan_embedding_sets` reports them). Reads only."""
    folder = embedding_set.path / ANN_DIR
    if not folder.is_dir():
        return []
    current = manifest_sha256(embedding_set)
    found = []
    for path in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            record = read_record(path)
        except EmbeddingSetError as exc:
            found.append(StoredIndex(path, None, False, str(exc)))
            continue
        stale = record.manifest_sha256 != current
        problem = (f"stale: built for manifest sha256 {record.manifest_sha256[:12]}, the set's is now {current[:12]}"
                   if stale else None)
        found.append(StoredIndex(path, record, stale, problem))
    return found
