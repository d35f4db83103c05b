"""Training losses: NT-Xent (SimCLR), BCT's influence loss, and the forward-transformation losses (FCT's MSE and
FastFill's uncertainty-weighted loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised temperature-scaled cross-entropy (SimCLR, Chen et al., ICML 2020, Eq. 1).

    Args:
        z1: (B, p) float32 projections of the first view of each image.
        z2: (B, p) float32 projections of the second view, row i pairs with ``z1`` row i.
        temperature: tau > 0; similarities are cosine / tau.

    Returns:
        Scalar loss averaged over the 2B anchors; each anchor's positive is its other view and its
        2B - 2 negatives are all other views in the batch.

    Raises:
        ValueError: shapes differ, B < 2, or temperature <= 0.
    """
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(f"nt_xent needs two (B, p) views with B >= 2, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    batch = z1.shape[0]
    positives = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(z.device)
    return F.cross_entropy(logits, positives)


def influence_loss(new_embedding: torch.Tensor, old_classifier: torch.nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """BCT influence loss (Shen et al., CVPR 2020, Sec. 3): CE of the frozen old classifier on new embeddings.

    Args:
        new_embedding: (B, d_old) float32 embeddings of the model being trained (BCT forces d_new = d_old).
        old_classifier: the old model's frozen head, weight (n_classes, d_old); rows for classes the old model
            never saw are synthesised from old-model class means (see ``training.synthesise_classifier``).
        labels: (B,) int64 labels in 0..n_classes-1.

    Returns:
        Scalar mean cross-entropy; gradients flow into ``new_embedding`` only.
    """
    return F.cross_entropy(old_classifier(new_embedding), labels)


def transformation_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """FCT transformation loss (Ramanujan et al., CVPR 2022, Sec. 3; as ml-fct): MSE to the new embedding.

    Args:
        predicted: (B, d_new) float32, h(old embedding, side-info).
        target: (B, d_new) float32, the new model's embedding of the same images.
    """
    return F.mse_loss(predicted, target)


def fastfill_loss(predicted: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor, classifier: torch.nn.Linear,
                  labels: torch.Tensor, label_smoothing: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """FastFill's transformation loss (Jaeckle et al., ICLR 2023, arXiv 2303.04766, Sec. 4, Eq. 3-5).

    Per item i: L_i = MSE(phi_new(x_i), h(x_i)) + CE_ls(W_new h(x_i), y_i), the second term the new backbone's
    frozen classifier applied to the transformed feature (label-smoothed cross-entropy); the loss is
    mean_i [0.5 exp(-sigma_i) L_i + 0.5 sigma_i], so sigma_i learns the log of item i's expected L_i (items h maps
    badly get a large sigma and are backfilled first).

    Args:
        predicted: (B, d_new) float32, h(old embedding, side-info).
        sigma: (B, 1) float32, h's predicted log-variance.
        target: (B, d_new) float32, the new model's embedding of the same images.
        classifier: the new backbone's frozen head, weight (n_classes, d_new).
        labels: (B,) int64 class labels in 0..n_classes-1.
        label_smoothing: of the cross-entropy term, in [0, 1).

    Returns:
        The scalar loss, and the batch's plain MSE (mean over items and dims, detached) for progress output.
    """
    per_item = (predicted - target).square().mean(dim=1)
    per_item = per_item + F.cross_entropy(classifier(predicted), labels, reduction="none",
                                          label_smoothing=label_smoothing)
    sigma = sigma.squeeze(1)
    loss = (0.5 * torch.exp(-sigma) * per_item + 0.5 * sigma).mean()
    return loss, F.mse_loss(predicted.detach(), target)
