"""Use case of the serving index (``fct-registry sets index``, and ``serve`` at start and on ``/reload``): the search
index of a gallery set for the ``serving:`` knobs, exact or approximate, loaded from beside the set or built there.

An approximate index is a derived artifact of the set (:mod:`fct_registry.vectors.ann_store`): found by the sha256 of
the set's manifest and the build knobs, so a changed set never reuses the index of its previous contents. Builds of
the same index by several processes are serialised by a lock file next to it; the second one loads the first one's.
Compatibility metrics (``evaluate``, the promote gate) never come here: they search exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock
from pydantic import ValidationError

from fct_registry.core.config import ServingParams, load_params
from fct_registry.core.errors import ConfigError, EmbeddingSetError
from fct_registry.usecases.project import PARAMS_FILE
from fct_registry.vectors.ann_store import IndexRecord, index_folder, manifest_sha256, stored_indexes
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.set_writer import remove_path

if TYPE_CHECKING:  # faiss is loaded only to search: the CLI's listings import this module
    from fct_registry.vectors.search import GalleryIndex

Progress = Callable[[int, int], None]
"""Called with (items added, items in all) while an index is built."""
Notify = Callable[[str], None]
"""Told one line when an index is built (before and after) or cannot be stored."""


@dataclass(frozen=True)
class ServingIndex:
    """The search index of a gallery set and where it came from.

    Attributes:
        index: Exact (:class:`GalleryIndex`) or approximate (:class:`~fct_registry.vectors.ann_index.AnnIndex`).
        params: The serving knobs it was opened with.
        record: What the approximate index is and its recall@10 with these knobs; None for ``exact``.
        path: The index's folder inside the set; None for ``exact``.
        built: It was built by this call (it was missing, or a rebuild was asked).
        stored: It is on disk (False: built but the set's folder could not be written; see ``note``).
        note: Why it was not stored, or None.
    """

    index: GalleryIndex
    params: ServingParams
    record: IndexRecord | None
    path: Path | None
    built: bool
    stored: bool = True
    note: str | None = None


def serving_params(root: str | os.PathLike, **overrides: Any) -> ServingParams:
    """The ``serving:`` section of ``<root>/params.yaml`` (defaults without the file), with the options given (a None
    option keeps the file's value).

    Raises:
        ConfigError: params.yaml is invalid, or an option's value is not allowed (naming the option and the value).
    """
    path = Path(root) / PARAMS_FILE
    base = load_params(path).serving if path.is_file() else ServingParams()
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return ServingParams.model_validate(base.model_dump() | given)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"serving.{where}: {first['msg']} (got {first.get('input')!r})") from None


def open_serving_index(embedding_set: EmbeddingSet, params: ServingParams, notify: Notify | None = None,
                       progress: Progress | None = None, rebuild: bool = False) -> ServingIndex:
    """The search index of ``params`` over ``embedding_set``: exact, or the stored approximate index (built and
    stored first when missing, or when ``rebuild``; the set's stale indexes are then removed). When the set's folder
    cannot be written, the index built is served from memory (``stored`` False, ``note`` says why).

    Args:
        embedding_set: The gallery set.
        params: ``index`` and its knobs (``serving:``).
        notify: Told when a build starts and ends, and when its result cannot be stored.
        progress: Called with (items added, items in all) during a build.
        rebuild: Build even when the index is stored.

    A stored index that cannot be loaded (damaged, or built for other contents) is never used: it is built again,
    and ``notify`` is told why.

    Raises:
        ConfigError: a knob does not fit the set (naming it and its value).
        EmbeddingSetError: the set cannot be read.
        SearchError: the set's vectors are unusable for its metric (NaN/inf, a zero vector under cosine).
    """
    if params.index == "exact":
        from fct_registry.vectors.search import index_for_set  # faiss, loaded only when searching

        return ServingIndex(index_for_set(embedding_set), params, None, None, built=False)
    from fct_registry.vectors import ann_index  # faiss, loaded only when searching

    folder = index_folder(embedding_set, params, manifest_sha256(embedding_set))
    if not rebuild and folder.is_dir():
        try:
            index, record = ann_index.load_ann_index(folder, embedding_set, params)
            return ServingIndex(index, params, record, folder, built=False)
        except EmbeddingSetError as exc:  # damaged (or copied from another set): never used, built again
            if notify is not None:
                notify(f"{exc}; building it again")
            rebuild = True
    ann_index.resolve_knobs(params, embedding_set.manifest.count, embedding_set.manifest.dim)  # bad knobs: say now
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder.parent / f".{folder.name}.lock")
        lock.acquire()
    except OSError as exc:  # a read-only set: serve an index built in memory
        return _unstored(_build(embedding_set, params, notify, progress), params, folder, exc, notify)
    try:
        if not rebuild and folder.is_dir():  # another process built it while this one waited
            index, record = ann_index.load_ann_index(folder, embedding_set, params)
            return ServingIndex(index, params, record, folder, built=False)
        built = _build(embedding_set, params, notify, progress)
        try:
            record = ann_index.save_ann_index(built, folder)
        except OSError as exc:
            return _unstored(built, params, folder, exc, notify)
        remove_stale(embedding_set)
        return ServingIndex(built.index, params, record, folder, built=True)
    finally:
        lock.release()


def _unstored(built: Any, params: ServingParams, folder: Path, exc: OSError, notify: Notify | None) -> ServingIndex:
    note = f"could not store the index in {folder}: {exc.strerror or exc}; serving one built in memory"
    if notify is not None:
        notify(note)
    return ServingIndex(built.index, params, built.record, None, built=True, stored=False, note=note)


def _build(embedding_set: EmbeddingSet, params: ServingParams, notify: Notify | None, progress: Progress | None):
    from fct_registry.vectors import ann_index

    m = embedding_set.manifest
    if notify is not None:
        notify(f"building the {params.index} index of {embedding_set.path} ({m.count} items, {m.dim}-d, {m.metric}); "
               "it is stored beside the set and reused until the set changes")
    built = ann_index.build_ann_index(embedding_set, params, progress)
    if notify is not None:
        notify(f"built the {params.index} index of {embedding_set.path} in {built.record.build_seconds:.1f} s: "
               f"{describe(built.record)}")
    return built


def describe(record: IndexRecord | None) -> str:
    """One line: kind, knobs and recall, e.g. ``ivf nlist=1024 nprobe=16: recall@10 0.996 (1000 held-out queries)``;
    ``exact`` for None."""
    if record is None:
        return "exact"
    knobs = " ".join(f"{name}={value}" for name, value in (record.build | record.search).items()
                     if name not in ("seed", "train_rows"))
    recall = "n/a" if record.recall_at_10 is None else f"{record.recall_at_10:.3f}"
    return f"{record.kind} {knobs}: recall@{record.recall_k} {recall} ({record.recall_queries} held-out queries)"


def remove_stale(embedding_set: EmbeddingSet) -> list[Path]:
    """Remove the set's stored indexes built for another manifest (the set changed since) or unreadable; returns
    the folders removed."""
    removed = [found.path for found in stored_indexes(embedding_set) if found.problem is not None]
    for path in removed:
        remove_path(path)
    return removed
