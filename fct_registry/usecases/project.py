"""Where a project's things are: params (``registry:`` and ``evaluation:``), the registry, stored embedding sets.

Shared by the use-case modules; model versions are named as in :meth:`ModelRegistry.get`: an MLflow version number
(``"3"``), a project label (``"v3"``) or an alias (``"@champion"``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fct_registry.core.config import EvaluationParams, RegistryParams, load_params
from fct_registry.core.errors import EmbeddingSetError
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import RegisteredVersion
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
"""Sidecar of a set embedded from an image folder: ``{"folder": ..., "classes": [...], "item_ids": [...],
"files": [...]}`` (item ``item_ids[i]`` is the image ``folder/files[i]``)."""


@dataclass(frozen=True)
class ImageSources:
    """Where the items of a set embedded from an image folder came from (its ``sources.json``).

    Attributes:
        folder: the image folder (absolute).
        classes: class folder names (label = index), empty for a flat folder.
        files: item id -> the image's path relative to ``folder``.
    """

    folder: Path
    classes: tuple[str, ...]
    files: dict[int, str]


def image_sources(embedding_set: EmbeddingSet) -> ImageSources | None:
    """The image of each item of a set embedded from an image folder (``fct-registry sets embed``); None for
    other sets.

    Raises:
        EmbeddingSetError: ``sources.json`` is present but unreadable.
    """
    path = embedding_set.path / SOURCES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return ImageSources(Path(data["folder"]), tuple(str(name) for name in data["classes"]),
                            {int(item): str(file) for item, file in zip(data["item_ids"], data["files"], strict=True)})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EmbeddingSetError(f"cannot read {path}: {exc}") from None
