"""Image data sets: Fashion-MNIST or a user's image folder, class subsets, and the versioned split files.

A prepared split is a pair of arrays: ``images`` (N, C, H, W) uint8 and ``labels`` (N,) int64, plus
``item_ids`` (N,) int64 that name each gallery item for its whole life (embedding sets key on them).
"""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fct_registry.core.config import DataParams
from fct_registry.core.errors import DataError

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_COARSE = (0, 1, 0, 1, 0, 2, 0, 2, 3, 2)
"""Coarse label per fine class: 0 tops (T-shirt/top, pullover, coat, shirt), 1 bottoms and dresses
(trouser, dress), 2 footwear (sandal, sneaker, ankle boot), 3 bags."""
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
_IDX_IMAGES, _IDX_LABELS = 2051, 2049


@dataclass(frozen=True)
class Split:
    """One split of an image data set.

    Attributes:
        images: (N, C, H, W) uint8, pixel values 0..255.
        labels: (N,) int64 fine class labels, 0..n_classes-1.
        item_ids: (N,) int64, unique per item across all splits.
    """

    images: np.ndarray
    labels: np.ndarray
    item_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, mask: np.ndarray) -> Split:
        """Rows where ``mask`` (N,) bool is true."""
        return Split(self.images[mask], self.labels[mask], self.item_ids[mask])


def _read_idx(path: Path, magic: int, count: int) -> np.ndarray:
    """Read one gzip idx file; check its magic number, item count and length."""
    if not path.is_file():
        raise DataError(f"Fashion-MNIST file not found: {path}")
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise DataError(f"Fashion-MNIST file is truncated or not gzip: {path} ({exc})") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"not an idx file with magic {magic}: {path}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if dims[0] != count or len(raw) != header + int(np.prod(dims)):
        raise DataError(f"Fashion-MNIST file has shape {dims} and {len(raw) - header} bytes, "
                        f"expected {count} items: {path}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def fashion_mnist_dir(configured: Path | None) -> Path:
    """Folder holding the four Fashion-MNIST ``.gz`` files.

    Order: the configured folder; Debian's ``dataset-fashion-mnist`` package (installed by ``make setup``);
    otherwise ``data/raw/FashionMNIST/raw`` filled by torchvision's downloader.

    Raises:
        DataError: a configured folder that does not exist.
    """
    if configured is not None:
        if not Path(configured).is_dir():
            raise DataError(f"data.fashion_mnist_dir does not exist: {configured}")
        return Path(configured)
    if all((DEBIAN_FASHION_MNIST_DIR / f).is_file() for names in _FILES.values() for f in names[:2]):
        return DEBIAN_FASHION_MNIST_DIR
    from torchvision.datasets import FashionMNIST

    root = Path("data/raw")
    FashionMNIST(str(root), train=True, download=True)
    return root / "FashionMNIST" / "raw"


def load_fashion_mnist(folder: Path) -> dict[str, Split]:
    """Load both Fashion-MNIST splits from idx ``.gz`` files.

    Returns:
        ``{"train": Split(60000), "test": Split(10000)}`` with images (N, 1, 28, 28) uint8; item ids are
        0..59999 for train and 60000..69999 for test.

    Raises:
        DataError: a missing or truncated file, a bad magic number, wrong shapes or labels outside 0..9.
    """
    splits, offset = {}, 0
    for name, (images_file, labels_file, count) in _FILES.items():
        images = _read_idx(folder / images_file, _IDX_IMAGES, count)
        labels = _read_idx(folder / labels_file, _IDX_LABELS, count).astype(np.int64)
        if images.shape[1:] != (28, 28):
            raise DataError(f"expected 28x28 images in {folder / images_file}, got {images.shape[1:]}")
        if labels.min() < 0 or labels.max() > 9:
            raise DataError(f"labels outside 0..9 in {folder / labels_file}: {labels.min()}..{labels.max()}")
        ids = np.arange(offset, offset + count, dtype=np.int64)
        splits[name] = Split(np.ascontiguousarray(images[:, None]), labels, ids)
        offset += count
    return splits


def load_image_folder(root: Path, image_size: int) -> tuple[dict[str, Split], list[str]]:
    """Load a user's images laid out as ``root/{train,test}/<class>/<image>`` (torchvision ImageFolder).

    Images are converted to grayscale and resized to ``image_size`` x ``image_size``.

    Returns:
        The two splits (images (N, 1, image_size, image_size) uint8) and the class names.

    Raises:
        DataError: ``root/train`` or ``root/test`` missing, or the two splits have different classes.
    """
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    to_array = transforms.Compose([transforms.Grayscale(), transforms.Resize((image_size, image_size))])
    splits, classes, offset = {}, None, 0
    for name in ("train", "test"):
        folder = Path(root) / name
        if not folder.is_dir():
            raise DataError(f"image folder split not found: {folder} (expected {root}/train and {root}/test)")
        try:
            data = ImageFolder(str(folder), transform=to_array)
        except FileNotFoundError as exc:
            raise DataError(f"no images in {folder}: {exc}".splitlines()[0]) from None
        if classes is not None and data.classes != classes:
            raise DataError(f"classes of {folder} {data.classes} differ from the train split's {classes}")
        classes = data.classes
        images = np.stack([np.asarray(img, dtype=np.uint8)[None] for img, _ in data])
        labels = np.asarray(data.targets, dtype=np.int64)
        splits[name] = Split(images, labels, np.arange(offset, offset + len(labels), dtype=np.int64))
        offset += len(labels)
    return splits, list(classes or [])


def load_source(params: DataParams) -> tuple[dict[str, Split], list[str]]:
    """Load the configured data source, keeping the first ``train_limit`` / ``test_limit`` items of each split.

    Raises:
        DataError: see :func:`load_fashion_mnist` and :func:`load_image_folder`.
    """
    if params.source == "image_folder":
        splits, classes = load_image_folder(params.image_folder, params.image_size)
    else:
        splits, classes = load_fashion_mnist(fashion_mnist_dir(params.fashion_mnist_dir)), list(FASHION_MNIST_CLASSES)
    limits = {"train": params.train_limit, "test": params.test_limit}
    for name, limit in limits.items():
        if limit is not None:
            splits[name] = splits[name].subset(np.arange(len(splits[name])) < limit)
    return splits, classes


def save_prepared(splits: dict[str, Split], classes: list[str], out_dir: Path, source: str) -> None:
    """Write ``<out_dir>/<split>.npz`` and ``meta.json`` (the versioned data set DVC tracks)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for name, split in splits.items():
        np.savez(out_dir / f"{name}.npz", images=split.images, labels=split.labels, item_ids=split.item_ids)
    meta = {"source": source, "classes": classes, "counts": {k: len(v) for k, v in splits.items()},
            "image_shape": list(splits["train"].images.shape[1:])}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_prepared(out_dir: Path, name: str) -> Split:
    """Read one split written by :func:`save_prepared`.

    Raises:
        DataError: the split file is missing or lacks an array.
    """
    path = Path(out_dir) / f"{name}.npz"
    if not path.is_file():
        raise DataError(f"prepared split not found: {path} (run the prepare stage first)")
    with np.load(path) as arrays:
        try:
            return Split(arrays["images"], arrays["labels"].astype(np.int64), arrays["item_ids"].astype(np.int64))
        except KeyError as exc:
            raise DataError(f"prepared split {path} lacks array {exc}") from None


def old_task(split: Split, protocol: str, old_classes: list[int]) -> tuple[Split, int]:
    """The old model's training data and number of classes under a protocol.

    ``class_subset`` keeps only ``old_classes`` (labels unchanged, so ``n_classes`` is ``max+1``);
    ``coarse_to_fine`` relabels to :data:`FASHION_MNIST_COARSE` (4 classes).

    Raises:
        DataError: an unknown protocol or an old class outside the label range.
    """
    n_fine = int(split.labels.max()) + 1
    if protocol == "class_subset":
        bad = [c for c in old_classes if not 0 <= c < n_fine]
        if bad:
            raise DataError(f"protocol.old_classes {bad} outside the label range 0..{n_fine - 1}")
        return split.subset(np.isin(split.labels, old_classes)), max(old_classes) + 1
    if protocol == "coarse_to_fine":
        if n_fine != len(FASHION_MNIST_COARSE):
            raise DataError(f"coarse_to_fine needs the 10 Fashion-MNIST classes, got {n_fine}")
        coarse = np.asarray(FASHION_MNIST_COARSE, dtype=np.int64)[split.labels]
        return Split(split.images, coarse, split.item_ids), len(set(FASHION_MNIST_COARSE))
    raise DataError(f"unknown protocol {protocol!r}, expected 'class_subset' or 'coarse_to_fine'")

