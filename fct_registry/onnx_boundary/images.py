"""Decoding a query image (a file or an upload) the way the gallery's images were prepared.

See ``fct_registry.method.data`` for the gallery side.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fct_registry.core.errors import DataError
from fct_registry.onnx_boundary.contract import InputContract

FORMATS = ("PNG", "JPEG")
MAX_PIXELS = 4096 * 4096


def decode_image(data: bytes, contract: InputContract) -> np.ndarray:
    """Decode PNG/JPEG bytes to one image the way ``contract`` says the model expects it.

    Converted to 8-bit grayscale (Pillow mode ``L``) or RGB, then resized to (height, width) with bilinear
    interpolation: stretched, or (``center_crop``) scaled so the shorter side fits and the centre cropped. Scaling
    and normalisation are left to :func:`fct_registry.onnx_boundary.contract.prepare`. The bytes may be untrusted
    (an HTTP upload): the pixel count is bounded before decoding.

    Args:
        data: The file's bytes.
        contract: The input contract of the model the image is for.

    Returns:
        (1, C, height, width) uint8, C = 1 (grayscale) or 3 (RGB).

    Raises:
        DataError: Not a PNG or JPEG, truncated or corrupt, or more than :data:`MAX_PIXELS` pixels.
    """
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            if image.width * image.height > MAX_PIXELS:
                raise DataError(f"image is {image.width}x{image.height} pixels; at most {MAX_PIXELS} pixels allowed")
            converted = image.convert("L" if contract.color == "grayscale" else "RGB")
            resized = _resize(converted, contract)
    except UnidentifiedImageError:
        raise DataError(f"image is not a {' or '.join(FORMATS)} image") from None
    except (OSError, Image.DecompressionBombError) as exc:
        raise DataError(f"image cannot be decoded as an image: {exc}".splitlines()[0]) from None
    pixels = np.asarray(resized, dtype=np.uint8)
    return (pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))[None]


def _resize(image: Image.Image, contract: InputContract) -> Image.Image:
    size = (contract.width, contract.height)
    if contract.resize == "stretch":
        return image.resize(size, Image.Resampling.BILINEAR)
    return ImageOps.fit(image, size, Image.Resampling.BILINEAR)


def read_image(path: str | os.PathLike, contract: InputContract) -> np.ndarray:
    """Read and decode a PNG/JPEG file like :func:`decode_image`: (1, C, height, width) uint8.

    Raises:
        DataError: the file is missing, or is not a decodable PNG/JPEG (the path is named).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror}") from None
    try:
        return decode_image(data, contract)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
