"""Stage embed_gallery: the v1 gallery, the test split embedded by the old backbone plus side-info (ONNX Runtime)."""

from pathlib import Path

from fct_registry.core.config import load_params
from fct_registry.core.errors import report_errors_in_one_line
from fct_registry.method.data import load_prepared
from fct_registry.onnx_boundary.model_card import read_model_card
from fct_registry.usecases.sets import build_gallery

report_errors_in_one_line()
params = load_params()
test = load_prepared(Path("data/prepared"), "test")
old, side = read_model_card("models/old"), read_model_card("models/side_info")
gallery = build_gallery(test, Path("models/old/model.onnx"), old.ref, Path("models/side_info/model.onnx"), side.ref,
                        Path("embeddings/gallery_v1"), params.evaluation.metric)
print(f"stored {gallery.manifest.count} items of {old.ref} with side-info {side.ref} in {gallery.path}")
