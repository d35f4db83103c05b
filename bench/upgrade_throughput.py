"""Upgrade throughput (rows/s) of forward transformations vs backfill, on one machine.

For each size (1e5 and 1e6 synthetic v1 rows: 8-d embedding + 128-d side-info) and each chain of 1, 2 and 3 hops
(v1 -> v2 -> v3 -> v4, the project's dims, hidden 512), measured on the same rows:

- ``local_e2e``: ``upgrade_set`` with the local engine (2 threads, its default), end to end: each shard read once
  while its sha256 is verified, Parquet decode, ONNX Runtime, NaN checks, Parquet encode, sha256, write + fsync;
- ``local_1thread``: the same with ``workers=1`` (no overlap of I/O and compute);
- ``chain_loop``: ``engines.chain.apply_chain`` (the engine's compute: ``OnnxModel.run`` with its input copy and
  finite checks, plus the output NaN check) over in-memory batches of 65536 rows;
- ``ort_loop``: the pure ``InferenceSession.run`` loop over the same in-memory batches;
- ``torch_eager``: the same transformations in PyTorch eager mode (``inference_mode``), same batches;
- ``ray``: ``upgrade_set(engine="ray")`` (one task per shard) on a local Ray with 2 CPUs (started beforehand; its
  start time is reported separately).

The local engine and the loops run interleaved (each repeat runs every variant once), so their ratios are taken
side by side under the same load. ``stages``: where one thread's time goes, stage by stage, for the largest size
and one hop (the local engine's steps, timed one after the other with no overlap).

Backfill (re-embedding the items' images; a rate, measured on a few hundred/thousand synthetic images):

- ``v2_cnn_onnx``: the project's v2 backbone (``cnn``, width 32, 128-d) on (1, 28, 28) uint8 images in memory,
  through ONNX Runtime with ``gallery.embed_images`` (as the pipeline embeds a gallery);
- ``resnet50_jpeg``: torchvision ResNet-50 (random weights, 2048-d pooled features) at 224x224 in torch eager,
  including Pillow JPEG decode of 500x375 RGB files, resize 256 and centre crop.

Each upgrade figure is the fastest of 3 runs (1 run at 1e6 rows). Also: the transformations' achieved FLOP/s
(2 * sum(in * out) of their Linear layers per row) against a float32 2048x2048 matrix-multiply peak measured here,
and the ratios upgrade / backfill.

Usage: ``python bench/upgrade_throughput.py [--quick] [--workdir /tmp]``
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import common
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
import torchvision
from PIL import Image

from fct_registry.engines.chain import apply_chain, check_stored_finite
from fct_registry.engines.run import upgrade_set
from fct_registry.method.models.backbone import Backbone
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.onnx_boundary.export import export_onnx
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import EmbeddingSet, table_batch
from fct_registry.vectors.set_writer import check_batch, shard_bytes

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
JPEG_SIZE = (500, 375)  # (width, height) of a typical ImageNet photo


def backfill_v2(folder: Path, n_images: int, repeats: int) -> dict:
    """Rate of embedding (n, 1, 28, 28) uint8 images with the v2 backbone through ONNX Runtime."""
    module = Backbone("cnn", 128, width=32).eval()
    report = export_onnx(module, {"image": torch.rand(2, 1, 28, 28)}, folder / "v2-cnn.onnx")
    model = OnnxModel(report.path, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, (n_images, 1, 28, 28), dtype=np.uint8)
    embed_images(model, images[:64])  # warm-up
    best, times = common.best_seconds(repeats, embed_images, model, images)
    return {"images": n_images, "rows_per_s": n_images / best, "seconds": times}


def _jpegs(n: int) -> list[bytes]:
    """n smooth random RGB photos-like images (upsampled noise), JPEG quality 90."""
    rng = np.random.default_rng(0)
    files = []
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
        out = io.BytesIO()
        small.resize(JPEG_SIZE, Image.Resampling.BICUBIC).save(out, "JPEG", quality=90)
        files.append(out.getvalue())
    return files


def _decode(data: bytes) -> np.ndarray:
    """JPEG bytes -> (3, 224, 224) float32, ImageNet-normalised (resize shorter side to 256, centre crop)."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        scale = 256 / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
        left, top = (image.width - 224) // 2, (image.height - 224) // 2
        pixels = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    return ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def backfill_resnet50(n_images: int, batch: int) -> dict:
    """Rate of JPEG decode + ResNet-50 (random weights) at 224x224 in torch eager, in batches of ``batch``."""
    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Identity()  # the 2048-d pooled feature is the embedding
    model.eval()
    files = _jpegs(n_images)
    decode_s = model_s = 0.0
    with torch.inference_mode():
        model(torch.from_numpy(np.stack([_decode(files[0])] * 2)))  # warm-up
        for start in range(0, n_images, batch):
            t0 = time.perf_counter()
            pixels = torch.from_numpy(np.stack([_decode(f) for f in files[start:start + batch]]))
            t1 = time.perf_counter()
            model(pixels)
            decode_s, model_s = decode_s + t1 - t0, model_s + time.perf_counter() - t1
    return {"images": n_images, "batch": batch, "rows_per_s": n_images / (decode_s + model_s),
            "decode_s": decode_s, "model_s": model_s}


def ort_loop(sessions, batches) -> None:
    """Pure ONNX Runtime: every batch through every step's (already created) ``InferenceSession.run``."""
    for old, side in batches:
        x = old
        for session in sessions:
            x = session.run(None, {"old_embedding": x, "side_info": side})[0]


def torch_loop(modules, batches) -> None:
    """The same transformations in torch eager mode."""
    with torch.inference_mode():
        for old, side in batches:
            x, side_t = torch.from_numpy(old), torch.from_numpy(side)
            for module in modules:
                x = module(x, side_t)


def chain_loop(models, steps, batches) -> None:
    """The engine's compute alone: ``apply_chain`` (with NaN checks) over in-memory batches."""
    for old, side in batches:
        apply_chain(models, steps, old, side, ids=np.arange(len(old)))


def interleaved(repeats: int, variants: dict[str, Callable[[], object]]) -> dict[str, dict]:
    """Run every variant once per repeat, in turn; per variant its fastest and all wall times (s)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(common.best_seconds(1, fn)[0])
    return {name: {"best": min(t), "seconds": t} for name, t in times.items()}


def stages(source: Path, steps, models) -> dict[str, float]:
    """Seconds per stage of the local engine's work on ``source`` through ``steps``, one stage after the other in
    one thread (as ``engines.shards.upgrade_shard`` does them per shard, without the threads' overlap)."""
    embedding_set, spent = EmbeddingSet.open(source, verify=False), {}
    out = source.parent / f"{source.name}-stages"
    out.mkdir()

    def timed(name: str, fn: Callable, *args):
        started = time.perf_counter()
        value = fn(*args)
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - started
        return value

    for path, shard in zip(embedding_set.shard_paths, embedding_set.manifest.shards, strict=True):
        data = timed("read file", Path(path).read_bytes)
        timed("sha256 of the source shard", lambda d=data: hashlib.sha256(d).hexdigest())
        table = timed("Parquet decode", lambda d=data: pq.read_table(pa.BufferReader(d)))
        batch = timed("Arrow -> numpy (views)", table_batch, table, embedding_set.manifest, False)
        timed("NaN check of the input", check_stored_finite, batch, source)
        upgraded, _ = timed("chain (OnnxModel + NaN check)", apply_chain, models, steps, batch.embeddings,
                            batch.side_info, batch.ids)
        result = EmbeddingBatch(batch.ids, batch.labels, upgraded, batch.side_info, model=steps[-1].target)
        timed("writer checks", check_batch, result, result, False)
        data = timed("Parquet encode", shard_bytes, result)
        timed("sha256 of the output shard", lambda d=data: hashlib.sha256(d).hexdigest())
        timed("write + fsync", lambda d=data, f=shard.file: common.fsync_write(out / f, d))
    shutil.rmtree(out)
    return spent


def measure_size(work: Path, rows: int, steps, modules, repeats: int, with_stages: bool) -> list[dict]:
    """All upgrade measurements at one size, for chains of 1..len(steps) hops."""
    source = common.synth_set(work / f"v1-{rows}", rows, common.CHAIN_DIMS[0], common.synthetic_ref("v1")).path
    stored = EmbeddingSet.open(source).read()
    batches = [(stored.embeddings[i:i + common.SHARD_ROWS], stored.side_info[i:i + common.SHARD_ROWS])
               for i in range(0, rows, common.SHARD_ROWS)]
    sessions = [ort.InferenceSession(str(s.onnx_path), providers=["CPUExecutionProvider"]) for s in steps]
    models = [OnnxModel(s.onnx_path) for s in steps]
    out = []
    for hops in range(1, len(steps) + 1):
        chain, dest = steps[:hops], work / f"up-{rows}-{hops}"
        rates = interleaved(repeats, {
            "local_e2e": lambda c=chain, d=dest: upgrade_set(source, c, d, overwrite=True),
            "local_1thread": lambda c=chain, d=dest: upgrade_set(source, c, d, overwrite=True, workers=1),
            "chain_loop": lambda h=hops: chain_loop(models[:h], steps[:h], batches),
            "ort_loop": lambda h=hops: ort_loop(sessions[:h], batches),
            "torch_eager": lambda h=hops: torch_loop(modules[:h], batches)})
        out.append({"rows": rows, "hops": hops, "flops_per_row": sum(common.linear_flops(m) for m in modules[:hops]),
                    **{k: {"rows_per_s": rows / r["best"], "seconds": r["seconds"]} for k, r in rates.items()}})
    if with_stages:
        out[0]["stages"] = stages(source, steps[:1], models[:1])
    started = time.perf_counter()
    # upgrade_set reuses this Ray (the local one it would start itself) instead of starting and stopping its own
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    ray_init_s = time.perf_counter() - started
    try:
        for entry in out:
            chain, dest = steps[:entry["hops"]], work / f"up-{rows}-{entry['hops']}"
            best, times = common.best_seconds(repeats, upgrade_set, source, chain, dest, engine="ray", overwrite=True)
            entry["ray"] = {"rows_per_s": rows / best, "seconds": times, "ray_init_s": ray_init_s}
    finally:
        ray.shutdown()
    shutil.rmtree(source)
    for entry in out:
        shutil.rmtree(work / f"up-{rows}-{entry['hops']}", ignore_errors=True)
    return out


def main() -> None:
    parser = common.arguments(__doc__, "small sizes, one repeat: a smoke test (seconds)")
    args = parser.parse_args()
    host = common.machine()
    sizes = [20_000] if args.quick else [100_000, 1_000_000]
    params = {"sizes": sizes, "hops": [1, 2, 3], "batch_rows": common.SHARD_ROWS,
              "repeats": {rows: 1 if args.quick else 2 if rows >= 1_000_000 else 3 for rows in sizes},
              "v2_images": 512 if args.quick else 8192, "resnet50_images": 16 if args.quick else 256,
              "resnet50_batch": 8 if args.quick else 32, "gemm_n": 1024 if args.quick else 2048}
    with tempfile.TemporaryDirectory(prefix="fct-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        steps, modules = common.export_chain(work / "models", max(params["hops"]))
        peak = common.gemm_peak(params["gemm_n"])
        backfill = {"v2_cnn_onnx": backfill_v2(work, params["v2_images"], params["repeats"][sizes[0]]),
                    "resnet50_jpeg": backfill_resnet50(params["resnet50_images"], params["resnet50_batch"])}
        upgrades = [e for rows in sizes
                    for e in measure_size(work, rows, steps, modules, params["repeats"][rows], rows == max(sizes))]
    rows = []
    for e in upgrades:
        local = e["local_e2e"]["rows_per_s"]
        rows.append({
            "rows": e["rows"], "hops": e["hops"], "local_e2e rows/s": local,
            "local_1thread rows/s": e["local_1thread"]["rows_per_s"],
            "chain_loop rows/s": e["chain_loop"]["rows_per_s"],
            "ort_loop rows/s": e["ort_loop"]["rows_per_s"],
            "local_e2e / ort_loop": local / e["ort_loop"]["rows_per_s"],
            "local_e2e / chain_loop": local / e["chain_loop"]["rows_per_s"],
            "torch_eager rows/s": e["torch_eager"]["rows_per_s"],
            "ray rows/s": e["ray"]["rows_per_s"],
            "local / backfill v2": local / backfill["v2_cnn_onnx"]["rows_per_s"],
            "local / backfill ResNet-50": local / backfill["resnet50_jpeg"]["rows_per_s"],
            "ort_loop GFLOP/s": e["flops_per_row"] * e["ort_loop"]["rows_per_s"] / 1e9,
            "ort_loop % of GEMM peak": 100 * e["flops_per_row"] * e["ort_loop"]["rows_per_s"] / peak["peak_flops"],
            "torch GFLOP/s": e["flops_per_row"] * e["torch_eager"]["rows_per_s"] / 1e9})
    largest = max(sizes)
    one_hop = next(r for r in rows if r["rows"] == largest and r["hops"] == 1)
    headline = {f"upgrade rows/s, local engine, 1 hop, {largest:,} rows": round(one_hop["local_e2e rows/s"]),
                f"ORT loop rows/s (in memory), 1 hop, {largest:,} rows": round(one_hop["ort_loop rows/s"]),
                "local engine end to end / ORT loop (1 hop, side by side)": round(one_hop["local_e2e / ort_loop"], 2),
                "local engine, 2 threads / 1 thread (1 hop)": round(one_hop["local_e2e rows/s"]
                                                                     / one_hop["local_1thread rows/s"], 2),
                "backfill rows/s, v2 cnn (ONNX Runtime)": round(backfill["v2_cnn_onnx"]["rows_per_s"], 1),
                "backfill rows/s, ResNet-50 224px + JPEG decode": round(backfill["resnet50_jpeg"]["rows_per_s"], 2),
                "upgrade / backfill ResNet-50 (1 hop)": round(one_hop["local / backfill ResNet-50"]),
                "upgrade / backfill v2 cnn (1 hop)": round(one_hop["local / backfill v2"], 1),
                "ort_loop % of GEMM peak (1 hop)": round(one_hop["ort_loop % of GEMM peak"], 1),
                "GEMM peak GFLOP/s": round(peak["peak_flops"] / 1e9, 1)}
    backfill_rows = [{"backfill": k, **{f: v for f, v in b.items() if f != "seconds"}} for k, b in backfill.items()]
    spent = next(e["stages"] for e in upgrades if "stages" in e)
    stage_rows = [{"stage": name, "seconds": t, "% of the thread's time": 100 * t / sum(spent.values()),
                   "µs per row": 1e6 * t / largest} for name, t in spent.items()]
    common.write_results(
        "upgrade_throughput", args.quick, "Upgrade throughput vs backfill", host, params,
        {"gemm": peak, "backfill": backfill, "upgrades": upgrades}, headline,
        [("Upgrade (rows/s, best of repeats) and ratios to backfill", rows),
         (f"Where one thread's time goes (local engine's stages in sequence, 1 hop, {largest:,} rows)", stage_rows),
         ("Backfill", backfill_rows),
         ("Matrix-multiply peak (float32, GFLOP/s)",
          [{"n": peak["n"], "torch": peak["torch_flops"] / 1e9, "numpy": peak["numpy_flops"] / 1e9}])],
        notes=["Vectors are synthetic (standard normal); transformations have random seeded weights: the cost "
               "does not depend on the values.",
               "local_e2e, local_1thread and ray include reading (with the source sha256 check) and writing "
               "Parquet (with sha256 and fsync); chain_loop, ort_loop and torch_eager run on in-memory batches of "
               "65536 rows. The local variants and the loops are interleaved repeat by repeat (side by side).",
               "ray: one task per output shard (each writes its shard) on a local Ray (num_cpus=2, 1 CPU per "
               "task); Ray's start-up time is excluded from rows/s and given as ray_init_s in the JSON.",
               "ONNX Runtime uses its default thread pool (one thread per core) in every variant; the local "
               "engine's 2 threads share one session.",
               "FLOPs per row count the Linear layers only: 2 * sum(in * out) over every hop.",
               "Backfill v2 cnn: uint8 images already in memory (no decode), like the pipeline's gallery stage. "
               "Backfill ResNet-50: decode and model times are summed (one process, no overlap).",
               "Other jobs running on the machine skew every figure; see load_avg_1m_at_start."])


if __name__ == "__main__":
    main()
