"""Latency (p50/p99) and throughput of ``POST /search`` over a 1e6-item gallery, on loopback.

Set-up (in a temp project folder): the project's v2 backbone (``cnn``, width 32, 128-d, random seeded weights) is
exported and registered in a real MLflow SQLite registry as ``champion``; a gallery set of 1e6 synthetic 128-d
vectors made "by" it is written; the real service (``fct_registry.serving.server.serve``: FastAPI + uvicorn,
ONNX Runtime backbone, exact faiss L2 index) runs in a subprocess on 127.0.0.1.

Load: ``--clients`` threads, each with its own ``httpx.Client``, send requests back to back until the request
budget or the time cap is spent; first embedding queries (JSON, 128 floats, k=10), then image queries (28x28
grayscale PNG upload, k=10). A few warm-up requests per kind are not counted.

Usage: ``python bench/serving_latency.py [--quick] [--workdir /tmp]``
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import common
import httpx
import numpy as np
from PIL import Image

from fct_registry.registry.model_registry import ModelRegistry

K = 10
EMBEDDING_DIM = 128
IMAGE_SHAPE = (1, 28, 28)
N_QUERIES = 64
"""Distinct queries per kind, cycled through."""


def build_project(root: Path, gallery_rows: int) -> None:
    """Register the v2 backbone as champion in ``root/registry`` and write its gallery to ``root/embeddings``."""
    import torch

    from fct_registry.method.models.backbone import Backbone
    from fct_registry.onnx_boundary.model_files import write_model_dir
    from fct_registry.registry.publishing import publish_model

    torch.manual_seed(0)
    module = Backbone("cnn", EMBEDDING_DIM, width=32).eval()
    card = write_model_dir(module, root / "models" / "v2", "backbone", "v2", {}, image_shape=IMAGE_SHAPE)
    registry = ModelRegistry(root)
    version = publish_model(registry, root / "models" / "v2", "l2", "bench", "bench", {})
    registry.set_alias("backbone", "champion", version.version)
    common.synth_set(root / "embeddings" / "gallery_v2", gallery_rows, EMBEDDING_DIM, card.ref, side_dim=None)


def serve_child(root: str, port: str) -> None:
    """Serve the project at ``root`` on 127.0.0.1:``port`` until terminated (the subprocess's job)."""
    from fct_registry.serving.server import serve

    serve(ModelRegistry(root), Path(root) / "embeddings", port=int(port), log_level="warning")


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    """Poll ``GET /health`` until it answers 200.

    Raises:
        RuntimeError: the server exited or did not answer within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before answering /health")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /health within {timeout_s} s")


def load(url: str, send: Callable[[httpx.Client, int], httpx.Response], requests: int, clients: int,
         time_cap_s: float) -> dict:
    """Send up to ``requests`` requests from ``clients`` threads for at most ``time_cap_s`` seconds.

    Returns:
        Completed requests, non-200 answers, latency percentiles (ms), throughput (requests/s over the wall time)
        and what stopped the run (``"count"`` or ``"time"``).
    """
    for i in range(2 * clients):  # warm-up, not counted
        with httpx.Client(base_url=url, timeout=120) as http:
            send(http, i)
    latencies, errors, counter = [], [], itertools.count()
    deadline = time.monotonic() + time_cap_s

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < deadline and (i := next(counter)) < requests:
                start = time.perf_counter()
                response = send(http, i)
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    errors.append(response.status_code)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "errors": len(errors), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "max_ms": float(ms.max()),
            "throughput_rps": len(ms) / wall, "wall_s": wall, "stopped_by": "count" if len(ms) >= requests else "time"}


def png(pixels: np.ndarray) -> bytes:
    """(H, W) uint8 -> PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small gallery, few requests: a smoke test (seconds)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()), help="where the project goes")
    parser.add_argument("--serve", nargs=2, metavar=("ROOT", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if args.serve:
        serve_child(*args.serve)
        return
    host = common.machine()
    params = {"gallery_rows": 20_000 if args.quick else 1_000_000, "dim": EMBEDDING_DIM, "metric": "l2", "k": K,
              "requests_per_kind": 40 if args.quick else 500, "time_cap_s": 15 if args.quick else 60,
              "clients": 2 if args.quick else 4, "image": "28x28 grayscale PNG"}
    rng = np.random.default_rng(1)
    embeddings = [{"embedding": v.tolist(), "k": K} for v in rng.standard_normal((N_QUERIES, EMBEDDING_DIM))]
    images = [png(p) for p in rng.integers(0, 256, (N_QUERIES, *IMAGE_SHAPE[1:]), dtype=np.uint8)]
    kinds = {
        "embedding": lambda http, i: http.post("/search", json=embeddings[i % N_QUERIES]),
        "image": lambda http, i: http.post("/search", files={"image": ("q.png", images[i % N_QUERIES], "image/png")},
                                           data={"k": str(K)}),
    }
    with tempfile.TemporaryDirectory(prefix="fct-bench-", dir=args.workdir) as tmp:
        root = Path(tmp)
        build_project(root, params["gallery_rows"])
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(root), str(port)])
        try:
            wait_healthy(url, server, timeout_s=900)
            server_start_s = time.perf_counter() - started
            runs = {kind: load(url, send, params["requests_per_kind"], params["clients"], params["time_cap_s"])
                    for kind, send in kinds.items()}
        finally:
            server.terminate()
            server.wait(30)
    headline = {f"{kind} query {stat}": round(run[key], 1) for kind, run in runs.items()
                for stat, key in (("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"), ("requests/s", "throughput_rps"))}
    common.write_results(
        "serving_latency", args.quick, "Serving latency of POST /search", host, params,
        {"server_start_s": server_start_s, "runs": runs}, headline,
        [("Per query kind", [{"kind": kind, **run} for kind, run in runs.items()])],
        notes=["Server and load generator share this machine's cores (loopback); on a small machine the client "
               "threads take CPU from the server.",
               f"Server start (registry, gallery checksum, faiss index build) took {server_start_s:.1f} s.",
               "Gallery vectors are synthetic (standard normal); the backbone has random weights: the cost does not "
               "depend on the values. Search is exact (faiss IndexFlatL2)."])


if __name__ == "__main__":
    main()
