"""Check that an ONNX image embedding model can be registered, before anything is written.

A model registered in the registry embeds galleries, queries and training features, always through ONNX Runtime and
always with images prepared by its input contract (:mod:`fct_registry.onnx_boundary.contract`). So before a file
becomes a version, :func:`validate_image_model` runs it the way the rest of the project will:

- the file loads in ONNX Runtime (CPU) and has exactly one input and one output;
- the input is (B, ...) with a symbolic batch axis B and the contract's trailing shape (``contract.input_shape``:
  (C, H, W) for ``nchw``, (H, W, C) for ``nhwc``); a symbolic H or W is accepted, a symbolic C is not;
- on a probe batch of random uint8 images prepared with :func:`~fct_registry.onnx_boundary.contract.prepare`, the
  output is float32 (B, d) and finite;
- each image embeds the same alone (batch 1) as within the batch (row i of the batch-n run equals the batch-1 run
  of image i within :data:`BATCH_RTOL`, relative to the largest output magnitude): a model whose vectors depend on
  their batch (BatchNorm left in training mode, batch statistics) would make stored vectors irreproducible;
- when the vectors are declared L2-normalised, every row's norm is 1 within :data:`NORM_ATOL`.

Every failure is a :class:`~fct_registry.core.errors.ModelValidationError` with one line naming the file, what was
found and what was expected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fct_registry.core.errors import ModelValidationError, RuntimeInputError
from fct_registry.onnx_boundary.contract import InputContract, prepare

if TYPE_CHECKING:
    from fct_registry.onnx_boundary.runtime import OnnxModel

PROBE_BATCH = 8
BATCH_RTOL = 1e-4
NORM_ATOL = 1e-3


@dataclass(frozen=True)
class ValidationResult:
    """What :func:`validate_image_model` measured on a valid model.

    Attributes:
        path: The checked ``.onnx`` file.
        input_name: The single graph input's name, e.g. ``"image"``.
        input_shape: Its ONNX shape, symbolic dims as strings, e.g. ``("batch", 3, 224, 224)``.
        embedding_dim: d, the width of the (B, d) float32 output.
        probe_batch: Number of probe images (the batch size n compared with batch 1).
        max_batch_diff: max |batch-n row - batch-1 run| / max |output| over the probe (dimensionless); at most
            :data:`BATCH_RTOL`.
        max_norm_error: max | ||row||_2 - 1 | over the probe when the vectors were declared L2-normalised, else
            None.
    """

    path: Path
    input_name: str
    input_shape: tuple[str | int, ...]
    embedding_dim: int
    probe_batch: int
    max_batch_diff: float
    max_norm_error: float | None


def validate_image_model(path: str | os.PathLike, contract: InputContract, normalized: bool = False,
                         probe_batch: int = PROBE_BATCH, seed: int = 0) -> ValidationResult:
    """Check that ``path`` is an image embedding model that follows ``contract`` (nothing is written).

    Args:
        path: An ``.onnx`` file.
        contract: How images are prepared for it (size, colour, layout, scaling).
        normalized: The model claims its output rows have unit L2 norm; checked when True.
        probe_batch: n, the number of random probe images (>= 2).
        seed: Seed of the probe images (uint8, uniform over 0..255, shape (n, C, H, W)).

    Returns:
        The :class:`ValidationResult` (input name and shape, d, measured batch consistency and norm error).

    Raises:
        ModelValidationError: the file is missing or does not load in ONNX Runtime; it has not exactly one input
            and one (B, d) output; the input's batch axis is fixed or its other dims differ from the contract's;
            ONNX Runtime fails on the probe batch; the output is not float32 (n, d), has NaN or inf, depends on the
            batch it is computed in (relative difference > :data:`BATCH_RTOL`), or, with ``normalized``, has a
            row whose L2 norm is not 1 within :data:`NORM_ATOL`.
    """
    if probe_batch < 2:
        raise ModelValidationError(f"probe_batch is {probe_batch}; expected at least 2 to compare with batch 1")
    path = Path(path)
    if not path.is_file():
        raise ModelValidationError(f"ONNX file {path} does not exist")
    from fct_registry.onnx_boundary.runtime import CPU_PROVIDER, OnnxModel  # onnxruntime, loaded only to validate

    try:
        model = OnnxModel(path, providers=[CPU_PROVIDER])
    except RuntimeInputError as exc:
        raise ModelValidationError(str(exc)) from None
    name, shape = _check_input(model, contract)
    images = np.random.default_rng(seed).integers(0, 256, (probe_batch, contract.channels, contract.height,
                                                                contract.width), dtype=np.uint8)
    x = prepare(images, contract)
    batched = _embed(model, x)
    singles = np.concatenate([_embed(model, x[i:i + 1]) for i in range(probe_batch)])
    scale = max(float(np.abs(singles).max()), float(np.abs(batched).max()), float(np.finfo(np.float32).tiny))
    batch_diff = float(np.abs(batched - singles).max()) / scale
    if not batch_diff <= BATCH_RTOL:
        raise ModelValidationError(
            f"{path}: embeddings depend on the batch: batch-{probe_batch} rows differ from batch-1 runs by "
            f"{batch_diff:.3g} (relative); expected at most {BATCH_RTOL:g} (is BatchNorm left in training mode, or "
            "are batch statistics used?)")
    norm_error = None
    if normalized:
        norms = np.linalg.norm(batched.astype(np.float64), axis=1)
        norm_error = float(np.abs(norms - 1.0).max())
        if not norm_error <= NORM_ATOL:
            raise ModelValidationError(
                f"{path}: declared L2-normalised, but probe row norms range {norms.min():.4g}..{norms.max():.4g}; "
                f"expected 1 within {NORM_ATOL:g}")
    return ValidationResult(path=path, input_name=name, input_shape=shape, embedding_dim=model.output_dim,
                            probe_batch=probe_batch, max_batch_diff=batch_diff, max_norm_error=norm_error)


def _check_input(model: OnnxModel, contract: InputContract) -> tuple[str, tuple[str | int, ...]]:
    """The single input's name and ONNX shape, checked against the contract."""
    expected = f"(batch, {', '.join(map(str, contract.input_shape))})"
    what = f"the {contract.color} {contract.height}x{contract.width} {contract.layout} contract"
    if len(model.input_names) != 1:
        raise ModelValidationError(f"{model.path} has {len(model.input_names)} inputs {list(model.input_names)}; "
                                   f"expected exactly one image input {expected}")
    name = model.input_names[0]
    shape = model.input_shapes[name]
    if len(shape) != 4:
        raise ModelValidationError(f"{model.path}: input {name!r} has shape {shape}; {what} expects {expected}")
    if isinstance(shape[0], int):
        raise ModelValidationError(f"{model.path}: input {name!r} has a fixed batch axis ({shape[0]}) in {shape}; "
                                   f"expected a symbolic batch axis, {expected}")
    channel_axis = 0 if contract.layout == "nchw" else 2
    for axis, (got, want) in enumerate(zip(shape[1:], contract.input_shape, strict=True)):
        if got != want and (isinstance(got, int) or axis == channel_axis):
            raise ModelValidationError(f"{model.path}: input {name!r} has shape {shape}; {what} expects {expected}")
    return name, shape


def _embed(model: OnnxModel, x: np.ndarray) -> np.ndarray:
    """Run one prepared batch (n, ...) float32 and check the output is finite float32 (n, d)."""
    try:
        out = model.run(x)
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelValidationError(f"{model.path}: ONNX Runtime failed on a probe batch {x.shape} float32: "
                                   f"{first}") from None
    if out.dtype != np.float32 or out.shape != (len(x), model.output_dim):
        raise ModelValidationError(f"{model.path}: output is {out.dtype} {out.shape} for a batch of {len(x)}; "
                                   f"expected float32 ({len(x)}, {model.output_dim})")
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).any(axis=1).sum())
        raise ModelValidationError(f"{model.path}: output has NaN or inf in {bad} of {len(x)} probe rows; "
                                   "expected finite values")
    return out
