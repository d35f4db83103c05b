"""Training loops: old/new/BCT backbones, the SimCLR side-info model and the forward transformation.

Functions take arrays and parameter objects and return trained modules (in eval mode) with metrics;
they never read paths or talk to the registry.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from fct_registry.core.config import BackboneParams, SideInfoParams, TransformationParams
from fct_registry.method.classifier import LinearClassifier
from fct_registry.method.data import Split
from fct_registry.method.losses import fastfill_loss, influence_loss, nt_xent, transformation_loss
from fct_registry.method.models.backbone import Backbone, Classifier
from fct_registry.method.models.side_info import SideInfoModel
from fct_registry.method.models.transformation import ForwardTransformation

FeatureEpoch = Callable[[int], tuple[np.ndarray, np.ndarray | None, np.ndarray]]
"""Given an epoch index, returns (old (N, d_old), side-info (N, d_side) or None, new (N, d_new)) float32."""

EpochCallback = Callable[[int, dict[str, float]], None]
"""Called after each epoch with the 0-based epoch index and that epoch's metrics (for progress output): the mean
loss over the epoch's rows (``train_loss``; ``train_mse`` for h), ``train_accuracy`` for a backbone, ``seconds``
since training started. It only reads values already computed: training is numerically identical without it."""


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and numpy; returns a torch generator for data order and augmentations."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


def _batches(tensors: tuple[torch.Tensor, ...], batch_size: int, shuffle: bool, generator: torch.Generator | None
             ) -> Iterator[list[torch.Tensor]]:
    """Mini-batches of whole tensors with batched indexing (no per-item collation).

    Training drops a last batch smaller than 2 rows, which BatchNorm cannot normalise.
    """
    dataset = TensorDataset(*tensors)
    sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    drop_last = shuffle and len(dataset) % batch_size == 1
    loader = DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last), batch_size=None)
    yield from loader


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, C, H, W) -> float32 in [0, 1]."""
    return images.to(torch.float32) / 255.0


def augment(images: torch.Tensor, generator: torch.Generator, min_scale: float = 0.5) -> torch.Tensor:
    """Per-image random resized crop, horizontal flip and brightness/contrast jitter, batched.

    The crop/flip is one affine warp per image (``F.affine_grid`` + ``F.grid_sample``), the usual
    SimCLR augmentation family (Chen et al., ICML 2020, Sec. 3) without colour, which grayscale lacks.

    Args:
        images: (B, C, H, W) float32 in [0, 1].
        generator: source of randomness (reproducible per seed).
        min_scale: smallest crop side as a fraction of the image side.

    Returns:
        (B, C, H, W) float32 in [0, 1].
    """
    batch = images.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    scale = min_scale + (1 - min_scale) * rand(batch)
    flip = torch.where(rand(batch) < 0.5, -1.0, 1.0)
    shift = (1 - scale) * (2 * rand(2, batch) - 1)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, 0, 2], theta[:, 1, 2] = shift[0], shift[1]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)
    contrast = (0.6 + 0.8 * rand(batch)).view(-1, 1, 1, 1)
    brightness = (0.4 * rand(batch) - 0.2).view(-1, 1, 1, 1)
    mean = warped.mean(dim=(1, 2, 3), keepdim=True)
    return ((warped - mean) * contrast + mean + brightness).clamp(0, 1)


def _cosine_adam(module: nn.Module, lr: float, weight_decay: float, steps: int
                 ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))


@torch.no_grad()
def embed(module: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Embed uint8 images (N, C, H, W) with a module in eval mode -> (N, d) float32 numpy array."""
    module.eval()
    tensor = torch.as_tensor(images)
    outputs = [module(to_unit(chunk)) for (chunk,) in _batches((tensor,), batch_size, False, None)]
    return torch.cat(outputs).numpy().astype(np.float32, copy=False)


def synthesise_classifier(old: Classifier, split: Split, old_classes: list[int], n_classes: int) -> nn.Linear:
    """The old classifier extended to every new class, for BCT (Shen et al., CVPR 2020, Sec. 3.3).

    Rows of ``old_classes`` are the old head's trained rows. Every other class gets the old model's mean
    embedding of that class on ``split``, rescaled to the mean norm of the trained rows, and the mean
    trained bias.

    Args:
        old: the trained old model; its head has at least ``max(old_classes) + 1`` outputs.
        split: the new model's training data, labels 0..n_classes-1.
        old_classes: classes the old model was trained on.
        n_classes: rows of the returned classifier.

    Returns:
        A frozen ``nn.Linear(d_old, n_classes)``.
    """
    weight, bias = old.head.weight.detach(), old.head.bias.detach()
    mean_norm = weight[old_classes].norm(dim=1).mean()
    embeddings = torch.from_numpy(embed(old.backbone, split.images))
    head = nn.Linear(weight.shape[1], n_classes)
    with torch.no_grad():
        for c in range(n_classes):
            if c in old_classes:
                head.weight[c], head.bias[c] = weight[c], bias[c]
            else:
                centre = embeddings[torch.from_numpy(split.labels == c)].mean(dim=0)
                head.weight[c] = centre / centre.norm().clamp_min(1e-12) * mean_norm
                head.bias[c] = bias[old_classes].mean()
    return head.requires_grad_(False)


def train_backbone(split: Split, n_classes: int, params: BackboneParams, seed: int,
                   influence: tuple[nn.Linear, np.ndarray, float] | None = None,
                   on_epoch: EpochCallback | None = None) -> tuple[Classifier, dict]:
    """Train a backbone with label-smoothed cross-entropy, optionally plus BCT's influence loss.

    Args:
        split: training images (N, C, H, W) uint8 and labels (N,) int64 in 0..n_classes-1.
        n_classes: outputs of the classification head.
        params: architecture, embedding dim and optimiser settings.
        seed: seeds initialisation, data order and augmentations.
        influence: for BCT, ``(old_classifier, label_map, weight)``: the frozen old head (n_old, d),
            a (n_classes,) int64 map from a training label to the old head's label, and lambda.
        on_epoch: optional callback given the 0-based epoch index and ``{"train_loss", "train_accuracy",
            "seconds"}`` of that epoch (see :data:`EpochCallback`).

    Returns:
        The backbone with its classification head (``.backbone`` is the embedding model), in eval mode,
        and metrics: ``train_loss``, ``train_accuracy`` (last epoch, fraction), ``seconds``.
    """
    generator = seed_everything(seed)
    model = Classifier(Backbone(params.arch, params.embedding_dim, params.width, split.images.shape[1]), n_classes)
    images, labels = torch.from_numpy(split.images), torch.from_numpy(split.labels)
    steps = params.epochs * math.ceil(len(split) / params.batch_size)
    optimizer, scheduler = _cosine_adam(model, params.lr, params.weight_decay, steps)
    label_map = torch.from_numpy(influence[1]) if influence else None
    start = time.perf_counter()
    for epoch in range(params.epochs):
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for batch_images, batch_labels in _batches((images, labels), params.batch_size, True, generator):
            x = to_unit(batch_images)
            if params.augment:
                x = augment(x, generator, min_scale=0.8)
            embedding, logits = model(x)
            loss = F.cross_entropy(logits, batch_labels, label_smoothing=params.label_smoothing)
            if influence is not None:
                loss = loss + influence[2] * influence_loss(embedding, influence[0], label_map[batch_labels])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(batch_labels)
            correct += int((logits.argmax(1) == batch_labels).sum())
            seen += len(batch_labels)
        if on_epoch is not None:
            on_epoch(epoch, {"train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                             "seconds": time.perf_counter() - start})
    seconds = time.perf_counter() - start
    return model.eval(), {"train_loss": loss_sum / seen, "train_accuracy": correct / seen, "seconds": seconds}


def train_side_info(split: Split, params: SideInfoParams, seed: int, on_epoch: EpochCallback | None = None
                    ) -> tuple[SideInfoModel, dict]:
    """Train the side-information model with SimCLR's NT-Xent loss on two augmented views; labels unused.

    Args:
        split: training images (N, C, H, W) uint8 (labels are ignored).
        params: encoder architecture and width, side-info dim d_side, projection dim, temperature, optimiser
            settings.
        seed: seeds initialisation, data order and augmentations.
        on_epoch: optional callback given the 0-based epoch index and ``{"train_loss", "seconds"}`` of that epoch
            (see :data:`EpochCallback`).

    Returns:
        The model in eval mode (``forward`` gives side-info (B, d_side)) and metrics ``train_loss``, ``seconds``.
    """
    generator = seed_everything(seed)
    model = SideInfoModel(params.embedding_dim, params.projection_dim, params.width, split.images.shape[1],
                          params.arch)
    images = torch.from_numpy(split.images)
    steps = params.epochs * math.ceil(len(split) / params.batch_size)
    optimizer, scheduler = _cosine_adam(model, params.lr, 1e-6, steps)
    start = time.perf_counter()
    for epoch in range(params.epochs):
        model.train()
        loss_sum, seen = 0.0, 0
        for (batch_images,) in _batches((images,), params.batch_size, True, generator):
            x = to_unit(batch_images)
            z1 = model.project(model(augment(x, generator)))
            z2 = model.project(model(augment(x, generator)))
            loss = nt_xent(z1, z2, params.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(x)
            seen += len(x)
        if on_epoch is not None:
            on_epoch(epoch, {"train_loss": loss_sum / seen, "seconds": time.perf_counter() - start})
    return model.eval(), {"train_loss": loss_sum / seen, "seconds": time.perf_counter() - start}


def cached_features(old: np.ndarray, side_info: np.ndarray | None, new: np.ndarray) -> FeatureEpoch:
    """The same features every epoch: h is trained on features computed once (no augmentation)."""
    return lambda epoch: (old, side_info, new)


def augmented_features(images: np.ndarray, old: nn.Module, side_info: nn.Module | None, new: nn.Module,
                       seed: int) -> FeatureEpoch:
    """Features of freshly augmented images every epoch (three frozen forward passes per epoch)."""
    def features(epoch: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        views = torch.cat([(augment(to_unit(chunk), generator, 0.8) * 255).round().to(torch.uint8)
                           for (chunk,) in _batches((torch.from_numpy(images),), 4096, False, None)])
        side = embed(side_info, views) if side_info is not None else None
        return embed(old, views), side, embed(new, views)
    return features


def train_transformation(features: FeatureEpoch, params: TransformationParams, seed: int,
                         on_epoch: EpochCallback | None = None,
                         fastfill: tuple[np.ndarray, LinearClassifier] | None = None
                         ) -> tuple[ForwardTransformation, dict]:
    """Train the forward transformation h (FCT, Ramanujan et al., CVPR 2022, Sec. 3), with FCT's MSE to the new
    embedding (``params.loss == "mse"``) or FastFill's loss (``"fastfill"``: Jaeckle et al., ICLR 2023, Sec. 4;
    see :func:`~fct_registry.method.losses.fastfill_loss`), which also trains h's uncertainty head.

    Adam with a cosine schedule, as ml-fct. ``features(0)`` fixes the dims: d_old, d_side (0 when side-info
    is None: the paper's ablation without side-info) and d_new.

    Args:
        features: per-epoch source of (old (N, d_old), side-info (N, d_side) or None, new (N, d_new)) float32.
        params: hidden width, epochs, batch size, learning rate, loss and label smoothing.
        seed: seeds initialisation and data order.
        on_epoch: optional callback given the 0-based epoch index and ``{"train_mse": mean over the epoch's
            rows, "seconds": since training started}`` after each epoch (for progress output); it reads values
            already computed, so training is numerically identical with or without it.
        fastfill: for the FastFill loss, the rows' labels (N,) int64 and the new backbone's classifier
            (n_classes, d_new).

    Returns:
        h in eval mode and metrics ``train_mse`` (last epoch, mean over rows), ``train_loss`` and ``seconds``.

    Raises:
        ValueError: the FastFill loss without ``fastfill``, or ``fastfill`` with the MSE loss.
    """
    if (params.loss == "fastfill") != (fastfill is not None):
        raise ValueError(f"transformation loss {params.loss!r} {'needs' if fastfill is None else 'takes no'} "
                         "labels and a classifier")
    generator = seed_everything(seed)
    old, side, new = features(0)
    model = ForwardTransformation(old.shape[1], new.shape[1], 0 if side is None else side.shape[1], params.hidden_dim,
                                  uncertainty=fastfill is not None)
    classifier = fastfill[1].frozen_linear() if fastfill is not None else None
    steps = params.epochs * math.ceil(old.shape[0] / params.batch_size)
    optimizer, scheduler = _cosine_adam(model, params.lr, params.weight_decay, steps)
    start = time.perf_counter()
    for epoch in range(params.epochs):
        old, side, new = features(epoch)
        model.train()
        labels = (fastfill[0],) if fastfill is not None else ()
        tensors = tuple(torch.from_numpy(a) for a in (old, new, *labels) + ((side,) if side is not None else ()))
        loss_sum, mse_sum, seen = 0.0, 0.0, 0
        for batch in _batches(tensors, params.batch_size, True, generator):
            side_batch = batch[-1] if side is not None else None
            if classifier is None:
                loss = mse = transformation_loss(model(batch[0], side_batch), batch[1])
            else:
                predicted, sigma = model(batch[0], side_batch)
                loss, mse = fastfill_loss(predicted, sigma, batch[1], classifier, batch[2], params.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(batch[0])
            mse_sum += mse.item() * len(batch[0])
            seen += len(batch[0])
        if on_epoch is not None:
            on_epoch(epoch, {"train_mse": mse_sum / seen, "seconds": time.perf_counter() - start})
    return model.eval(), {"train_mse": mse_sum / seen, "train_loss": loss_sum / seen,
                          "seconds": time.perf_counter() - start}
