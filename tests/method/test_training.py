"""Training loops on tiny synthetic data with known answers."""

import numpy as np
import pytest
import torch
from factories import striped_split

from fct_registry.core.config import BackboneParams, SideInfoParams, TransformationParams
from fct_registry.core.errors import DataError
from fct_registry.method.classifier import LinearClassifier, fit_linear_classifier
from fct_registry.method.data import Split
from fct_registry.method.models.backbone import Backbone, Classifier
from fct_registry.method.training import (
    augment,
    cached_features,
    embed,
    synthesise_classifier,
    train_backbone,
    train_side_info,
    train_transformation,
)


@torch.no_grad()
def apply_transformation(h, old, side_info):
    """h in eval mode over whole arrays: old (N, d_old) [+ side-info (N, d_side)] float32 -> (N, d_new)."""
    args = (torch.from_numpy(old),) + ((torch.from_numpy(side_info),) if side_info is not None else ())
    return h.eval()(*args).numpy()


def test_transformation_recovers_a_linear_map_with_side_info():
    rng = np.random.default_rng(0)
    old = rng.standard_normal((2048, 4)).astype(np.float32)
    side = rng.standard_normal((2048, 3)).astype(np.float32)
    a, b = rng.standard_normal((4, 6)), rng.standard_normal((3, 6))
    new = (old @ a + side @ b).astype(np.float32)
    params = TransformationParams(hidden_dim=64, epochs=40, batch_size=64, lr=3e-3, seeds=[0])
    h, metrics = train_transformation(cached_features(old, side, new), params, seed=0)
    test_old = rng.standard_normal((256, 4)).astype(np.float32)
    test_side = rng.standard_normal((256, 3)).astype(np.float32)
    predicted = apply_transformation(h, test_old, test_side)
    target = test_old @ a + test_side @ b
    relative = np.mean((predicted - target) ** 2) / np.mean(target ** 2)
    assert relative < 0.02, relative
    assert metrics["train_mse"] < 0.05 * np.mean(new ** 2)


def test_transformation_without_side_info_cannot_recover_what_only_side_info_holds():
    rng = np.random.default_rng(1)
    old = rng.standard_normal((1024, 4)).astype(np.float32)
    side = rng.standard_normal((1024, 3)).astype(np.float32)
    new = np.concatenate([old, side], axis=1).astype(np.float32)
    params = TransformationParams(hidden_dim=64, epochs=15, batch_size=64, lr=3e-3, seeds=[0])
    with_side, _ = train_transformation(cached_features(old, side, new), params, seed=0)
    without, _ = train_transformation(cached_features(old, None, new), params, seed=0)
    err_with = np.mean((apply_transformation(with_side, old, side) - new)[:, 4:] ** 2)
    err_without = np.mean((apply_transformation(without, old, None) - new)[:, 4:] ** 2)
    assert err_with < 0.2 * err_without and err_without > 0.5


def test_backbone_learns_separable_classes_and_is_reproducible():
    split = striped_split(512)
    params = BackboneParams(version="t", arch="small_cnn", width=4, embedding_dim=8, epochs=4, batch_size=64, lr=5e-3,
                            augment=False)
    model, metrics = train_backbone(split, 4, params, seed=3)
    again, _ = train_backbone(split, 4, params, seed=3)
    logits = model(torch.from_numpy(split.images).float() / 255)[1]
    assert (logits.argmax(1).numpy() == split.labels).mean() > 0.9
    assert metrics["train_accuracy"] > 0.5
    np.testing.assert_array_equal(embed(model.backbone, split.images[:9]), embed(again.backbone, split.images[:9]))


def test_embed_keeps_a_last_batch_of_one():
    model = Backbone("small_cnn", 5, width=4).eval()
    images = np.zeros((9, 1, 28, 28), np.uint8)
    assert embed(model, images, batch_size=4).shape == (9, 5)


def test_side_info_training_runs_without_labels():
    split = striped_split(128)
    unlabeled = Split(split.images, np.full(128, -1, np.int64), split.item_ids)
    model, metrics = train_side_info(unlabeled, SideInfoParams(width=4, embedding_dim=8, projection_dim=4, epochs=1,
                                                               batch_size=32), seed=0)
    assert np.isfinite(metrics["train_loss"]) and embed(model, split.images).shape == (128, 8)


def test_synthesised_classifier_keeps_old_rows_and_adds_class_means():
    split = striped_split(256)
    old = Classifier(Backbone("small_cnn", 6, width=4), 2).eval()
    head = synthesise_classifier(old, split, old_classes=[0, 1], n_classes=4)
    assert head.weight.shape == (4, 6) and not head.weight.requires_grad
    torch.testing.assert_close(head.weight[:2], old.head.weight)
    mean = torch.from_numpy(embed(old.backbone, split.images[split.labels == 3])).mean(0)
    cosine = torch.nn.functional.cosine_similarity(head.weight[3], mean, dim=0)
    assert cosine.item() == pytest.approx(1.0, abs=1e-5)
    assert head.weight[3].norm().item() == pytest.approx(old.head.weight.norm(dim=1).mean().item(), rel=1e-5)


def test_augment_is_seeded_in_range_and_per_image():
    images = torch.rand(6, 1, 28, 28)
    a = augment(images, torch.Generator().manual_seed(0))
    b = augment(images, torch.Generator().manual_seed(0))
    assert a.shape == images.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    same = augment(images[:1].repeat(6, 1, 1, 1), torch.Generator().manual_seed(1))
    assert not torch.allclose(same[0], same[1])


def test_fastfill_sigma_ranks_the_items_h_cannot_predict_first():
    """FastFill (Jaeckle et al., ICLR 2023): half the items' new embeddings are a function of the old one, half are
    noise h cannot predict; the learned sigma must put the unpredictable half first."""
    rng = np.random.default_rng(3)
    n, d_new = 2048, 6
    old = rng.standard_normal((n, 4)).astype(np.float32)
    noisy = np.arange(n) % 2 == 1
    old[:, 0] = np.where(noisy, 2.0, -2.0) + 0.1 * old[:, 0]  # h can tell the two halves apart
    new = (old @ rng.standard_normal((4, d_new))).astype(np.float32)
    new[noisy] += 3 * rng.standard_normal((noisy.sum(), d_new)).astype(np.float32)
    labels = (new[:, 0] > 0).astype(np.int64)
    classifier = LinearClassifier(np.eye(2, d_new, dtype=np.float32) * [[-1], [1]], np.zeros(2, np.float32))
    params = TransformationParams(hidden_dim=64, epochs=15, batch_size=128, lr=3e-3, seeds=[0], loss="fastfill")
    h, metrics = train_transformation(cached_features(old, None, new), params, seed=0, fastfill=(labels, classifier))
    with torch.no_grad():
        _, sigma = h.eval()(torch.from_numpy(old))
    sigma = sigma.numpy()[:, 0]
    first_half = np.argsort(-sigma, kind="stable")[: n // 2]
    assert noisy[first_half].mean() > 0.95, noisy[first_half].mean()
    assert set(metrics) == {"train_mse", "train_loss", "seconds"}
    with pytest.raises(ValueError, match="'fastfill' needs labels and a classifier"):
        train_transformation(cached_features(old, None, new), params, seed=0)


def test_linear_classifier_fit_separates_classes_and_round_trips(tmp_path):
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(3), 200)
    embeddings = (np.eye(3, 5)[labels] * 4 + rng.standard_normal((600, 5))).astype(np.float32)
    classifier, accuracy = fit_linear_classifier(embeddings, labels, epochs=20, batch_size=64)
    assert accuracy > 0.95
    assert classifier.weight.shape == (3, 5) and classifier.bias.shape == (3,)
    logits = embeddings @ classifier.weight.T + classifier.bias
    assert (logits.argmax(1) == labels).mean() == pytest.approx(accuracy, abs=1e-6)
    classifier.save(tmp_path)
    loaded = LinearClassifier.load(tmp_path)
    np.testing.assert_array_equal(loaded.weight, classifier.weight)
    np.testing.assert_array_equal(loaded.frozen_linear()(torch.from_numpy(embeddings)).detach().numpy().argmax(1),
                                  logits.argmax(1))
    with pytest.raises(DataError, match="no classifier head at"):
        LinearClassifier.load(tmp_path / "missing")
