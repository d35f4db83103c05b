"""Where a project's things are: params (``registry:`` and ``evaluation:``), the registry, stored embedding sets.

Shared by the use-case modules; model versions are named as in :meth:`ModelRegistry.get`: an MLflow version number
(``"3"``), a project label (``"v3"``) or an alias (``"@champion"``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fct_registry.core.config import EvaluationParams, RegistryParams, load_params
from fct_registry.core.errors import DataError, EmbeddingSetError
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import RegisteredVersion, file_sha256
from fct_registry.vectors.embedding_set import MANIFEST, EmbeddingSet, scan_embedding_sets

PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class Settings:
    """The ``registry:`` and ``evaluation:`` sections of ``params.yaml`` (defaults when there is no file)."""

    registry: RegistryParams
    evaluation: EvaluationParams


def load_settings(root: str | os.PathLike, params_file: str = PARAMS_FILE) -> Settings:
    """Read ``<root>/<params_file>`` when it exists, else use the defaults of :mod:`fct_registry.core.config`.

    Raises:
        ConfigError: the file exists but is invalid (names the key and the bad value).
    """
    path = Path(root) / params_file
    if not path.is_file():
        return Settings(RegistryParams(), EvaluationParams())
    params = load_params(path)
    return Settings(params.registry, params.evaluation)


def open_registry(root: str | os.PathLike = ".", params_file: str = PARAMS_FILE) -> ModelRegistry:
    """The project's registry: ``registry.tracking_uri`` from params.yaml, else ``MLFLOW_TRACKING_URI``, else the
    embedded SQLite store under ``<root>/registry`` (nothing is opened until first use).

    Raises:
        ConfigError: params.yaml exists but is invalid.
    """
    return ModelRegistry(root, tracking_uri=load_settings(root, params_file).registry.tracking_uri)


def resolve_backbone(registry: ModelRegistry, version: str | None, default_alias: str) -> RegisteredVersion:
    """The backbone named by ``version`` (number, label or ``@alias``), or by ``@default_alias`` when None.

    Raises:
        RegistryError: unknown version or label, or an alias that resolves to no version.
    """
    return registry.get("backbone", version if version is not None else f"@{default_alias}")


def find_set(name: str | os.PathLike, root: str | os.PathLike, sets_root: str | os.PathLike,
             verify: bool = False) -> EmbeddingSet:
    """Open an embedding set given as a path (relative to ``root``) or as a name under ``sets_root``.

    Raises:
        EmbeddingSetError: neither place holds a set (the message lists the sets under ``sets_root``), or the
            set is invalid (with ``verify``: a shard's sha256 or row count differs from the manifest).
    """
    candidates = [Path(root) / name, Path(sets_root) / name]
    for path in candidates:
        if (path / MANIFEST).is_file():
            return EmbeddingSet.open(path, verify=verify)
    known = _set_names(sets_root) or "none"
    raise EmbeddingSetError(f"no embedding set {str(name)!r} at {candidates[0]} or {candidates[1]}; "
                            f"sets under {sets_root}: {known}")


def _set_names(sets_root: str | os.PathLike) -> str:
    return ", ".join(str(s.path.relative_to(sets_root)) for s in sets_under(sets_root))


def sets_under(sets_root: str | os.PathLike) -> list[EmbeddingSet]:
    """The valid sets under ``sets_root`` sorted by path (manifests only, shards not verified; an invalid set is
    skipped, see ``fct-registry sets list``); none if it is missing."""
    return scan_embedding_sets(sets_root).sets


SOURCES_FILE = "sources.json"
"""Sidecar of a set whose items are images, saying where each item's image is and which version of the images the
vectors were computed from (so that ``fct-registry backfill`` can read them again and refuse changed ones). Two kinds:

- ``image_folder`` (``fct-registry sets embed``): ``{"kind", "folder", "classes", "item_ids", "files", "sha256",
  "data_version"}``; item ``item_ids[i]`` is the image ``folder/files[i]`` whose bytes had sha256 ``sha256[i]``;
  ``data_version`` is the sha256 of the lines ``<file> TAB <sha256>``. Files written before kinds existed have neither
  ``kind`` nor ``sha256``/``data_version``.
- ``prepared`` (a gallery built from a prepared split, ``pipelines/embed_gallery.py``): ``{"kind", "data_dir",
  "split", "data_version", "item_ids", "rows"}``; item ``item_ids[i]`` is row ``rows[i]`` of
  ``<data_dir>/<split>.npz`` (:func:`fct_registry.method.data.save_prepared`), whose bytes had sha256
  ``data_version``; a relative ``data_dir`` is relative to the project root.

``fct-registry upgrade`` copies the file into the upgraded set, and ``backfill`` into the backfilled one."""


@dataclass(frozen=True)
class ImageSources:
    """Where the items of a set embedded from an image folder came from (its ``sources.json``).

    Attributes:
        folder: the image folder (absolute).
        classes: class folder names (label = index), empty for a flat folder.
        files: item id -> the image's path relative to ``folder``.
        sha256: item id -> sha256 (hex) of the image file's bytes when it was embedded; empty for a set written
            before they were recorded.
        data_version: sha256 (hex) over the lines ``<file> TAB <sha256>``, in item order; None when not recorded.
    """

    folder: Path
    classes: tuple[str, ...]
    files: dict[int, str]
    sha256: dict[int, str] = field(default_factory=dict)
    data_version: str | None = None


@dataclass(frozen=True)
class PreparedSources:
    """Where the items of a gallery built from a prepared split came from (its ``sources.json``).

    Attributes:
        data_dir: the prepared data folder as recorded (relative: to the project root).
        split: the split's name; its images are ``<data_dir>/<split>.npz``.
        data_version: sha256 (hex) of that file's bytes when the gallery was built.
        rows: item id -> row of the split.
    """

    data_dir: Path
    split: str
    data_version: str
    rows: dict[int, int]

    @property
    def path(self) -> Path:
        """``<data_dir>/<split>.npz``."""
        return self.data_dir / f"{self.split}.npz"


def item_sources(embedding_set: EmbeddingSet) -> ImageSources | PreparedSources | None:
    """The images of a set's items, from its ``sources.json``; None for a set without one (e.g. imported vectors).

    Raises:
        EmbeddingSetError: ``sources.json`` is present but unreadable, or of an unknown kind.
    """
    path = embedding_set.path / SOURCES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        kind = data.get("kind", "image_folder")
        if kind == "prepared":
            return PreparedSources(Path(data["data_dir"]), str(data["split"]), str(data["data_version"]),
                                   {int(item): int(row) for item, row in zip(data["item_ids"], data["rows"],
                                                                             strict=True)})
        if kind != "image_folder":
            raise ValueError(f"unknown kind {kind!r}; expected image_folder or prepared")
        ids = [int(item) for item in data["item_ids"]]
        digests = dict(zip(ids, map(str, data["sha256"]), strict=True)) if "sha256" in data else {}
        return ImageSources(Path(data["folder"]), tuple(str(name) for name in data["classes"]),
                            dict(zip(ids, map(str, data["files"]), strict=True)), digests, data.get("data_version"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EmbeddingSetError(f"cannot read {path}: {exc}") from None


def image_sources(embedding_set: EmbeddingSet) -> ImageSources | None:
    """The image of each item of a set embedded from an image folder (``fct-registry sets embed``); None for
    other sets (no ``sources.json``, or a gallery built from a prepared split).

    Raises:
        EmbeddingSetError: ``sources.json`` is present but unreadable.
    """
    sources = item_sources(embedding_set)
    return sources if isinstance(sources, ImageSources) else None


def image_folder_sources(folder: str | os.PathLike, classes: Sequence[str], files: Sequence[str]) -> bytes:
    """``sources.json`` of a set embedded from an image folder whose item ``i`` is ``folder/files[i]``: every file
    is hashed (sha256 of its bytes) so that a later backfill can tell when an image changed.

    Raises:
        DataError: a file cannot be read (its path named).
    """
    root = Path(folder).resolve()
    digests = []
    for name in files:
        try:
            digests.append(file_sha256(root / name))
        except OSError as exc:
            raise DataError(f"cannot read image {root / name}: {exc.strerror}") from None
    record = {"kind": "image_folder", "folder": str(root), "classes": list(classes),
              "item_ids": list(range(len(files))), "files": list(files), "sha256": digests,
              "data_version": _listing_sha256(files, digests)}
    return json.dumps(record, indent=1).encode()


def _listing_sha256(files: Sequence[str], digests: Sequence[str]) -> str:
    return hashlib.sha256("".join(f"{name}\t{digest}\n" for name, digest in zip(files, digests, strict=True))
                          .encode()).hexdigest()


def prepared_sources(data_dir: str | os.PathLike, split: str, item_ids: np.ndarray) -> bytes:
    """``sources.json`` of a gallery whose items ``item_ids`` (n,) int64 come from the prepared split
    ``<data_dir>/<split>.npz``: the split file's sha256 (its data version) and each item's row in it.

    Raises:
        DataError: the split file is missing or lacks an ``item_ids`` array, or an item is not in it (named).
    """
    path = Path(data_dir) / f"{split}.npz"
    if not path.is_file():
        raise DataError(f"prepared split not found: {path} (run the prepare stage first)")
    with np.load(path) as arrays:
        if "item_ids" not in arrays:
            raise DataError(f"prepared split {path} lacks array 'item_ids'")
        stored = arrays["item_ids"].astype(np.int64)
    if not len(stored):
        raise DataError(f"prepared split {path} holds no item")
    order = np.argsort(stored, kind="stable")
    ids = np.asarray(item_ids, np.int64)
    rows = order[np.minimum(np.searchsorted(stored, ids, sorter=order), len(stored) - 1)]
    missing = ids[stored[rows] != ids]
    if len(missing):
        raise DataError(f"item_id {int(missing[0])} is not in the prepared split {path}")
    record = {"kind": "prepared", "data_dir": str(data_dir), "split": split, "data_version": file_sha256(path),
              "item_ids": ids.tolist(), "rows": rows.tolist()}
    return json.dumps(record, indent=1).encode()
