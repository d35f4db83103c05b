"""Validation of user ONNX image models against an input contract, and the export helper for user torch modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from fct_registry.core.errors import ExportError, ModelValidationError
from fct_registry.onnx_boundary.contract import IMAGENET_MEAN, IMAGENET_STD, InputContract, prepare
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.onnx_boundary.user_export import export_embedding_model
from fct_registry.onnx_boundary.validation import BATCH_RTOL, validate_image_model

RGB32 = InputContract(height=32, width=32, color="rgb", mean=IMAGENET_MEAN, std=IMAGENET_STD)
NHWC24 = InputContract(height=24, width=16, color="rgb", layout="nhwc")
SMALL = InputContract(height=8, width=8, color="rgb")


class TinyRgb(nn.Module):
    """(B, 3, H, W) -> (B, 10), optionally L2-normalised or with the batch mean subtracted (batch-dependent)."""

    def __init__(self, normalize: bool = False, batch_centered: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(24, 10)
        self.normalize, self.batch_centered = normalize, batch_centered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.features(x).flatten(1))
        if self.batch_centered:
            out = out - out.mean(dim=0, keepdim=True)
        return nn.functional.normalize(out, dim=1) if self.normalize else out


class TinyNhwc(TinyRgb):
    """(B, H, W, 3) -> (B, 10)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2))


def _seeded(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    module.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    return module.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    folder = tmp_path_factory.mktemp("models")
    cases = {"rgb": (TinyRgb(), RGB32, False), "nhwc": (TinyNhwc(), NHWC24, False),
             "unit": (TinyRgb(normalize=True), RGB32, True)}
    result = {}
    for key, (module, contract, normalized) in cases.items():
        module = _seeded(module)
        export_embedding_model(module, contract, folder / f"{key}.onnx", normalized=normalized)
        result[key] = (module, folder / f"{key}.onnx")
    return result


def graph_model(path: Path, inputs: list[tuple[str, list]], output_shape: list, nodes: list,
                initializers: list | None = None) -> Path:
    """Save a hand-made ONNX graph (opset 17) whose single output is ``y``."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)], initializer=initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def pooled(path: Path, input_shape: list, output_shape: list | None = None, tail: list | None = None,
           initializers: list | None = None) -> Path:
    """x -> GlobalAveragePool -> Flatten -> (tail nodes) -> y: (B, C) per-channel means."""
    flat = "y" if tail is None else "flat"
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], [flat]),
             *(tail or [])]
    return graph_model(path, [("x", input_shape)], output_shape or ["batch", 3], nodes, initializers)


def fails(path: Path, contract: InputContract, *phrases: str, normalized: bool = False) -> str:
    with pytest.raises(ModelValidationError) as info:
        validate_image_model(path, contract, normalized=normalized)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for phrase in phrases:
        assert phrase in message, message
    return message


def test_rgb_nchw_model_validates_and_matches_torch_on_prepared_images(exported):
    module, path = exported["rgb"]
    result = validate_image_model(path, RGB32)
    assert (result.input_name, result.input_shape, result.embedding_dim) == ("image", ("batch", 3, 32, 32), 10)
    assert result.probe_batch == 8 and 0 <= result.max_batch_diff <= BATCH_RTOL and result.max_norm_error is None
    images = np.random.default_rng(1).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    x = prepare(images, RGB32)
    with torch.inference_mode():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(OnnxModel(path).run(x), expected, rtol=0, atol=1e-4)


def test_nhwc_model_validates_against_an_nhwc_contract_only(exported):
    module, path = exported["nhwc"]
    result = validate_image_model(path, NHWC24)
    assert result.input_shape == ("batch", 24, 16, 3) and result.embedding_dim == 10
    nchw = NHWC24.model_copy(update={"layout": "nchw"})
    fails(path, nchw, "('batch', 24, 16, 3)", "expects (batch, 3, 24, 16)")


def test_normalized_output_is_checked_when_declared(exported):
    result = validate_image_model(exported["unit"][1], RGB32, normalized=True)
    assert result.max_norm_error is not None and result.max_norm_error < 1e-5
    fails(exported["rgb"][1], RGB32, "declared L2-normalised", "expected 1 within 0.001", normalized=True)


def test_wrong_size_or_colour_vs_contract(exported):
    path = exported["rgb"][1]
    fails(path, RGB32.model_copy(update={"height": 64}), "input 'image' has shape ('batch', 3, 32, 32)",
          "rgb 64x32 nchw contract expects (batch, 3, 64, 32)")
    fails(path, InputContract(height=32, width=32, color="grayscale"), "expects (batch, 1, 32, 32)")


def test_symbolic_height_and_width_are_accepted_but_not_a_symbolic_channel(tmp_path):
    path = pooled(tmp_path / "any-size.onnx", ["batch", 3, "h", "w"])
    result = validate_image_model(path, InputContract(height=20, width=12, color="rgb"))
    assert result.input_shape == ("batch", 3, "h", "w") and result.embedding_dim == 3
    fails(pooled(tmp_path / "any-c.onnx", ["batch", "c", 8, 8]), SMALL, "expects (batch, 3, 8, 8)")


def test_bad_structure_is_one_line_naming_the_file(tmp_path):
    two = graph_model(tmp_path / "two.onnx", [("a", ["batch", 3, 8, 8]), ("b", ["batch", 3, 8, 8])], ["batch", 3],
                      [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("GlobalAveragePool", ["s"], ["p"]),
                       helper.make_node("Flatten", ["p"], ["y"])])
    fails(two, SMALL, "has 2 inputs ['a', 'b']", "expected exactly one image input (batch, 3, 8, 8)")
    fixed = pooled(tmp_path / "fixed.onnx", [1, 3, 8, 8], output_shape=[1, 3])
    fails(fixed, SMALL, "fixed batch axis (1)", "expected a symbolic batch axis")
    rank3 = graph_model(tmp_path / "rank3.onnx", [("x", ["batch", 3, 8, 8])], ["batch", 3, 1],
                        [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
                         helper.make_node("Squeeze", ["p", "axes"], ["y"])],
                        [helper.make_tensor("axes", TensorProto.INT64, [1], [3])])
    fails(rank3, SMALL, "must have one output of shape (batch, d)")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    fails(garbage, SMALL, "cannot load ONNX model")
    with pytest.raises(ModelValidationError, match="does not exist"):
        validate_image_model(tmp_path / "missing.onnx", SMALL)


def test_nan_output_is_refused(tmp_path):
    nan = pooled(tmp_path / "nan.onnx", ["batch", 3, 8, 8], tail=[helper.make_node("Mul", ["flat", "k"], ["y"])],
                 initializers=[helper.make_tensor("k", TensorProto.FLOAT, [3], [1.0, float("nan"), 1.0])])
    fails(nan, SMALL, "NaN or inf in 8 of 8 probe rows", "expected finite values")


def test_batch_dependent_output_is_refused(tmp_path):
    module = _seeded(TinyRgb(batch_centered=True))
    path = tmp_path / "centered.onnx"
    with pytest.raises(ModelValidationError, match="embeddings depend on the batch") as info:
        export_embedding_model(module, RGB32, path)
    assert str(info.value).startswith(f"{path}: ") and "batch-8 rows differ from batch-1 runs" in str(info.value)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_export_helper_refuses_a_module_in_training_mode_and_writes_nothing(tmp_path):
    module = _seeded(TinyRgb()).train()
    with pytest.raises(ExportError, match="training mode"):
        export_embedding_model(module, RGB32, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == [] and module.training
