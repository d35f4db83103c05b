"""Embedding backbones: images (B, C, H, W) float32 in [0, 1] -> embeddings (B, d) float32.

Three architectures, picked by name through :data:`ARCHITECTURES`:

- ``small_cnn``: two conv blocks, the compact old model (v1).
- ``cnn``: three wider conv blocks, the higher-capacity new model (v2).
- ``resnet``: a narrow ResNet-18-style network (He et al., CVPR 2016: BasicBlocks [2, 2, 2, 2]), a
  different architecture for v3.

The embedding is the un-normalised output of a final linear layer (FCT evaluates L2 on unnormalised
features). Pixel normalisation lives inside the module so ONNX callers only scale bytes to [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

PIXEL_MEAN, PIXEL_STD = 0.286, 0.353
"""Fashion-MNIST training-set pixel mean and standard deviation (on the [0, 1] scale)."""


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def _small_cnn(channels: int, width: int) -> tuple[nn.Module, int]:
    return nn.Sequential(_conv_block(channels, width), _conv_block(width, 2 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten()), 2 * width


def _cnn(channels: int, width: int) -> tuple[nn.Module, int]:
    return nn.Sequential(_conv_block(channels, width), _conv_block(width, 2 * width),
                         _conv_block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 4 * width


def _resnet(channels: int, width: int) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU(inplace=True)]
    c_in = width
    for stage, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [_BasicBlock(c_in, c_out, 1 if stage == 0 else 2), _BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), c_in


ARCHITECTURES: dict[str, Callable[[int, int], tuple[nn.Module, int]]] = {
    "small_cnn": _small_cnn, "cnn": _cnn, "resnet": _resnet,
}


class Backbone(nn.Module):
    """An embedding backbone: ``image`` (B, C, H, W) float32 in [0, 1] -> ``embedding`` (B, d) float32.

    Args:
        arch: a key of :data:`ARCHITECTURES`.
        embedding_dim: d, the size of the output embedding.
        width: channels of the first stage; later stages double it.
        channels: C, image channels (1 for Fashion-MNIST).

    Raises:
        KeyError: an unknown ``arch``.
    """

    def __init__(self, arch: str, embedding_dim: int, width: int = 32, channels: int = 1) -> None:
        super().__init__()
        self.init_kwargs = dict(arch=arch, embedding_dim=embedding_dim, width=width, channels=channels)
        if arch not in ARCHITECTURES:
            raise KeyError(f"unknown backbone arch {arch!r}, expected one of {sorted(ARCHITECTURES)}")
        self.features, feature_dim = ARCHITECTURES[arch](channels, width)
        self.embed = nn.Linear(feature_dim, embedding_dim)
        self.embedding_dim = embedding_dim

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features((image - PIXEL_MEAN) / PIXEL_STD))


class Classifier(nn.Module):
    """A backbone with a linear classification head, for supervised training.

    ``forward`` returns ``(embedding (B, d), logits (B, n_classes))``.
    """

    def __init__(self, backbone: Backbone, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embedding_dim, n_classes)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.backbone(image)
        return embedding, self.head(embedding)
