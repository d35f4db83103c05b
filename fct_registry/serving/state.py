"""The served pair (query backbone + gallery index) and its atomic hot swap.

Queries and gallery must come from the same model version (FCT: Ramanujan et al., CVPR 2022, arXiv 2112.02805:
compatibility is established by upgrading the stored gallery, never by mixing versions at query time). So the
service serves a *pair*: the backbone an alias (``champion``) points to, and an exact index over the embedding
set whose manifest names that backbone's :class:`~fct_registry.embedding_set.ModelRef`. A request reads the
pair once and uses it throughout; a reload builds a complete new pair before swapping it in.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from fct_registry.embedding_set import EmbeddingSet
from fct_registry.errors import RuntimeInputError, SearchError, VersionMismatchError
from fct_registry.model_registry import ModelRegistry, RegisteredVersion
from fct_registry.runtime import OnnxModel
from fct_registry.search import GalleryIndex, index_for_set
from fct_registry.workflows import gallery_for

IMAGE_INPUT = "image"


@dataclass(frozen=True)
class ServedPair:
    """One consistent (query model, gallery) pair.

    Attributes:
        alias: The registry alias the backbone was resolved from, e.g. ``"champion"``.
        version: The backbone's registered version.
        backbone: ONNX Runtime session: ``image`` (B, 1, H, W) float32 in [0, 1] -> (B, d) float32.
        gallery: The embedding set whose manifest model equals ``version.ref``.
        index: Exact faiss index over the gallery's (n_gallery, d) vectors, metric from its manifest.
    """

    alias: str
    version: RegisteredVersion
    backbone: OnnxModel
    gallery: EmbeddingSet
    index: GalleryIndex

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the backbone's image input."""
        _, _, height, width = self.backbone.input_shapes[IMAGE_INPUT]
        return height, width


def matching_set(sets_root: str | os.PathLike, version: RegisteredVersion, alias: str) -> EmbeddingSet:
    """The embedding set under ``sets_root`` made by ``version`` (the first in path order), verified.

    Args:
        sets_root: A folder searched at any depth for sets.
        version: The backbone whose :class:`ModelRef` the set's manifest must name.
        alias: The alias ``version`` was resolved from (for the message).

    Raises:
        VersionMismatchError: No set was made by ``version``; names the alias, the version and every set
            found with its model.
        EmbeddingSetError: A set has an invalid manifest, or the chosen set fails its shard checksums.
    """
    try:
        found = gallery_for(version, sets_root)
    except SearchError as exc:
        raise VersionMismatchError(f"cannot serve @{alias} {version}: {exc}") from None
    return EmbeddingSet.open(found.path, verify=True)


def _check_image_input(backbone: OnnxModel, version: RegisteredVersion) -> None:
    shape = backbone.input_shapes.get(IMAGE_INPUT)
    valid = shape is not None and len(shape) == 4 and shape[1] == 1 and all(isinstance(n, int) for n in shape[2:])
    if backbone.input_names != (IMAGE_INPUT,) or not valid:
        raise RuntimeInputError(f"backbone {version} must take one input 'image' of shape (batch, 1, H, W); "
                                f"got {backbone.input_shapes}")


def load_pair(registry: ModelRegistry, sets_root: str | os.PathLike, alias: str = "champion",
              providers: list[str] | None = None) -> ServedPair:
    """Resolve ``alias`` to a backbone and build the pair it serves.

    Args:
        registry: The model registry holding the ``backbone`` role.
        sets_root: Folder holding the gallery embedding sets.
        alias: Backbone alias to serve.
        providers: ONNX Runtime providers; None: CUDA first when available, else CPU.

    Raises:
        RegistryError: The alias does not resolve, or the ONNX file cannot be fetched.
        VersionMismatchError: No gallery set was made by the aliased backbone.
        EmbeddingSetError: The gallery set is unreadable or fails verification.
        RuntimeInputError: The backbone does not load or does not take one (batch, 1, H, W) ``image``.
        SearchError: The gallery's vectors are unusable for its metric.
    """
    version = registry.resolve_alias("backbone", alias)
    gallery = matching_set(sets_root, version, alias)
    backbone = OnnxModel(registry.onnx_path(version), providers=providers)
    _check_image_input(backbone, version)
    return ServedPair(alias, version, backbone, gallery, index_for_set(gallery))


class ServingState:
    """The pair currently served, replaced atomically by :meth:`reload`.

    Readers take :attr:`pair` once per request and keep that reference, so a request in flight finishes on
    the pair it started with. :meth:`reload` builds the complete new pair first and then swaps a single
    attribute; reloads are serialised by a lock so a slow older reload cannot overwrite a newer one.

    Args:
        registry, sets_root, alias, providers: As in :func:`load_pair`.

    Raises:
        Any error of :func:`load_pair`: the service refuses to start without a matching pair.
    """

    def __init__(self, registry: ModelRegistry, sets_root: str | os.PathLike, alias: str = "champion",
                 providers: list[str] | None = None) -> None:
        self.registry = registry
        self.sets_root = Path(sets_root)
        self.alias = alias
        self.providers = providers
        self._lock = threading.Lock()
        self._pair = load_pair(registry, self.sets_root, alias, providers)

    @property
    def pair(self) -> ServedPair:
        """The pair to use for one whole request."""
        return self._pair

    def reload(self) -> ServedPair:
        """Re-resolve the alias, build the new pair, then swap it in; on any error the old pair stays.

        Raises:
            Any error of :func:`load_pair`; nothing is swapped then.
        """
        with self._lock:
            pair = load_pair(self.registry, self.sets_root, self.alias, self.providers)
            self._pair = pair
        return pair
