"""ONNX export (parity, symbolic batch, self-contained file) and ONNX Runtime input binding."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from fct_registry.core.errors import ExportError, RuntimeInputError
from fct_registry.onnx_boundary.export import ExportReport, export_onnx
from fct_registry.onnx_boundary.runtime import OnnxModel, default_providers


class TinyBackbone(nn.Module):
    """image (B, 1, 28, 28) -> embedding (B, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2)
        )
        self.head = nn.Linear(16, 8)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image).flatten(1))


class TinyTransformation(nn.Module):
    """old_embedding (B, 8) + side_info (B, 16) -> embedding (B, 32), shaped like FCT's h."""

    def __init__(self) -> None:
        super().__init__()
        self.old_proj = nn.Linear(8, 16)
        self.side_proj = nn.Linear(16, 16)
        self.mixer = nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32))

    def forward(self, old_embedding: torch.Tensor, side_info: torch.Tensor) -> torch.Tensor:
        return self.mixer(torch.cat([self.old_proj(old_embedding), self.side_proj(side_info)], dim=1))


class TinyMlp(nn.Module):
    """old_embedding (B, 8) -> embedding (B, 32): a transformation without side-info."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32))

    def forward(self, old_embedding: torch.Tensor) -> torch.Tensor:
        return self.net(old_embedding)


class NoisyHead(TinyMlp):
    """Exports fine but draws fresh noise on every call, so ONNX Runtime cannot match torch."""

    def forward(self, old_embedding: torch.Tensor) -> torch.Tensor:
        return self.net(old_embedding) + torch.rand_like(self.net(old_embedding))


# name -> (module class, input name -> trailing shape, output dim d)
CASES = {
    "backbone": (TinyBackbone, {"image": (1, 28, 28)}, 8),
    "transformation": (TinyTransformation, {"old_embedding": (8,), "side_info": (16,)}, 32),
    "mlp": (TinyMlp, {"old_embedding": (8,)}, 32),
}


@dataclass
class Exported:
    module: nn.Module
    report: ExportReport
    model: OnnxModel


def _build(cls: type[nn.Module]) -> nn.Module:
    """Seeded module in eval mode with non-trivial BatchNorm statistics, so eval-mode BN is really tested."""
    torch.manual_seed(0)
    module = cls()
    for bn in (m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    return module.eval()


def _examples(name: str, batch: int = 2, dtype=torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch)
    return {n: torch.randn(batch, *shape, generator=generator, dtype=dtype) for n, shape in CASES[name][1].items()}


def _torch_embed(module: nn.Module, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.inference_mode():
        return module(**inputs).numpy()


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Exported]:
    """Each tiny model exported once, alone in its own folder."""
    out = {}
    for name, (cls, _, _) in CASES.items():
        module = _build(cls)
        report = export_onnx(module, _examples(name), tmp_path_factory.mktemp(name) / "model.onnx")
        out[name] = Exported(module, report, OnnxModel(report.path, providers=["CPUExecutionProvider"]))
    return out


@pytest.mark.parametrize("name", CASES)
def test_report_describes_export_with_parity_at_1_3_1024(exports, name):
    report = exports[name].report
    trailing = CASES[name][1]
    assert report.max_abs_diff.keys() == {1, 3, 1024}
    assert all(0.0 <= diff <= 1e-4 for diff in report.max_abs_diff.values())
    assert report.input_names == tuple(trailing)
    assert report.input_shapes == {n: ("batch", *shape) for n, shape in trailing.items()}
    assert (report.output_name, report.output_dim) == ("embedding", CASES[name][2])
    assert report.sha256 == hashlib.sha256(report.path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", CASES)
def test_export_is_one_self_contained_file(exports, name, tmp_path):
    report = exports[name].report
    assert [p.name for p in report.path.parent.iterdir()] == ["model.onnx"]
    moved = shutil.copy(report.path, tmp_path / "elsewhere.onnx")
    inputs = _examples(name, batch=5)
    np.testing.assert_allclose(
        OnnxModel(moved).run(**{n: x.numpy() for n, x in inputs.items()}),
        _torch_embed(exports[name].module, inputs),
        atol=1e-4,
    )


def test_export_bytes_depend_on_the_model_not_on_where_its_source_lives(exports, tmp_path):
    """The exporter records stack traces with absolute paths; the registry's sha256 identity must not see them."""
    first = exports["transformation"].report
    assert __file__.encode() not in first.path.read_bytes()
    again = export_onnx(_build(TinyTransformation), _examples("transformation"), tmp_path / "again.onnx")
    assert again.sha256 == first.sha256


@pytest.mark.parametrize("name", CASES)
def test_every_input_and_output_has_symbolic_batch(exports, name):
    graph = onnx.load(str(exports[name].report.path)).graph
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert shapes == {n: ["batch", *shape] for n, shape in CASES[name][1].items()}
    (output,) = graph.output
    assert [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim] == ["batch", CASES[name][2]]


def test_export_refuses_training_mode(tmp_path):
    module = _build(TinyTransformation).train()
    with pytest.raises(ExportError, match="training mode"):
        export_onnx(module, _examples("transformation"), tmp_path / "h.onnx")
    module.eval()
    module.mixer[1].train()  # one BatchNorm left in training mode is refused too
    with pytest.raises(ExportError, match=r"mixer\.1"):
        export_onnx(module, _examples("transformation"), tmp_path / "h.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_misnamed_or_missing_inputs(tmp_path):
    with pytest.raises(ExportError, match=r"unknown \['img'\].*missing \['image'\]"):
        export_onnx(_build(TinyBackbone), {"img": torch.randn(2, 1, 28, 28)}, tmp_path / "b.onnx")
    with pytest.raises(ExportError, match=r"missing \['side_info'\]"):
        export_onnx(_build(TinyTransformation), {"old_embedding": torch.randn(2, 8)}, tmp_path / "h.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_fails_parity_and_leaves_nothing(tmp_path):
    with pytest.raises(ExportError, match="max abs diff"):
        export_onnx(_build(NoisyHead), _examples("mlp"), tmp_path / "noisy.onnx")
    assert list(tmp_path.iterdir()) == []


def test_runtime_binds_inputs_by_name(exports):
    exported = exports["transformation"]
    inputs = _examples("transformation", batch=7)
    swapped = exported.model.run(side_info=inputs["side_info"].numpy(), old_embedding=inputs["old_embedding"].numpy())
    assert swapped.dtype == np.float32 and swapped.shape == (7, 32)
    np.testing.assert_allclose(swapped, _torch_embed(exported.module, inputs), atol=1e-4)


def test_single_thread_non_spinning_session_embeds_like_the_default(exports):
    exported = exports["transformation"]
    inputs = {n: x.numpy() for n, x in _examples("transformation", batch=5).items()}
    single = OnnxModel(exported.model.path, intra_op_threads=1, spinning=False)
    np.testing.assert_allclose(single.run(**inputs), exported.model.run(**inputs), atol=1e-6)
    torch_inputs = {n: torch.from_numpy(x) for n, x in inputs.items()}
    np.testing.assert_allclose(single.run(**inputs), _torch_embed(exported.module, torch_inputs), atol=1e-4)
    with pytest.raises(RuntimeInputError, match="intra_op_threads must be >= 1.*got 0"):
        OnnxModel(exported.model.path, intra_op_threads=0)


def test_runtime_accepts_float64_lists_and_column_slices(exports):
    model = exports["transformation"].model
    inputs64 = {n: x.numpy() for n, x in _examples("transformation", batch=4, dtype=torch.float64).items()}
    inputs32 = {n: x.astype(np.float32) for n, x in inputs64.items()}
    expected = model.run(**inputs32)
    np.testing.assert_array_equal(model.run(**inputs64), expected)
    np.testing.assert_array_equal(model.run(**{n: x.tolist() for n, x in inputs32.items()}), expected)
    wide = np.concatenate([inputs64["side_info"], np.full((4, 3), np.nan)], axis=1)  # non-contiguous view
    view = wide[:, :16]
    np.testing.assert_array_equal(model.run(old_embedding=inputs32["old_embedding"], side_info=view), expected)
    assert np.isnan(wide[:, 16:]).all() and wide.dtype == np.float64  # input untouched


def test_runtime_names_both_inputs_when_one_is_missing(exports):
    model = exports["transformation"].model
    old = np.zeros((2, 8), dtype=np.float32)
    for call in (lambda: model.run(old_embedding=old), lambda: model.run(old)):
        with pytest.raises(RuntimeInputError, match=r"'old_embedding', 'side_info'"):
            call()


def test_runtime_rejects_bad_shapes(exports):
    model = exports["transformation"].model
    with pytest.raises(RuntimeInputError, match=r"'old_embedding' has shape \(8,\)"):
        model.run(old_embedding=np.zeros(8), side_info=np.zeros((1, 16)))
    with pytest.raises(RuntimeInputError, match=r"'side_info' has shape \(2, 15\)"):
        model.run(old_embedding=np.zeros((2, 8)), side_info=np.zeros((2, 15)))
    with pytest.raises(RuntimeInputError, match="one batch size"):
        model.run(old_embedding=np.zeros((2, 8)), side_info=np.zeros((3, 16)))


@pytest.mark.parametrize("name", CASES)
def test_runtime_batch_of_one_keeps_its_axis(exports, name):
    inputs = _examples(name, batch=1)
    out = exports[name].model.run(**{n: x.numpy() for n, x in inputs.items()})
    assert out.shape == (1, CASES[name][2])
    np.testing.assert_allclose(out, _torch_embed(exports[name].module, inputs), atol=1e-4)


def test_single_input_model_accepts_one_positional_array(exports):
    x = _examples("backbone", batch=3)["image"].numpy()
    model = exports["backbone"].model
    np.testing.assert_array_equal(model.run(x), model.run(image=x))


def test_corrupted_or_missing_file_names_the_path(exports, tmp_path):
    corrupted = tmp_path / "corrupted.onnx"
    data = exports["transformation"].report.path.read_bytes()
    corrupted.write_bytes(data[: len(data) // 2])
    for path in (corrupted, tmp_path / "missing.onnx"):
        with pytest.raises(RuntimeInputError) as info:
            OnnxModel(path)
        assert str(path) in str(info.value)


def test_provider_choice_puts_cuda_first_only_when_available_and_cpu_last(exports):
    assert default_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert default_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    path = exports["mlp"].report.path
    assert OnnxModel(path).providers[-1] == "CPUExecutionProvider"
    with pytest.raises(RuntimeInputError, match="NoSuchExecutionProvider"):
        OnnxModel(path, providers=["NoSuchExecutionProvider"])


# ----- regressions of issue 10: the boundary refuses complex and non-finite input ------------------------------


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_runtime_refuses_complex_input_instead_of_dropping_the_imaginary_part(exports, dtype):
    model = exports["transformation"].model
    old = np.zeros((2, 8), dtype=dtype)
    old[1, 3] = 1 + 2j  # was silently truncated to 1.0
    with pytest.raises(RuntimeInputError, match=rf"^input 'old_embedding' holds complex numbers \(dtype "
                                                rf"{np.dtype(dtype)}\); expected real numbers") as info:
        model.run(old_embedding=old, side_info=np.zeros((2, 16)))
    assert "\n" not in str(info.value)
    with pytest.raises(RuntimeInputError, match="complex numbers"):
        model.run(old_embedding=old.tolist(), side_info=np.zeros((2, 16)))  # Python complex in lists too
    with pytest.raises(RuntimeInputError, match=r"input 'side_info' holds non-numeric values \(dtype <U1\)"):
        model.run(old_embedding=np.zeros((2, 8)), side_info=np.full((2, 16), "1"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])  # 1e39 is finite in float64, inf in float32
@pytest.mark.parametrize(("name", "row"), [("image", 2), ("old_embedding", 0), ("side_info", 3)])
def test_runtime_refuses_nan_and_inf_naming_input_and_row(exports, bad, name, row):
    case = "backbone" if name == "image" else "transformation"
    inputs = {n: x.numpy().astype(np.float64) for n, x in _examples(case, batch=4).items()}
    inputs[name][(row,) + (0,) * (inputs[name].ndim - 1)] = bad
    with pytest.raises(RuntimeInputError) as info:
        exports[case].model.run(**inputs)
    assert str(info.value) == (f"input {name!r} row {row} holds NaN or inf (as float32); expected finite real "
                               "numbers")


def test_runtime_still_accepts_integer_and_bool_input(exports):
    model = exports["backbone"].model
    pixels = np.random.default_rng(0).integers(0, 255, size=(2, 1, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(model.run(image=pixels), model.run(image=pixels.astype(np.float32)))
    assert model.run(image=pixels > 128).shape == (2, 8)
