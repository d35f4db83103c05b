"""Export PyTorch embedding models to one self-contained ONNX file, checked for parity.

Model conventions (see the module contracts): a backbone or side-info model maps ``image`` (B, C, H, W) to
``embedding`` (B, d); a forward transformation h (FCT: Ramanujan et al., CVPR 2022, arXiv 2112.02805, Sec. 3)
maps ``old_embedding`` (B, d_old) and optionally ``side_info`` (B, d_side) to ``embedding`` (B, d_new), and a
FastFill transformation (Jaeckle et al., ICLR 2023, arXiv 2303.04766) also to ``uncertainty`` (B, 1).

The export uses the ``torch.export``-based ONNX exporter (``dynamo=True``) with one symbolic dimension named
``"batch"`` shared by every input and the output, stores all weights inside the ``.onnx`` file, runs
``onnx.checker`` and compares ONNX Runtime (CPU) with eager PyTorch at batch sizes 1, 3 and 1024. The file only
appears at ``path`` once every check has passed.

The exporter records each node's Python stack trace, absolute file paths included; those are dropped, so the
file's sha256 (a model version's content identity in the registry) depends on the model, not on the checkout.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx.external_data_helper import uses_external_data

from fct_registry.core.errors import ExportError
from fct_registry.onnx_boundary.runtime import UNCERTAINTY_OUTPUT, OnnxModel

BATCH_DIM = "batch"
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"
PARITY_BATCH_SIZES = (1, 3, 1024)
PARITY_ATOL = 1e-4


@dataclass(frozen=True)
class ExportReport:
    """What was exported and how closely ONNX Runtime matches PyTorch.

    Attributes:
        path: The written ``.onnx`` file (self-contained, no ``.onnx.data`` beside it).
        sha256: Hex sha256 of the file's bytes (the ``ModelRef.sha256`` content identity).
        input_names: Graph input names in graph order, e.g. ``("old_embedding", "side_info")``.
        input_shapes: Per input, its ONNX shape with the symbolic batch first, e.g. ``("batch", 1, 28, 28)``.
        output_name: The graph's embedding output, ``"embedding"`` by default.
        has_uncertainty: Whether the graph also outputs ``uncertainty`` (B, 1) (a FastFill transformation).
        output_dim: d, the width of the (B, d) float32 output.
        max_abs_diff: Batch size -> max |onnxruntime - torch| over all output elements (float32 units).
    """

    path: Path
    sha256: str
    input_names: tuple[str, ...]
    input_shapes: dict[str, tuple[str | int, ...]]
    output_name: str
    has_uncertainty: bool
    output_dim: int
    max_abs_diff: dict[int, float]


def export_onnx(
    module: torch.nn.Module,
    example_inputs: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    output_name: str = "embedding",
    opset: int | None = None,
) -> ExportReport:
    """Export ``module`` to ``path`` as one ONNX file with a symbolic batch dim, then check it.

    Args:
        module: An ``nn.Module`` in eval mode whose ``forward`` takes the inputs by the names in
            ``example_inputs`` and returns one float32 tensor (B, d), or, for a FastFill transformation
            (``module.init_kwargs["uncertainty"]`` true), the pair (embedding (B, d), uncertainty (B, 1)).
        example_inputs: Forward parameter name -> example float32 tensor (B, ...); only the trailing shape
            (everything after B) is fixed in the graph. Graph inputs follow this dict's order.
        path: Destination ``.onnx`` file; replaced atomically if it exists.
        output_name: Name of the graph output.
        opset: ONNX opset version; None uses the exporter's default.

    Returns:
        The ExportReport, with parity measured at batch sizes 1, 3 and 1024 on seeded standard-normal inputs.

    Raises:
        ExportError: ``module`` or one of its submodules is in training mode; an example name is not a
            ``forward`` parameter or a required parameter has no example; an example is not a tensor with a
            batch axis; the exporter fails; the graph lacks the ``"batch"`` dim, is not self-contained or fails
            ``onnx.checker``; or the max abs difference exceeds 1e-4 at any checked batch size.
    """
    _check_eval_mode(module)
    _check_example_inputs(module, example_inputs)
    path = Path(path)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        names = _output_names(module, output_name)
        _torch_export(module, example_inputs, tmp, names, opset)
        _strip_stack_traces(tmp)
        _check_graph(tmp, names)
        model = OnnxModel(tmp, providers=["CPUExecutionProvider"])
        diffs = {b: _parity_diff(module, model, example_inputs, b) for b in PARITY_BATCH_SIZES}
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(
        path=path,
        sha256=_sha256(path),
        input_names=model.input_names,
        input_shapes=model.input_shapes,
        output_name=output_name,
        has_uncertainty=model.has_uncertainty,
        output_dim=model.output_dim,
        max_abs_diff=diffs,
    )


def _output_names(module: torch.nn.Module, output_name: str) -> list[str]:
    with_sigma = bool(getattr(module, "init_kwargs", {}).get("uncertainty", False))
    return [output_name, UNCERTAINTY_OUTPUT] if with_sigma else [output_name]


def _check_eval_mode(module: torch.nn.Module) -> None:
    training = [name or type(module).__name__ for name, sub in module.named_modules() if sub.training]
    if training:
        raise ExportError(f"module is in training mode (submodules {training[:3]}); call module.eval() first")


def _check_example_inputs(module: torch.nn.Module, example_inputs: dict[str, torch.Tensor]) -> None:
    params = inspect.signature(module.forward).parameters
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty]
    unknown = [n for n in example_inputs if n not in params]
    missing = [n for n in required if n not in example_inputs]
    if not example_inputs or unknown or missing:
        raise ExportError(
            f"example_inputs names {list(example_inputs)} do not match {type(module).__name__}.forward "
            f"parameters {list(params)} (unknown {unknown}, missing {missing})"
        )
    for name, x in example_inputs.items():
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] < 1 or not x.is_floating_point():
            raise ExportError(f"example input {name!r} must be a float tensor (B>=1, ...); got {x!r:.80}")


def _torch_export(
    module: torch.nn.Module, example_inputs: dict[str, torch.Tensor], path: Path, output_names: list[str],
    opset: int | None
) -> None:
    batch = torch.export.Dim(BATCH_DIM, min=1)
    with warnings.catch_warnings():
        # Every input shares the one "batch" Dim, which the exporter reports as a duplicate axis name.
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used")
        try:
            torch.onnx.export(
                module,
                (),
                str(path),
                kwargs=dict(example_inputs),
                output_names=output_names,
                dynamic_shapes={name: {0: batch} for name in example_inputs},
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many unrelated types; report them as one
            raise ExportError(f"torch.onnx.export of {type(module).__name__} failed: {exc}".splitlines()[0]) from exc


def _strip_stack_traces(path: Path) -> None:
    proto = onnx.load(str(path), load_external_data=False)
    graphs = [proto.graph]
    nodes = [node for function in proto.functions for node in function.node]
    while graphs:
        graph = graphs.pop()
        nodes.extend(graph.node)
        graphs.extend(a.g for node in graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
    for node in nodes:
        kept = [prop for prop in node.metadata_props if prop.key != STACK_TRACE_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.save(proto, str(path))


def _check_graph(path: Path, output_names: list[str]) -> None:
    proto = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in proto.graph.initializer if uses_external_data(t)]
    if external:
        raise ExportError(f"{path} is not self-contained: tensors {external[:3]} are stored in external files")
    outputs = [o.name for o in proto.graph.output]
    if outputs != output_names:
        raise ExportError(f"expected graph outputs {output_names}; got {outputs}")
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].dim_param != BATCH_DIM:
            raise ExportError(f"graph value {value.name!r} has no symbolic {BATCH_DIM!r} first dim: {dims}")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the export: {exc}".splitlines()[0]) from exc


def _parity_diff(
    module: torch.nn.Module, model: OnnxModel, example_inputs: dict[str, torch.Tensor], batch_size: int
) -> float:
    generator = torch.Generator().manual_seed(batch_size)
    inputs = {n: torch.randn(batch_size, *x.shape[1:], generator=generator) for n, x in example_inputs.items()}
    with torch.inference_mode():
        expected = module(**{n: x.to(example_inputs[n].device) for n, x in inputs.items()})
    feed = {n: x.numpy() for n, x in inputs.items()}
    if model.has_uncertainty:
        expected = torch.cat(expected, dim=1)
        embeddings, sigma = model.run_with_uncertainty(**feed)
        actual = np.concatenate([embeddings, sigma[:, None]], axis=1)
        width = model.output_dim + 1
    else:
        actual, width = model.run(**feed), model.output_dim
    expected = expected.detach().cpu().numpy()
    if actual.shape != expected.shape or expected.shape != (batch_size, width):
        raise ExportError(f"output shape at batch {batch_size}: onnx {actual.shape}, torch {expected.shape}")
    diff = float(np.max(np.abs(actual - expected)))
    if not diff <= PARITY_ATOL:
        raise ExportError(f"ONNX Runtime vs torch max abs diff {diff:.3g} > {PARITY_ATOL} at batch {batch_size}")
    return diff


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
