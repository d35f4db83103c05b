"""Losses recomputed with plain loops (pytorch-metric-learning style)."""

import math

import pytest
import torch

from fct_registry.method.losses import influence_loss, nt_xent, transformation_loss


def _nt_xent_loop(z1, z2, tau):
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    n, batch, total = len(z), len(z1), 0.0
    for i in range(n):
        positive = (i + batch) % n
        denominator = sum(math.exp(float(z[i] @ z[j]) / tau) for j in range(n) if j != i)
        total += -math.log(math.exp(float(z[i] @ z[positive]) / tau) / denominator)
    return total / n


def test_nt_xent_equals_plain_loop():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 3), torch.randn(5, 3)
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(_nt_xent_loop(z1, z2, 0.5), rel=1e-5)


def test_nt_xent_is_lower_for_matching_views():
    torch.manual_seed(0)
    z = torch.randn(8, 4)
    assert nt_xent(z, z + 0.01 * torch.randn(8, 4), 0.5) < nt_xent(z, torch.randn(8, 4), 0.5)


def test_nt_xent_rejects_bad_shapes_and_temperature():
    with pytest.raises(ValueError, match="B >= 2"):
        nt_xent(torch.randn(1, 3), torch.randn(1, 3), 0.5)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(2, 3), torch.randn(2, 3), 0.0)


def test_influence_loss_is_cross_entropy_of_the_frozen_old_head():
    head = torch.nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        head.bias.zero_()
    head.requires_grad_(False)
    embedding = torch.tensor([[2.0, 0.0]], requires_grad=True)
    logits = [2.0, 0.0, -2.0]
    expected = -math.log(math.exp(2.0) / sum(math.exp(v) for v in logits))
    loss = influence_loss(embedding, head, torch.tensor([0]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert embedding.grad is not None and head.weight.grad is None


def test_transformation_loss_is_mean_squared_error():
    assert transformation_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(2.5)
