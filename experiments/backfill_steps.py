"""Set up a throw-away project from the pipeline's trained models (v1, s1, v2, h v1+s1->v2 seed 0), then time
`fct-registry backfill` (random order; h is plain FCT) in steps."""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fct_registry.method.data import load_prepared
from fct_registry.onnx_boundary.model_card import read_model_card
from fct_registry.registry.publishing import publish_model
from fct_registry.usecases.project import open_registry
from fct_registry.usecases.sets import build_gallery
from fct_registry.usecases.upgrade import run_upgrade
from fct_registry.vectors.embedding_set import EmbeddingSet

main = Path(__file__).resolve().parents[1]
proj = Path(tempfile.mkdtemp(prefix="fct-backfill-steps-")) / "proj"
shutil.rmtree(proj, ignore_errors=True)
(proj / "data").mkdir(parents=True)
shutil.copytree(main / "data/prepared", proj / "data/prepared")
shutil.copy(main / "params.yaml", proj / "params.yaml")
os.chdir(proj)
registry = open_registry(proj)
for folder in ("old", "side_info", "new", "transformations/h-v1-v2/seed0"):
    publish_model(registry, main / "models" / folder, "l2", "md5", "commit", {})
old, side = read_model_card(main / "models/old"), read_model_card(main / "models/side_info")
build_gallery(load_prepared(Path("data/prepared"), "test"), main / "models/old/model.onnx", old.ref,
              main / "models/side_info/model.onnx", side.ref, Path("embeddings/gallery_v1"), "l2",
              prepared_from=(Path("data/prepared"), "test"))
v2 = registry.get("backbone", "v2")
t = time.perf_counter()
run_upgrade(registry, EmbeddingSet.open("embeddings/gallery_v1"), v2, "embeddings/gallery_v1@v2")
print(f"upgrade: {time.perf_counter() - t:.1f} s")
for fraction in ("0.1", "0.25", "0.5", "1"):
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "fct_registry", "--root", str(proj), "backfill", "gallery_v1@v2",
                          "--to", "v2", "--fraction", fraction, "--order", "random"], capture_output=True, text=True)
    print(f"--fraction {fraction}: exit {out.returncode}, {time.perf_counter() - t:.1f} s wall")
    print(out.stdout.strip(), out.stderr.strip())
