"""Stage embed_gallery: the v1 gallery, the test split embedded by the old backbone plus side-info (ONNX Runtime)."""

from pathlib import Path

from fct_registry.config import load_params
from fct_registry.data import load_prepared
from fct_registry.errors import report_errors_in_one_line
from fct_registry.gallery import build_gallery
from fct_registry.model_files import read_model_card

report_errors_in_one_line()
params = load_params()
test = load_prepared(Path("data/prepared"), "test")
old, side = read_model_card("models/old"), read_model_card("models/side_info")
gallery = build_gallery(test, Path("models/old/model.onnx"), old.ref, Path("models/side_info/model.onnx"), side.ref,
                        Path("embeddings/gallery_v1"), params.evaluation.metric)
print(f"stored {gallery.manifest.count} items of {old.ref} with side-info {side.ref} in {gallery.path}")
