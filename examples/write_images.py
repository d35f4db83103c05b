"""Write Fashion-MNIST as folders of PNG files, as a team's image store would hold them.

``OUT/train/<class>/<item_id>.png`` (the first ``--train`` training images: what the new model was trained on, so
h is fitted on it) and ``OUT/gallery/<class>/<item_id>.png`` (the first ``--gallery`` test images: the stored
gallery, also the labelled validation set of the fit). Classes are folder names, so labels come with the layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from fct_registry.method.data import FASHION_MNIST_CLASSES, fashion_mnist_dir, load_fashion_mnist


def folder_name(label: int) -> str:
    """A class name usable as a folder name (``T-shirt/top`` -> ``0-t-shirt_top``; the index keeps the order)."""
    return f"{label}-{FASHION_MNIST_CLASSES[label].lower().replace('/', '_').replace(' ', '_')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=10000, help="training images to write")
    parser.add_argument("--gallery", type=int, default=5000, help="test images to write as the gallery")
    args = parser.parse_args()
    splits = load_fashion_mnist(fashion_mnist_dir(None))
    for name, split, count in (("train", splits["train"], args.train), ("gallery", splits["test"], args.gallery)):
        for image, label, item_id in zip(split.images[:count], split.labels[:count], split.item_ids[:count],
                                         strict=True):
            path = args.out / name / folder_name(int(label)) / f"{int(item_id)}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0]).save(path)
        print(f"wrote {min(count, len(split))} images under {args.out / name}")


if __name__ == "__main__":
    main()
