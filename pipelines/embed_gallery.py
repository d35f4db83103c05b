"""Stage embed_gallery: the v1 gallery, the test split embedded by the old backbone plus side-info (ONNX Runtime).

The set's sources.json records the split file's sha256 and each item's row, so that `fct-registry backfill` can
re-embed its images later."""

from pathlib import Path

from fct_registry.core.config import load_params
from fct_registry.core.errors import report_errors_in_one_line
from fct_registry.method.data import load_prepared
from fct_registry.onnx_boundary.model_card import read_model_card
from fct_registry.usecases.sets import build_gallery

report_errors_in_one_line()
params = load_params()
data = Path("data/prepared")
test = load_prepared(data, "test")
old, side = read_model_card("models/old"), read_model_card("models/side_info")
gallery = build_gallery(test, Path("models/old/model.onnx"), old.ref, Path("models/side_info/model.onnx"), side.ref,
                        Path("embeddings/gallery_v1"), params.evaluation.metric, prepared_from=(data, "test"))
print(f"stored {gallery.manifest.count} items of {old.ref} with side-info {side.ref} in {gallery.path}")
