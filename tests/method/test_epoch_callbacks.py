"""The per-epoch callbacks of the backbone and side-info training loops report progress without changing a bit of
what is trained (the pipeline is bit-for-bit reproducible, and it now prints one line per epoch)."""

import numpy as np
import pytest
import torch
from factories import striped_split

from fct_registry.core.config import BackboneParams, SideInfoParams
from fct_registry.method.data import Split
from fct_registry.method.training import synthesise_classifier, train_backbone, train_side_info


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    first, second = a.state_dict(), b.state_dict()
    assert list(first) == list(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key  # bit-identical, not merely close


@pytest.mark.parametrize("augment", [True, False])
def test_train_backbone_with_on_epoch_gives_bit_identical_weights_and_one_call_per_epoch(augment):
    split = striped_split(48)
    params = BackboneParams(version="t", arch="small_cnn", width=4, embedding_dim=8, epochs=2, batch_size=16,
                            augment=augment)
    calls = []
    plain, plain_metrics = train_backbone(split, 4, params, seed=3)
    watched, watched_metrics = train_backbone(split, 4, params, seed=3,
                                              on_epoch=lambda epoch, values: calls.append((epoch, dict(values))))
    _same_weights(plain, watched)
    assert [epoch for epoch, _ in calls] == [0, 1]
    for _, values in calls:
        assert set(values) == {"train_loss", "train_accuracy", "seconds"}
        assert 0.0 <= values["train_accuracy"] <= 1.0 and values["seconds"] >= 0.0 and np.isfinite(values["train_loss"])
    last = calls[-1][1]
    assert last["train_loss"] == plain_metrics["train_loss"] == watched_metrics["train_loss"]
    assert last["train_accuracy"] == plain_metrics["train_accuracy"] == watched_metrics["train_accuracy"]


def test_bct_training_with_on_epoch_is_bit_identical():
    split = striped_split(48, seed=1)
    params = BackboneParams(version="t", arch="small_cnn", width=4, embedding_dim=8, epochs=1, batch_size=16)
    old, _ = train_backbone(Split(split.images, split.labels % 2, split.item_ids), 2, params, seed=0)
    head = synthesise_classifier(old, split, [0, 1], 4)
    influence = (head, np.arange(4), 1.0)
    calls = []
    plain, _ = train_backbone(split, 4, params, seed=5, influence=influence)
    watched, _ = train_backbone(split, 4, params, seed=5, influence=influence,
                                on_epoch=lambda epoch, values: calls.append(epoch))
    _same_weights(plain, watched)
    assert calls == [0]


def test_train_side_info_with_on_epoch_gives_bit_identical_weights_and_one_call_per_epoch():
    split = striped_split(32)
    params = SideInfoParams(version="s", embedding_dim=6, projection_dim=4, width=4, epochs=2, batch_size=16)
    calls = []
    plain, plain_metrics = train_side_info(split, params, seed=2)
    watched, _ = train_side_info(split, params, seed=2,
                                 on_epoch=lambda epoch, values: calls.append((epoch, dict(values))))
    _same_weights(plain, watched)
    assert [epoch for epoch, _ in calls] == [0, 1]
    assert set(calls[-1][1]) == {"train_loss", "seconds"}
    assert calls[-1][1]["train_loss"] == plain_metrics["train_loss"]
