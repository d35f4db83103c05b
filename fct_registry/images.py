"""Decoding a query image (a file or an upload) the way the gallery's images were prepared (``fct_registry.data``)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fct_registry.errors import DataError

FORMATS = ("PNG", "JPEG")
MAX_PIXELS = 4096 * 4096


def decode_image(data: bytes, height: int, width: int) -> np.ndarray:
    """Decode PNG/JPEG bytes to one grayscale image of the backbone's input size.

    As ``fct_registry.data.load_image_folder`` (gallery images): converted to 8-bit grayscale (Pillow mode
    ``L``), then resized to (height, width) with bilinear interpolation. Scaling to [0, 1] is left to
    :func:`fct_registry.gallery.embed_images`, as for the gallery. The bytes may be untrusted (an HTTP upload):
    the pixel count is bounded before decoding.

    Args:
        data: The file's bytes.
        height, width: H and W of the backbone's ``image`` input.

    Returns:
        (1, 1, height, width) uint8.

    Raises:
        DataError: Not a PNG or JPEG, truncated or corrupt, or more than :data:`MAX_PIXELS` pixels.
    """
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            if image.width * image.height > MAX_PIXELS:
                raise DataError(f"image is {image.width}x{image.height} pixels; at most {MAX_PIXELS} pixels allowed")
            gray = image.convert("L").resize((width, height), Image.Resampling.BILINEAR)
    except UnidentifiedImageError:
        raise DataError(f"image is not a {' or '.join(FORMATS)} image") from None
    except (OSError, Image.DecompressionBombError) as exc:
        raise DataError(f"image cannot be decoded as an image: {exc}".splitlines()[0]) from None
    return np.asarray(gray, dtype=np.uint8)[None, None]


def read_image(path: str | os.PathLike, height: int, width: int) -> np.ndarray:
    """Read and decode a PNG/JPEG file like :func:`decode_image`: (1, 1, height, width) uint8.

    Raises:
        DataError: the file is missing, or is not a decodable PNG/JPEG (the path is named).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror}") from None
    try:
        return decode_image(data, height, width)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
