"""A folder of images as a retrieval system's items: stable item ids, labels from class folders, decoded batches.

Layout: either ``DIR/<class>/<image>`` (torchvision's ImageFolder; the class folders, sorted, give labels 0, 1, ...)
or a flat ``DIR/<image>`` (labels -1, unknown). PNG and JPEG files, found recursively; every item is named by its
path relative to ``DIR``. Item ids are the positions in that sorted list unless the caller gives its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fct_registry.core.errors import DataError
from fct_registry.onnx_boundary.contract import InputContract
from fct_registry.onnx_boundary.images import read_image

SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class ImageFolder:
    """The images of a folder, in sorted relative-path order.

    Attributes:
        root: The folder.
        files: (N,) relative paths (``str``), sorted.
        labels: (N,) int64 class index, or -1 for a flat folder.
        classes: Class folder names (index = label); empty for a flat folder.
    """

    root: Path
    files: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labelled(self) -> bool:
        """Whether the images are labelled by class folders."""
        return bool(self.classes)

    def iter_decoded(self, contract: InputContract, batch_size: int = 256) -> Iterator[tuple[slice, np.ndarray]]:
        """Decode the images in order as ``contract`` says, ``batch_size`` at a time (memory bounded by a batch).

        Yields:
            ``(rows, images)``: the slice of :attr:`files` and (n, C, H, W) uint8.

        Raises:
            DataError: an image cannot be read or decoded (its path named).
        """
        for start in range(0, len(self.files), batch_size):
            rows = slice(start, min(start + batch_size, len(self.files)))
            yield rows, np.concatenate([read_image(self.root / f, contract) for f in self.files[rows]])


def scan_image_folder(root: str | os.PathLike) -> ImageFolder:
    """List the PNG/JPEG images under ``root`` (see the module docstring for the two layouts).

    Raises:
        DataError: ``root`` is not a folder, holds no PNG/JPEG image, or mixes images at the top level with
            class folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"image folder {root} holds no PNG or JPEG image")
    top = [f for f in files if "/" not in f]
    if not top:
        classes = tuple(sorted({f.split("/", 1)[0] for f in files}))
        index = {name: i for i, name in enumerate(classes)}
        labels = np.array([index[f.split("/", 1)[0]] for f in files], np.int64)
        return ImageFolder(root, tuple(files), labels, classes)
    if len(top) != len(files):
        raise DataError(f"image folder {root} mixes images at its top level ({top[0]}) with class folders; "
                        "use one layout: DIR/<class>/<image> or DIR/<image>")
    return ImageFolder(root, tuple(files), np.full(len(files), -1, np.int64), ())
