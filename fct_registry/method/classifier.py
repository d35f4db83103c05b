"""The new backbone's linear classifier W_new, which FastFill's loss applies to the transformed feature.

FastFill (Jaeckle et al., ICLR 2023, arXiv 2303.04766, Sec. 4) trains h with the new backbone's frozen classifier
on h's output. The project's backbones are trained with a head (``Classifier.head``), kept beside the model as
``classifier.npz``; a user's backbone registered without one gets a linear classifier fitted on its embeddings of
the labelled training set (:func:`fit_linear_classifier`), which callers must say they did.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fct_registry.core.errors import DataError

CLASSIFIER_FILE = "classifier.npz"
"""The head of a trained backbone, in its model folder: arrays ``weight`` (n_classes, d) and ``bias`` (n_classes,)."""


@dataclass(frozen=True)
class LinearClassifier:
    """logits = embeddings @ weight.T + bias: weight (n_classes, d) float32, bias (n_classes,) float32."""

    weight: np.ndarray
    bias: np.ndarray

    @classmethod
    def of(cls, head: nn.Linear) -> LinearClassifier:
        """The weights of a trained ``nn.Linear(d, n_classes)`` head, copied."""
        return cls(head.weight.detach().numpy().astype(np.float32).copy(),
                   head.bias.detach().numpy().astype(np.float32).copy())

    def frozen_linear(self) -> nn.Linear:
        """An ``nn.Linear(d, n_classes)`` with these weights and no gradients (for FastFill's loss)."""
        head = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(self.weight))
            head.bias.copy_(torch.from_numpy(self.bias))
        return head.requires_grad_(False)

    def save(self, model_dir: str | os.PathLike) -> Path:
        """Write ``<model_dir>/classifier.npz``; returns its path."""
        path = Path(model_dir) / CLASSIFIER_FILE
        with open(path, "wb") as f:
            np.savez(f, weight=self.weight, bias=self.bias)
        return path

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> LinearClassifier:
        """Read ``<model_dir>/classifier.npz``.

        Raises:
            DataError: the file is missing or does not hold ``weight`` (n, d) and ``bias`` (n,).
        """
        path = Path(model_dir) / CLASSIFIER_FILE
        if not path.is_file():
            raise DataError(f"no classifier head at {path}; FastFill needs the new backbone's classifier "
                            "(retrain the backbone, or fit a linear one on its embeddings)")
        with np.load(path) as saved:
            weight, bias = saved.get("weight"), saved.get("bias")
        if weight is None or bias is None or weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise DataError(f"{path} must hold weight (n_classes, d) and bias (n_classes,)")
        return cls(weight.astype(np.float32), bias.astype(np.float32))


def fit_linear_classifier(embeddings: np.ndarray, labels: np.ndarray, seed: int = 0, epochs: int = 30,
                          batch_size: int = 1024, lr: float = 1e-2) -> tuple[LinearClassifier, float]:
    """A linear classifier fitted on frozen embeddings (a linear probe), for a backbone registered without its head.

    Adam on softmax cross-entropy, full passes over shuffled mini-batches.

    Args:
        embeddings: (N, d) float32 embeddings of the labelled training set.
        labels: (N,) int64 labels in 0..n_classes-1 (n_classes = max + 1).
        seed: seeds initialisation and batch order.
        epochs, batch_size, lr: optimiser settings.

    Returns:
        The classifier and its training accuracy (fraction).

    Raises:
        DataError: shapes disagree, fewer than 2 rows, or a negative label.
    """
    if embeddings.ndim != 2 or labels.shape != (len(embeddings),) or len(labels) < 2 or labels.min() < 0:
        raise DataError(f"a linear classifier needs embeddings (N, d) and labels (N,) >= 0 with N >= 2, got "
                        f"{embeddings.shape} and {labels.shape}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = torch.from_numpy(np.ascontiguousarray(embeddings, np.float32)), torch.from_numpy(labels.astype(np.int64))
    head = nn.Linear(x.shape[1], int(y.max()) + 1)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = F.cross_entropy(head(x[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = float((head(x).argmax(1) == y).float().mean())
    return LinearClassifier.of(head), accuracy
