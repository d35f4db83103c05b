"""Play a team's production system that stored its gallery before adopting fct-registry: embed the images of a
folder with the v1 ONNX model (its own preprocessing, here EfficientNet-Lite's) and write one Parquet file with
columns ``item_id`` (int64, from the file name), ``label`` (int64, from the class folder) and ``embedding``
(list<float32>). ``fct-registry sets import`` then brings it into the registry's world.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fct_registry.onnx_boundary.contract import InputContract
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.onnx_boundary.image_folder import scan_image_folder
from fct_registry.onnx_boundary.runtime import OnnxModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("images", type=Path, help="DIR/<class>/<item_id>.png")
    parser.add_argument("model", type=Path, help="the v1 .onnx file")
    parser.add_argument("out", type=Path, help="the Parquet file to write")
    parser.add_argument("--size", type=int, default=112)
    args = parser.parse_args()
    contract = InputContract(height=args.size, width=args.size, color="rgb", pixel_range=1.0, mean=(127.0,),
                             std=(128.0,))
    folder, model = scan_image_folder(args.images), OnnxModel(args.model)
    vectors = np.concatenate([embed_images(model, images, contract) for _, images in folder.iter_decoded(contract)])
    ids = np.array([int(Path(f).stem) for f in folder.files], np.int64)
    table = pa.table({"item_id": ids, "label": folder.labels,
                      "embedding": pa.array(list(vectors), type=pa.list_(pa.float32()))})
    pq.write_table(table, args.out)
    print(f"wrote {args.out}: {len(ids)} items, {vectors.shape[1]}-d")


if __name__ == "__main__":
    main()
