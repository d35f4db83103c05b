"""ONNX Runtime sessions for exported embedding models, with inputs bound by name.

An exported model (see ``fct_registry.onnx_boundary.export``) has named float32 inputs whose first dim is the
symbolic batch B, e.g. ``image`` (B, C, H, W) for a backbone, or ``old_embedding`` (B, d_old) and ``side_info``
(B, d_side) for a forward transformation (FCT: Ramanujan et al., CVPR 2022, arXiv 2112.02805),
and one output ``embedding`` (B, d).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fct_registry.core.errors import RuntimeInputError

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


def default_providers(available: Sequence[str] | None = None) -> list[str]:
    """The execution providers to use when none are given: CUDA first only when offered, CPU always last.

    Args:
        available: Providers the installed onnxruntime offers; None asks ``ort.get_available_providers()``.

    Returns:
        ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` when CUDA is available, else
        ``["CPUExecutionProvider"]``.
    """
    available = ort.get_available_providers() if available is None else available
    return [CUDA_PROVIDER, CPU_PROVIDER] if CUDA_PROVIDER in available else [CPU_PROVIDER]


def _resolve_providers(providers: Sequence[str] | None) -> list[str]:
    if providers is None:
        return default_providers()
    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise RuntimeInputError(f"execution providers {unknown} are not available; onnxruntime offers {available}")
    return [p for p in providers if p != CPU_PROVIDER] + [CPU_PROVIDER]


UNCERTAINTY_OUTPUT = "uncertainty"


class OnnxModel:
    """One ONNX Runtime inference session over an exported embedding model.

    Attributes:
        path: The ``.onnx`` file.
        providers: Execution providers the session actually uses, in priority order.
        input_names: Graph input names in graph order.
        input_shapes: Input name -> ONNX shape, symbolic dims as strings, e.g. ``("batch", 1, 28, 28)``.
        output_name: The embedding output's name (the graph's first output).
        output_dim: d, the width of the (B, d) float32 embedding output.
        has_uncertainty: Whether the graph has a second output ``uncertainty`` (B, 1) float32: a FastFill forward
            transformation's predicted log-variance sigma per item (Jaeckle et al., ICLR 2023, arXiv 2303.04766).
    """

    def __init__(self, path: str | os.PathLike[str], providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None, spinning: bool = True) -> None:
        """Load ``path`` into a session.

        Args:
            path: An ``.onnx`` file with float inputs (B, ...), an output (B, d) and optionally a second output
                ``uncertainty`` (B, 1).
            providers: ONNX Runtime execution providers in priority order; CPU is appended last if missing.
                None: CUDA first when onnxruntime offers it, then CPU (see ``default_providers``).
            intra_op_threads: Threads one call may use; None lets ONNX Runtime take one per core (best for one
                big batch at a time). 1 suits callers that run several sessions at once or small batches on a
                busy machine (serving, the local upgrade engine's threads).
            spinning: Whether idle intra-op threads spin waiting for work (ONNX Runtime's default) instead of
                sleeping; spinning burns CPU that concurrent work could use.

        Raises:
            RuntimeInputError: A provider is unavailable, or the file is missing, corrupted or its outputs are
                not (batch, d) [+ ``uncertainty`` (batch, 1)].
        """
        self.path = Path(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no provider fallback chatter
        if intra_op_threads is not None:
            if intra_op_threads < 1:
                raise RuntimeInputError(f"intra_op_threads must be >= 1 (or None for one per core); got "
                                        f"{intra_op_threads}")
            options.intra_op_num_threads = intra_op_threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=_resolve_providers(providers)
            )
        except RuntimeInputError:
            raise
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise RuntimeInputError(f"cannot load ONNX model {self.path}: {exc}".splitlines()[0]) from exc
        self.providers = self._session.get_providers()
        inputs = self._session.get_inputs()
        self.input_names = tuple(i.name for i in inputs)
        self.input_shapes = {i.name: tuple(i.shape) for i in inputs}
        outputs = self._session.get_outputs()
        extra_ok = len(outputs) == 1 or (len(outputs) == 2 and outputs[1].name == UNCERTAINTY_OUTPUT
                                         and len(outputs[1].shape) == 2 and outputs[1].shape[1] == 1)
        if not extra_ok or len(outputs[0].shape) != 2 or not isinstance(outputs[0].shape[1], int):
            shapes = {o.name: o.shape for o in outputs}
            raise RuntimeInputError(f"{self.path} must have one output of shape (batch, d), optionally followed by "
                                    f"{UNCERTAINTY_OUTPUT!r} (batch, 1); got {shapes}")
        self.output_name = outputs[0].name
        self.output_dim = outputs[0].shape[1]
        self.has_uncertainty = len(outputs) == 2

    def run(self, *arrays: object, **inputs: object) -> np.ndarray:
        """Embed one batch.

        Args:
            *arrays: At most one positional array, and only for a single-input model.
            **inputs: Input name -> array-like (B, ...) of finite real numbers (any int/float dtype, numpy array
                or nested lists); each is cast to a C-contiguous float32 array (no copy when it already is one; the
                caller's array is never modified). Keyword order does not matter. A single item must keep its batch
                axis: (1, ...).

        Returns:
            float32 array (B, output_dim); B = 1 stays (1, output_dim).

        Raises:
            RuntimeInputError: Names differ from ``input_names`` (the message lists every expected input),
                a value is not numeric or is complex (never truncated to its real part), holds NaN or inf
                (before or after the cast to float32, e.g. 1e39; naming the input and the batch row), has the
                wrong rank or trailing dims, or batch sizes differ.
        """
        return self._session.run([self.output_name], self._feed(arrays, inputs))[0]

    def run_with_uncertainty(self, **inputs: object) -> tuple[np.ndarray, np.ndarray]:
        """Run a FastFill transformation: inputs as :meth:`run` -> (embeddings (B, d) float32, sigma (B,) float32).

        Raises:
            RuntimeInputError: the model has no ``uncertainty`` output, or any input problem of :meth:`run`.
        """
        if not self.has_uncertainty:
            raise RuntimeInputError(f"{self.path} has no {UNCERTAINTY_OUTPUT!r} output (not a FastFill "
                                    "transformation)")
        embeddings, sigma = self._session.run([self.output_name, UNCERTAINTY_OUTPUT], self._feed((), inputs))
        return embeddings, sigma[:, 0]

    def _feed(self, arrays: tuple[object, ...], inputs: dict[str, object]) -> dict[str, np.ndarray]:
        if arrays:
            if len(arrays) != 1 or inputs or len(self.input_names) != 1:
                raise RuntimeInputError(
                    f"{self.path.name} expects inputs by name {list(self.input_names)}; "
                    f"got {len(arrays)} positional array(s) and names {sorted(inputs)}"
                )
            inputs = {self.input_names[0]: arrays[0]}
        if sorted(inputs) != sorted(self.input_names):
            raise RuntimeInputError(
                f"{self.path.name} expects inputs {list(self.input_names)}; got {sorted(inputs)}"
            )
        feed = {name: self._as_input(name, value) for name, value in inputs.items()}
        batch_sizes = {name: x.shape[0] for name, x in feed.items()}
        if len(set(batch_sizes.values())) > 1:
            raise RuntimeInputError(f"inputs must share one batch size B; got {batch_sizes}")
        return feed

    def _as_input(self, name: str, value: object) -> np.ndarray:
        expected = self.input_shapes[name]
        try:
            raw = np.asarray(value)
        except (TypeError, ValueError) as exc:
            raise RuntimeInputError(f"input {name!r} is not a numeric array: {exc}".splitlines()[0]) from exc
        if raw.dtype.kind not in "biuf":
            kind = "complex numbers" if raw.dtype.kind == "c" else "non-numeric values"
            raise RuntimeInputError(f"input {name!r} holds {kind} (dtype {raw.dtype}); expected real numbers "
                                    "(int or float)")
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused below
            array = np.asarray(raw, dtype=np.float32, order="C")  # no copy when it already is (ORT only reads it)
        fixed = all(e == a for e, a in zip(expected[1:], array.shape[1:], strict=False) if isinstance(e, int))
        if array.ndim != len(expected) or not fixed:
            raise RuntimeInputError(f"input {name!r} has shape {array.shape}; expected {expected}")
        finite = np.isfinite(array).all(axis=tuple(range(1, array.ndim)))  # per batch row
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            raise RuntimeInputError(f"input {name!r} row {row} holds NaN or inf (as float32); expected finite "
                                    "real numbers")
        return array
