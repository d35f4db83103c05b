"""The served pair (query backbone + gallery index) and its atomic hot swap.

Queries and gallery must come from the same model version (FCT: Ramanujan et al., CVPR 2022, arXiv 2112.02805:
compatibility is established by upgrading the stored gallery, never by mixing versions at query time). So the
service serves a *pair*: the backbone an alias (``champion``) points to, and a search index over the embedding
set whose manifest names that backbone's :class:`~fct_registry.core.refs.ModelRef`: exact, or the approximate index
the ``serving:`` knobs describe, stored beside the set (built there first when missing:
:mod:`fct_registry.usecases.gallery_index`). A request reads the pair once and uses it throughout; a reload builds a
complete new pair (index included) before swapping it in.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from fct_registry.core.config import ServingParams
from fct_registry.core.errors import DataError, RuntimeInputError, SearchError, VersionMismatchError
from fct_registry.onnx_boundary.contract import InputContract
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import RegisteredVersion, input_contract
from fct_registry.usecases.evaluate import gallery_for
from fct_registry.usecases.gallery_index import Notify, ServingIndex, open_serving_index
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.search import GalleryIndex

EXACT = ServingParams(index="exact")
"""The serving knobs of an exact index (every gallery item scored): the default of the library functions."""


@dataclass(frozen=True)
class ServedPair:
    """One consistent (query model, gallery) pair.

    Attributes:
        alias: The registry alias the backbone was resolved from, e.g. ``"champion"``.
        version: The backbone's registered version.
        backbone: ONNX Runtime session: one image input (B, ...) float32 -> (B, d) float32.
        contract: How a query image becomes the backbone's input (its registered input contract).
        gallery: The embedding set whose manifest model equals ``version.ref``.
        index: faiss index over the gallery's (n_gallery, d) vectors, metric from its manifest: exact or approximate.
        served_index: Where ``index`` came from: its kind, knobs and recall@10 (exact: no record).
    """

    alias: str
    version: RegisteredVersion
    backbone: OnnxModel
    contract: InputContract
    gallery: EmbeddingSet
    index: GalleryIndex
    served_index: ServingIndex


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


def _image_contract(backbone: OnnxModel, version: RegisteredVersion) -> InputContract:
    if len(backbone.input_names) != 1:
        raise RuntimeInputError(f"backbone {version} must take one image input; got {backbone.input_shapes}")
    try:
        return input_contract(version, backbone.input_shapes[backbone.input_names[0]])
    except DataError as exc:
        raise RuntimeInputError(str(exc)) from None


def load_pair(registry: ModelRegistry, sets_root: str | os.PathLike, alias: str = "champion",
              providers: list[str] | None = None, serving: ServingParams = EXACT,
              notify: Notify | None = None) -> ServedPair:
    """Resolve ``alias`` to a backbone and build the pair it serves.

    Args:
        registry: The model registry holding the ``backbone`` role.
        sets_root: Folder holding the gallery embedding sets.
        alias: Backbone alias to serve.
        providers: ONNX Runtime providers; None: CUDA first when available, else CPU.
        serving: The search index (``serving:`` knobs); an approximate one is loaded from beside the gallery set,
            or built and stored there first.
        notify: Told when an index is built (a line before and after).

    Raises:
        RegistryError: The alias does not resolve, or the ONNX file cannot be fetched.
        VersionMismatchError: No gallery set was made by the aliased backbone.
        EmbeddingSetError: The gallery set is unreadable or fails verification.
        RuntimeInputError: The backbone does not load, takes more than one input, or has no usable input contract.
        SearchError: The gallery's vectors are unusable for its metric.
        ConfigError: A serving knob does not fit the gallery (naming it and its value).
    """
    version = registry.resolve_alias("backbone", alias)
    gallery = matching_set(sets_root, version, alias)
    # One non-spinning intra-op thread: the service embeds a few images per call from its one search worker, where
    # a second thread only waits to be scheduled (p99) and spinning burns the CPU the HTTP workers need.
    backbone = OnnxModel(registry.onnx_path(version), providers=providers, intra_op_threads=1, spinning=False)
    contract = _image_contract(backbone, version)
    served = open_serving_index(gallery, serving, notify)
    return ServedPair(alias, version, backbone, contract, gallery, served.index, served)


class ServingState:
    """The pair currently served, replaced atomically by :meth:`reload`.

    Readers take :attr:`pair` once per request and keep that reference, so a request in flight finishes on
    the pair it started with. :meth:`reload` builds the complete new pair first and then swaps a single
    attribute; reloads are serialised by a lock so a slow older reload cannot overwrite a newer one.

    Args:
        registry, sets_root, alias, providers, serving, notify: As in :func:`load_pair`.

    Raises:
        Any error of :func:`load_pair`: the service refuses to start without a matching pair.
    """

    def __init__(self, registry: ModelRegistry, sets_root: str | os.PathLike, alias: str = "champion",
                 providers: list[str] | None = None, serving: ServingParams = EXACT,
                 notify: Notify | None = None) -> None:
        self.registry = registry
        self.sets_root = Path(sets_root)
        self.alias = alias
        self.providers = providers
        self.serving = serving
        self.notify = notify
        self._lock = threading.Lock()
        self._pair = load_pair(registry, self.sets_root, alias, providers, serving, notify)

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
            pair = load_pair(self.registry, self.sets_root, self.alias, self.providers, self.serving, self.notify)
            self._pair = pair
        return pair
