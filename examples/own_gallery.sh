#!/usr/bin/env bash
# The README's "Upgrade your own gallery" walkthrough, top to bottom, in a project where `make demo` has run
# (the registry holds the pipeline's v2, v3 and s1). Usage: bash examples/own_gallery.sh [WORK_DIR]
set -euo pipefail
W=${1:-work/own_gallery}
export PATH="$PWD/.venv/bin:$PATH"
pip install --quiet -e '.[examples]'
python examples/write_images.py "$W/images" --train 10000 --gallery 5000
python examples/export_efficientnet.py "$W/prod_v1.onnx" --size 112
fct-registry models add backbone "$W/prod_v1.onnx" --label prod-v1 --color rgb --height 112 --width 112 \
  --pixel-range 1 --mean 127 --std 128 --metric l2 --description "EfficientNet-Lite0 (ImageNet), pooled 1280-d"

# A gallery stored before the team adopted FCT: vectors only, no side-info.
python examples/write_gallery_parquet.py "$W/images/gallery" "$W/prod_v1.onnx" "$W/gallery.parquet"
fct-registry sets import "$W/gallery.parquet" --model prod-v1 --name gallery_prod
fct-registry fit --from prod-v1 --to v2 --train "$W/images/train" --val "$W/images/gallery"
fct-registry upgrade gallery_prod --to v2
fct-registry search "$W/images/gallery/7-sneaker/60009.png" --model v2 --gallery gallery_prod@v2 --k 5
fct-registry sets export gallery_prod@v2 --format parquet --out "$W/gallery_prod_v2.parquet"

# A gallery stored with side-info: the project's s1 embeds it beside prod-v1.
fct-registry sets embed "$W/images/gallery" --model prod-v1 --side-info s1 --name gallery_prod_side
fct-registry fit --from prod-v1 --to v2 --side-info s1 --train "$W/images/train" --val "$W/images/gallery"
fct-registry upgrade gallery_prod_side --dry-run
fct-registry upgrade gallery_prod_side
fct-registry search "$W/images/gallery/7-sneaker/60009.png" --gallery gallery_prod_side@v3 --k 5
