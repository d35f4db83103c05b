"""Forward transformation h(old embedding, side-info) -> new embedding (FCT, Ramanujan et al., CVPR 2022, Sec. 3).

Design of the reference code (apple/ml-fct): two projection branches, old -> 2*d_old -> 2*d_new and
side -> 2*d_side -> 2*d_new, concatenated, then a mixer 4*d_new -> hidden -> hidden -> d_new with
BatchNorm + ReLU between layers. Without side-info (the paper's ablation) only the old branch feeds the mixer.

FastFill (Jaeckle et al., ICLR 2023, arXiv 2303.04766, Sec. 4) adds an uncertainty head: from the transformed
(new-dim) feature to one value sigma, the predicted log-variance of the transformation's error for that item, used
to backfill the most uncertain items first.
"""

from __future__ import annotations

import torch
from torch import nn

UNCERTAINTY_HIDDEN = 128
"""Hidden width of FastFill's uncertainty head (d_new -> 128 -> 1)."""


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with BatchNorm1d + ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(sizes) - 2:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ForwardTransformation(nn.Module):
    """h: ``old_embedding`` (B, d_old) float32 [+ ``side_info`` (B, d_side) float32] -> ``embedding`` (B, d_new).

    Args:
        d_old: old embedding size.
        d_new: new embedding size.
        d_side: side-info size; 0 builds the ablation without side-info (``forward`` then takes only
            ``old_embedding``).
        hidden_dim: width of the mixer's hidden layers (2048 in ml-fct; smaller on CPU).
        uncertainty: add FastFill's uncertainty head; ``forward`` then returns ``(embedding (B, d_new),
            sigma (B, 1))``, sigma a log-variance (any real value).
    """

    def __init__(self, d_old: int, d_new: int, d_side: int = 0, hidden_dim: int = 512,
                 uncertainty: bool = False) -> None:
        super().__init__()
        self.init_kwargs = dict(d_old=d_old, d_new=d_new, d_side=d_side, hidden_dim=hidden_dim,
                                uncertainty=uncertainty)
        self.d_old, self.d_new, self.d_side = d_old, d_new, d_side
        self.old_branch = _mlp([d_old, 2 * d_old, 2 * d_new])
        self.side_branch = _mlp([d_side, 2 * d_side, 2 * d_new]) if d_side else None
        mixer_in = 4 * d_new if d_side else 2 * d_new
        self.mixer = _mlp([mixer_in, hidden_dim, hidden_dim, d_new])
        self.input_names = ("old_embedding", "side_info") if d_side else ("old_embedding",)
        self.uncertainty_head = _mlp([d_new, UNCERTAINTY_HIDDEN, 1]) if uncertainty else None

    def forward(self, old_embedding: torch.Tensor, side_info: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.old_branch(old_embedding)
        if self.side_branch is not None:
            if side_info is None:
                raise ValueError(f"this transformation needs side_info of dim {self.d_side}, got None")
            features = torch.cat([features, self.side_branch(side_info)], dim=1)
        embedding = self.mixer(features)
        if self.uncertainty_head is None:
            return embedding
        return embedding, self.uncertainty_head(embedding)
