"""Fashion-MNIST idx loading, integrity errors, protocols and the prepared split files."""

import gzip
import struct

import numpy as np
import pytest

from fct_registry.core.errors import DataError
from fct_registry.method.data import (
    FASHION_MNIST_COARSE,
    Split,
    load_fashion_mnist,
    load_image_folder,
    load_prepared,
    old_task,
    save_prepared,
)


def _idx(path, array, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    """A Fashion-MNIST folder with the real file names and idx format but 12 / 5 items."""
    import fct_registry.method.data as data

    files = {"train": (*data._FILES["train"][:2], 12), "test": (*data._FILES["test"][:2], 5)}
    monkeypatch.setattr(data, "_FILES", files)
    rng = np.random.default_rng(0)
    for name, count in (("train", 12), ("test", 5)):
        images_file, labels_file, _ = data._FILES[name]
        _idx(tmp_path / images_file, rng.integers(0, 256, (count, 28, 28)), 2051)
        _idx(tmp_path / labels_file, np.arange(count) % 10, 2049)
    return tmp_path


def test_loads_shapes_labels_and_unique_ids(fake_fashion):
    splits = load_fashion_mnist(fake_fashion)
    assert splits["train"].images.shape == (12, 1, 28, 28) and splits["train"].images.dtype == np.uint8
    assert splits["test"].labels.tolist() == [0, 1, 2, 3, 4]
    assert splits["train"].item_ids.tolist() == list(range(12))
    assert splits["test"].item_ids.tolist() == list(range(12, 17))


def test_missing_file_names_the_path(fake_fashion):
    (fake_fashion / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist(fake_fashion)


def test_truncated_file_names_the_path(fake_fashion):
    path = fake_fashion / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_fashion_mnist(fake_fashion)


def test_labels_out_of_range_are_refused(fake_fashion):
    _idx(fake_fashion / "train-labels-idx1-ubyte.gz", np.full(12, 11), 2049)
    with pytest.raises(DataError, match=r"labels outside 0\.\.9"):
        load_fashion_mnist(fake_fashion)


def _split(labels):
    labels = np.asarray(labels, dtype=np.int64)
    return Split(np.zeros((len(labels), 1, 2, 2), np.uint8), labels, np.arange(len(labels), dtype=np.int64))


def test_class_subset_keeps_only_old_classes():
    task, n_classes = old_task(_split([0, 5, 1, 9, 4, 2]), "class_subset", [0, 1, 2, 3, 4])
    assert task.labels.tolist() == [0, 1, 4, 2] and task.item_ids.tolist() == [0, 2, 4, 5] and n_classes == 5


def test_coarse_to_fine_relabels_to_four_groups():
    task, n_classes = old_task(_split(list(range(10))), "coarse_to_fine", [])
    assert task.labels.tolist() == list(FASHION_MNIST_COARSE) and n_classes == 4
    assert task.labels[[0, 2, 4, 6]].tolist() == [0] * 4 and task.labels[8] == 3


def test_old_class_outside_label_range_is_refused():
    with pytest.raises(DataError, match=r"\[12\]"):
        old_task(_split(list(range(10))), "class_subset", [0, 12])


def test_prepared_round_trip(tmp_path):
    split = _split([3, 1, 2])
    save_prepared({"train": split, "test": split}, ["a", "b", "c", "d"], tmp_path / "p", "test")
    back = load_prepared(tmp_path / "p", "test")
    assert back.labels.tolist() == [3, 1, 2] and back.images.shape == (3, 1, 2, 2)
    with pytest.raises(DataError, match="valid.npz"):
        load_prepared(tmp_path / "p", "valid")


def test_image_folder_layout(tmp_path):
    from PIL import Image

    for split, count in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (40, 30), (i * 50, 10, 200)).save(tmp_path / split / cls / f"{i}.png")
    splits, classes = load_image_folder(tmp_path, 28)
    assert classes == ["cat", "dog"]
    assert splits["train"].images.shape == (6, 1, 28, 28) and splits["test"].labels.tolist() == [0, 0, 1, 1]
    assert splits["test"].item_ids.tolist() == [6, 7, 8, 9]


def test_image_folder_without_test_split_is_an_error(tmp_path):
    from PIL import Image

    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("L", (28, 28)).save(tmp_path / "train" / "a" / "0.png")
    with pytest.raises(DataError, match="test"):
        load_image_folder(tmp_path, 28)


def test_image_folder_with_an_empty_class_is_an_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in"):
        load_image_folder(tmp_path, 28)
