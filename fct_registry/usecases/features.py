"""Features of a folder of images under a registered image model, extracted through ONNX Runtime and cached on disk.

Fitting a forward transformation h (FCT, Ramanujan et al., CVPR 2022, arXiv 2112.02805, Sec. 3) trains on features
computed once per model ("cached features"), so a second fit with other hyperparameters must not embed the images
again. Each model embeds the images prepared by ITS OWN input contract (tag ``fct.input_contract``; see
:func:`fct_registry.registry.versions.input_contract`).

Cache layout (under the project root)::

    registry/cache/features/<model sha256>/<key>.npy      # (N, d) float32, rows in the folder's sorted file order

``<model sha256>`` is the registered version's ``fct.sha256`` (the ONNX bytes). ``<key>`` is the hex sha256 of the
model's input contract (JSON) followed by one line ``<relative path>\\t<size in bytes>\\t<mtime in ns>`` per image of
the folder, in sorted order (:func:`folder_fingerprint`): renaming, adding, removing, resizing or touching an image,
or changing the contract, gives a new key; the image bytes are not read to compute it. Files are written to a temp
file in the same folder and renamed into place, so a reader never sees a partial array; an unreadable or
wrongly-shaped cache file is extracted again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fct_registry.onnx_boundary.contract import InputContract
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import RegisteredVersion, input_contract

if TYPE_CHECKING:
    from fct_registry.onnx_boundary.image_folder import ImageFolder

CACHE_DIR = Path("registry") / "cache" / "features"
"""Feature cache folder, relative to the project root."""

FeatureProgress = Callable[[str, int, int, bool], None]
"""``(what, images done, images total, from cache)``: per extracted batch (False), or once on a cache hit (True)."""


@dataclass(frozen=True)
class Features:
    """One model's features of one image folder.

    Attributes:
        vectors: (N, d) float32, row i is the folder's i-th file (sorted relative paths).
        path: The cache file they were read from or written to.
        from_cache: Whether they were read from the cache (no image was decoded).
    """

    vectors: np.ndarray
    path: Path
    from_cache: bool


def folder_fingerprint(folder: ImageFolder) -> str:
    """Hex sha256 of the folder's sorted ``relative path, size, mtime_ns`` lines (cheap: no image is read).

    Raises:
        OSError: a file vanished since the folder was scanned.
    """
    digest = hashlib.sha256()
    for name in folder.files:
        stat = (folder.root / name).stat()
        digest.update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_path(root: str | os.PathLike, version: RegisteredVersion, contract: InputContract, fingerprint: str
               ) -> Path:
    """``<root>/registry/cache/features/<model sha256>/<sha256(contract JSON + fingerprint)>.npy``."""
    key = hashlib.sha256(f"{contract.to_json()}\n{fingerprint}".encode()).hexdigest()
    return Path(root) / CACHE_DIR / version.ref.sha256 / f"{key}.npy"


def image_features(registry: ModelRegistry, version: RegisteredVersion, folder: ImageFolder, what: str = "",
                   batch_size: int = 256, progress: FeatureProgress | None = None,
                   fingerprint: str | None = None) -> Features:
    """The features of every image of ``folder`` under a registered image model, from the cache or extracted.

    Extraction decodes the images as the model's input contract says, ``batch_size`` at a time, runs the
    version's ONNX file (fetched and sha256-checked by :meth:`ModelRegistry.onnx_path`) and stores the (N, d)
    float32 array atomically in the cache (see the module docstring for the key).

    Args:
        registry: The model registry; its root holds the cache.
        version: A registered backbone or side-info model with one image input.
        folder: The scanned image folder.
        what: Names the extraction in ``progress`` calls (e.g. ``"v1 train"``).
        batch_size: Images decoded and embedded per step (bounds memory).
        progress: Optional callback, see :data:`FeatureProgress`.
        fingerprint: :func:`folder_fingerprint` of ``folder`` when the caller has it already.

    Returns:
        The features and where they are cached.

    Raises:
        RegistryError: the ONNX artifact cannot be fetched or does not match its sha256.
        RuntimeInputError: the ONNX file does not load.
        DataError: the version's input contract is invalid, or an image cannot be decoded (path named).
    """
    from fct_registry.onnx_boundary.runtime import OnnxModel  # onnxruntime, loaded only to embed

    model = OnnxModel(registry.onnx_path(version))
    contract = input_contract(version, model.input_shapes[model.input_names[0]])
    path = cache_path(registry.root, version, contract, fingerprint or folder_fingerprint(folder))
    cached = _load(path, (len(folder), model.output_dim))
    if cached is not None:
        if progress is not None:
            progress(what, len(folder), len(folder), True)
        return Features(cached, path, True)
    chunks = []
    for rows, images in folder.iter_decoded(contract, batch_size):
        chunks.append(embed_images(model, images, contract, batch_size=batch_size))
        if progress is not None:
            progress(what, rows.stop, len(folder), False)
    vectors = np.concatenate(chunks).astype(np.float32, copy=False)
    _save(path, vectors)
    return Features(vectors, path, False)


def _load(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached array when it exists and is (N, d) float32 and finite; None otherwise (extract again)."""
    if not path.is_file():
        return None
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if vectors.shape != shape or vectors.dtype != np.float32 or not np.isfinite(vectors).all():
        return None
    return vectors


def _save(path: Path, vectors: np.ndarray) -> None:
    """Write ``vectors`` to ``path`` atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(handle, "wb") as f:
            np.save(f, vectors, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
