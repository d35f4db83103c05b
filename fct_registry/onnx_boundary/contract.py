"""The input contract of an image embedding model: how an image becomes the tensor its ONNX file expects.

A model trained elsewhere was trained on images prepared its own way; every path that turns an image into a vector
(embedding a gallery, extracting features for a fit, search, serving) must prepare them the same way, or the vectors
are silently wrong. The contract records that preparation, is stored on the registered version (tag
``fct.input_contract``, JSON) and is applied by :func:`prepare` to decoded images.

Canonical decoded form: (N, C, H, W) uint8 with C = 1 (grayscale) or 3 (RGB), as :mod:`fct_registry.method.data`
stores images. :func:`prepare` turns it into float32 ``(x / pixel_range - mean) / std`` per channel, in the model's
channel layout (``nchw`` or ``nhwc``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fct_registry.core.errors import DataError

CONTRACT_TAG = "fct.input_contract"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputContract(BaseModel):
    """How images are prepared for one image model (backbone or side-info model).

    Attributes:
        height, width: Input size in pixels (H, W).
        color: ``grayscale`` (C = 1) or ``rgb`` (C = 3).
        layout: ``nchw`` (B, C, H, W) or ``nhwc`` (B, H, W, C).
        resize: ``stretch`` (resize to H x W, aspect ratio not kept) or ``center_crop`` (resize the shorter side to
            fit, keeping the aspect ratio, then crop the centre).
        pixel_range: Pixels (uint8) are divided by this first: 255.0 maps them to [0, 1], 1.0 keeps [0, 255].
        mean, std: Per-channel normalisation after scaling, ``(x - mean) / std``; one value per channel.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    color: Literal["grayscale", "rgb"]
    layout: Literal["nchw", "nhwc"] = "nchw"
    resize: Literal["stretch", "center_crop"] = "stretch"
    pixel_range: float = Field(default=255.0, gt=0)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @model_validator(mode="after")
    def _one_value_per_channel(self) -> InputContract:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                raise ValueError(f"{name} has {len(values)} values; expected 1 or {self.channels} for {self.color}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be > 0, got {self.std}")
        return self

    @property
    def channels(self) -> int:
        """C: 1 for grayscale, 3 for RGB."""
        return 1 if self.color == "grayscale" else 3

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The model input's shape after the batch axis: (C, H, W) for ``nchw``, (H, W, C) for ``nhwc``."""
        if self.layout == "nchw":
            return (self.channels, self.height, self.width)
        return (self.height, self.width, self.channels)

    def to_json(self) -> str:
        """The contract as compact JSON (the value of the ``fct.input_contract`` tag)."""
        return self.model_dump_json()


def parse_contract(text: str, where: str) -> InputContract:
    """Read a contract from JSON (a tag value or a file's text).

    Raises:
        DataError: not valid JSON or not a valid contract (names ``where``, the field and the problem).
    """
    return _validated(InputContract.model_validate_json, text, f" in {where}")


def contract_from_fields(fields: Mapping[str, object]) -> InputContract:
    """Build a contract from field values (e.g. command-line options over a preset).

    Raises:
        DataError: a field is missing or invalid (named, with the problem).
    """
    return _validated(InputContract.model_validate, dict(fields), "")


def _validated(validate, value: object, where: str) -> InputContract:
    try:
        return validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "contract"
        raise DataError(f"invalid input contract{where}: {field}: {first['msg']}") from None


def contract_from_tags(tags: Mapping[str, str], onnx_input_shape: tuple[object, ...], where: str) -> InputContract:
    """The contract of a registered version: its ``fct.input_contract`` tag, else the project's own default.

    Versions registered before contracts existed (the pipeline's Fashion-MNIST models) take grayscale NCHW input at
    the ONNX file's (H, W), pixels scaled to [0, 1], no mean/std normalisation: exactly how they were trained.

    Args:
        tags: The version's tags.
        onnx_input_shape: The ONNX ``image`` input's shape, e.g. ``("batch", 1, 28, 28)``.
        where: Names the version in error messages.

    Raises:
        DataError: the tag is invalid, or there is no tag and the input shape is not (B, 1, H, W).
    """
    if CONTRACT_TAG in tags:
        return parse_contract(tags[CONTRACT_TAG], where)
    _, *rest = onnx_input_shape
    if len(rest) != 3 or rest[0] != 1 or not all(isinstance(d, int) for d in rest):
        raise DataError(f"{where} has no {CONTRACT_TAG} tag and its input {onnx_input_shape} is not (B, 1, H, W); "
                        "register it with an input contract")
    return InputContract(height=rest[1], width=rest[2], color="grayscale")


def prepare(images: np.ndarray, contract: InputContract) -> np.ndarray:
    """Decoded images (N, C, H, W) uint8 -> the model's float32 input, following ``contract``.

    Args:
        images: (N, C, H, W) uint8 with C and (H, W) as the contract says (see
            :func:`fct_registry.onnx_boundary.images.decode_image`).
        contract: The model's input contract.

    Returns:
        float32 (N, C, H, W) or (N, H, W, C) per ``contract.layout``, ``(x / pixel_range - mean) / std``.

    Raises:
        DataError: ``images`` is not (N, C, H, W) uint8 of the contract's C, H, W.
    """
    expected = (contract.channels, contract.height, contract.width)
    if images.ndim != 4 or images.dtype != np.uint8 or tuple(images.shape[1:]) != expected:
        raise DataError(f"images are {images.dtype} {images.shape}; the input contract expects uint8 (N, "
                        f"{', '.join(map(str, expected))})")
    x = images.astype(np.float32) / contract.pixel_range
    if any(m != 0.0 for m in contract.mean) or any(s != 1.0 for s in contract.std):
        mean = np.asarray(contract.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(contract.std, np.float32).reshape(1, -1, 1, 1)
        x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if contract.layout == "nhwc" else x
