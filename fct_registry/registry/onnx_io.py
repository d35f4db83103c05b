"""The inputs and outputs of an ONNX file (names, dtypes, shapes), for the signature MLflow shows with a version.

Read through ONNX Runtime (:class:`~fct_registry.onnx_boundary.runtime.OnnxModel`, imported only when called): every
model the registry serves has named float32 inputs with a symbolic batch axis and one (batch, d) float32 output, the
only kind ONNX Runtime sessions here feed and validation accepts. Symbolic dims become -1, MLflow's variable dim.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fct_registry.core.errors import RuntimeInputError


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: its name, numpy dtype name and shape (-1 for a symbolic dim)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class OnnxIO:
    """A model's graph inputs (in graph order) and outputs."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


def onnx_io(path: str | os.PathLike) -> OnnxIO | None:
    """The inputs and the output of the ONNX file ``path``, or None when ONNX Runtime cannot load it as an embedding
    model (one (batch, d) output): such a file is registered without a signature."""
    from fct_registry.onnx_boundary.runtime import OnnxModel

    try:
        model = OnnxModel(path, providers=["CPUExecutionProvider"])
    except RuntimeInputError:
        return None

    def dims(shape: tuple[object, ...]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)

    inputs = tuple(TensorInfo(name, "float32", dims(model.input_shapes[name])) for name in model.input_names)
    batch = inputs[0].shape[0] if inputs and inputs[0].shape else -1
    return OnnxIO(inputs, (TensorInfo(model.output_name, "float32", (batch, model.output_dim)),))
