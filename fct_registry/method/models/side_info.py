"""Side-information model: a self-supervised SimCLR encoder (Chen et al., ICML 2020).

FCT (Ramanujan et al., CVPR 2022, Sec. 3) stores, beside each old embedding, a task-independent
feature learned without labels. The stored side-info is the encoder output *before* the projection head,
which keeps more information than the contrastive space (SimCLR, Sec. 4.2).
"""

from __future__ import annotations

import torch
from torch import nn

from fct_registry.method.models.backbone import Backbone


class SideInfoModel(nn.Module):
    """SimCLR encoder plus projection head.

    ``forward(image (B, C, H, W) float32 in [0, 1])`` returns the side-info (B, d_side) float32;
    :meth:`project` maps side-info to the contrastive space (B, projection_dim) used by the NT-Xent loss.

    Args:
        embedding_dim: d_side, the stored side-info size.
        projection_dim: size of the projection head output (training only, never exported).
        width: first-stage channels of the convolutional encoder.
        channels: image channels.
        arch: the encoder's architecture (``small_cnn``: 2 conv blocks; ``cnn``: 3 blocks, a richer side-info
            whose pooled feature has 4 * width channels; see ``backbone.ARCHITECTURES``).
    """

    def __init__(self, embedding_dim: int, projection_dim: int, width: int = 32, channels: int = 1,
                 arch: str = "small_cnn") -> None:
        super().__init__()
        self.init_kwargs = dict(embedding_dim=embedding_dim, projection_dim=projection_dim, width=width,
                                channels=channels, arch=arch)
        self.encoder = Backbone(arch, embedding_dim, width=width, channels=channels)
        self.projection = nn.Sequential(
            nn.ReLU(), nn.Linear(embedding_dim, embedding_dim), nn.ReLU(), nn.Linear(embedding_dim, projection_dim))
        self.embedding_dim = embedding_dim

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)

    def project(self, side_info: torch.Tensor) -> torch.Tensor:
        """Projection head g(.) of SimCLR: (B, d_side) -> (B, projection_dim)."""
        return self.projection(side_info)
