"""Contract test over every model the project exports (timm-style): shapes, finite outputs, gradients, ONNX parity."""

import numpy as np
import pytest
import torch

from fct_registry.method.models.backbone import ARCHITECTURES, Backbone
from fct_registry.method.models.checkpoint import load_checkpoint
from fct_registry.method.models.side_info import SideInfoModel
from fct_registry.method.models.transformation import ForwardTransformation
from fct_registry.onnx_boundary.model_card import read_model_card
from fct_registry.onnx_boundary.model_files import write_model_dir
from fct_registry.onnx_boundary.runtime import OnnxModel

IMAGE = (1, 28, 28)
MODELS = {
    **{f"backbone-{arch}": (lambda arch=arch: Backbone(arch, 12, width=4)) for arch in ARCHITECTURES},
    "side-info": lambda: SideInfoModel(10, 6, width=4),
    "side-info-cnn": lambda: SideInfoModel(10, 6, width=4, arch="cnn"),
    "transformation-side": lambda: ForwardTransformation(8, 12, d_side=10, hidden_dim=32),
    "transformation-noside": lambda: ForwardTransformation(8, 12, d_side=0, hidden_dim=32),
    "transformation-fastfill-side": lambda: ForwardTransformation(8, 12, d_side=10, hidden_dim=32, uncertainty=True),
    "transformation-fastfill-noside": lambda: ForwardTransformation(8, 12, hidden_dim=32, uncertainty=True),
}


def _outputs(out):
    """(embedding, sigma or None) of a model's forward output."""
    return out if isinstance(out, tuple) else (out, None)


def _inputs(model, batch):
    if isinstance(model, ForwardTransformation):
        inputs = {"old_embedding": torch.randn(batch, model.d_old)}
        if model.d_side:
            inputs["side_info"] = torch.randn(batch, model.d_side)
        return inputs
    return {"image": torch.rand(batch, *IMAGE)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shape_finite_and_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = MODELS[name]().train()
    out, sigma = _outputs(model(**_inputs(model, 5)))
    assert out.shape == (5, 12 if "side-info" not in name else 10)
    assert torch.isfinite(out).all()
    loss = out.square().mean()
    if "fastfill" in name:
        assert sigma.shape == (5, 1) and torch.isfinite(sigma).all()
        loss = loss + sigma.square().mean()
    else:
        assert sigma is None
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    if name.startswith("side-info"):  # the projection head is trained through project(), not forward()
        missing = [n for n in missing if not n.startswith("projection")]
    assert missing == []


@pytest.mark.parametrize("name", sorted(MODELS))
def test_single_item_batch_keeps_its_batch_axis(name):
    model = MODELS[name]().eval()
    assert all(o.shape[0] == 1 for o in _outputs(model(**_inputs(model, 1))) if o is not None)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_dir_round_trip_and_onnx_parity(name, tmp_path):
    torch.manual_seed(1)
    model = MODELS[name]().eval()
    image_shape = None if isinstance(model, ForwardTransformation) else IMAGE
    role = "transformation" if image_shape is None else "backbone"
    card = write_model_dir(model, tmp_path, role, "x1", {"train_loss": 0.5}, image_shape)
    assert max(card.parity_max_abs_diff.values()) <= 1e-4
    assert read_model_card(tmp_path) == card
    inputs = _inputs(model, 7)
    expected, sigma = _outputs(model(**inputs))
    reloaded, reloaded_sigma = _outputs(load_checkpoint(tmp_path / "model.pt")(**inputs))
    np.testing.assert_allclose(reloaded.detach().numpy(), expected.detach().numpy(), atol=1e-6)
    onnx_model, feed = OnnxModel(tmp_path / "model.onnx"), {k: v.numpy() for k, v in inputs.items()}
    assert onnx_model.has_uncertainty == (sigma is not None)
    np.testing.assert_allclose(onnx_model.run(**feed), expected.detach().numpy(), atol=1e-4)
    if sigma is not None:
        onnx_embedding, onnx_sigma = onnx_model.run_with_uncertainty(**feed)
        assert onnx_sigma.shape == (7,) and onnx_sigma.dtype == np.float32
        np.testing.assert_allclose(onnx_embedding, expected.detach().numpy(), atol=1e-4)
        np.testing.assert_allclose(onnx_sigma, sigma.detach().numpy()[:, 0], atol=1e-4)
        np.testing.assert_allclose(reloaded_sigma.detach().numpy(), sigma.detach().numpy(), atol=1e-6)


def test_transformation_without_side_info_refuses_none_only_when_it_needs_it():
    with pytest.raises(ValueError, match="side_info of dim 10"):
        ForwardTransformation(8, 12, d_side=10)(torch.randn(2, 8))
