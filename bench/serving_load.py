"""Load generation and reporting for the serving benchmark: the HTTP clients, the queries, a py-spy profile of the
server, and the result rows."""

from __future__ import annotations

import collections
import http.client
import itertools
import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import ann_data
import httpx
import numpy as np

from fct_registry.serving import batcher

N_EMBEDDING_QUERIES = 1000
N_IMAGE_QUERIES = 256
_WORKER_WAIT = next(i for i, line in enumerate(Path(batcher.__file__).read_text().splitlines(), 1)
                    if "self._queue.get()" in line)
IDLE = ("select (selectors.py", "wait (threading.py", "get (queue.py", f"_work (batcher.py:{_WORKER_WAIT})")
"""Leaf frames of a thread waiting for work (the event loop's epoll, the thread pool's and the search worker's
queues)."""
NOTES = [
    "Server and load generator share this machine's 2 cores (loopback): the 4 client threads (stdlib http.client, "
    "keep-alive, ~0.17 ms CPU per request) take CPU from the server; other agents' jobs ran on the machine too (load "
    "average at start above).",
    "Latency is per request as the client sees it (send to full answer). Throughput: answered requests / wall time.",
    "recall@10: mean |approximate top-10 ∩ exact top-10| / 10 over 1,000 held-out items of the gallery (own item "
    "excluded), measured by the build (fct-registry sets index) with the served knobs; exact is 1 by definition.",
    "index MB: the stored index file (faiss); exact: the float32 vectors. server RSS: the service process after the "
    "load (backbone, index, Python, web stack).",
    "mean batch: queries per faiss call in the service's search worker (queries queued together are searched in one "
    "call; a lone query is never held back).",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    """Poll ``GET /health`` until it answers 200 (RuntimeError if the server exits or times out)."""
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


def info(url: str) -> dict:
    return httpx.get(f"{url}/info", timeout=60).json()


Request = tuple[bytes, dict[str, str]]
"""A ``POST /search`` body and its headers, encoded once before the load starts."""


def senders(base: ann_data.Base, k: int, seed: int = 1) -> dict[str, list[Request]]:
    """The two query kinds, each a list of distinct requests cycled through: JSON embeddings (replicas of random
    gallery images with fresh noise) and multipart PNG uploads of Fashion-MNIST test images (encoded by httpx)."""
    rng = np.random.default_rng(seed)
    vectors = ann_data.replicas(base, rng.integers(0, len(base.embeddings), N_EMBEDDING_QUERIES), rng)
    embeddings = [(json.dumps({"embedding": v.tolist(), "k": k}).encode(), {"content-type": "application/json"})
                  for v in vectors]
    test_images = base.images[-10_000:]
    images = []
    for i in rng.choice(len(test_images), N_IMAGE_QUERIES, replace=False):
        request = httpx.Request("POST", "http://x/search", data={"k": str(k)},
                                files={"image": ("q.png", ann_data.png(test_images[i, 0]), "image/png")})
        images.append((request.read(), {"content-type": request.headers["content-type"]}))
    return {"embedding": embeddings, "image": images}


def _post(connection: http.client.HTTPConnection, request: Request) -> int:
    connection.request("POST", "/search", body=request[0], headers=request[1])
    response = connection.getresponse()
    response.read()
    return response.status


def load(url: str, requests_: list[Request], requests: int, clients: int, time_cap_s: float) -> dict:
    """Send up to ``requests`` requests from ``clients`` threads for at most ``time_cap_s`` s (after 2 warm-up
    requests per client); latency percentiles (ms), throughput (requests/s) and what stopped the run.

    Each client is a thread with one keep-alive ``http.client`` connection (about 0.17 ms of CPU per request here,
    against 0.7 ms for httpx: on 2 cores the load generator's CPU is taken from the server)."""
    host, port = url.removeprefix("http://").split(":")
    latencies, errors, counter = [], [], itertools.count()
    deadline = time.monotonic() + time_cap_s

    def client(warm: int) -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=300)
        for i in range(warm):
            _post(connection, requests_[i % len(requests_)])
        started.wait()
        while time.monotonic() < deadline and (i := next(counter)) < requests:
            start = time.perf_counter()
            status = _post(connection, requests_[i % len(requests_)])
            latencies.append(time.perf_counter() - start)
            if status != 200:
                errors.append(status)
        connection.close()

    started = threading.Event()
    threads = [threading.Thread(target=client, args=(2,)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # warm-up requests done (not counted)
    deadline = time.monotonic() + time_cap_s
    begin = time.perf_counter()
    started.set()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begin
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "errors": len(errors), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()), "throughput_rps": len(ms) / wall,
            "stopped_by": "count" if len(ms) >= requests else "time"}


def start_profile(pid: int, out: Path) -> subprocess.Popen:
    """py-spy the server's busy threads for 15 s (100 samples/s) into a speedscope file."""
    spy = subprocess.Popen(["py-spy", "record", "-p", str(pid), "-o", str(out), "-f", "speedscope", "--threads",
                            "-d", "15", "-r", "100"], stdout=subprocess.DEVNULL)
    time.sleep(1.0)
    return spy


def summarize_profile(path: Path, top: int = 14) -> list[dict]:
    """The functions the server's busy samples were in (leaf frames, idle waits left out), busiest first: their share
    of the busy samples, and the share of samples whose stack contains them (inclusive)."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]

    def name(index: int) -> str:
        frame = frames[index]
        return f"{frame['name']} ({frame.get('file', '').split('/')[-1]}:{frame.get('line')})"

    own, inclusive, busy = collections.Counter(), collections.Counter(), 0
    for profile in data["profiles"]:
        for stack in profile["samples"]:
            if not stack or any(idle in name(stack[-1]) for idle in IDLE):
                continue
            busy += 1
            own[name(stack[-1])] += 1
            for key in {name(f) for f in stack}:
                inclusive[key] += 1
    return [{"function": key, "self_%": 100 * count / busy, "inclusive_%": 100 * inclusive[key] / busy}
            for key, count in own.most_common(top)] + [{"function": f"(busy samples: {busy})", "self_%": 100.0,
                                                         "inclusive_%": 100.0}]


def row(items: int, kind: str, built: dict, served: dict) -> dict:
    emb, img = served["embedding"], served["image"]
    batching = served["batching"]
    return {"items": items, "index": kind, "emb_p50_ms": emb["p50_ms"], "emb_p99_ms": emb["p99_ms"],
            "emb_rps": emb["throughput_rps"], "img_p50_ms": img["p50_ms"], "img_p99_ms": img["p99_ms"],
            "img_rps": img["throughput_rps"], "recall_at_10": built["recall_at_10"], "build_s": built["build_s"],
            "index_mb": built["index_mb"], "server_rss_mb": served["server_rss_mb"],
            "mean_batch": batching["queries"] / max(batching["batches"], 1), "server_start_s": served["server_start_s"],
            "errors": emb["errors"] + img["errors"], "requests": emb["requests"] + img["requests"],
            "knobs": " ".join(f"{k}={v}" for k, v in built["knobs"].items() if k not in ("seed", "train_rows"))}


def headline(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        key = f"{r['items']:.0e} {r['index']}".replace("+0", "")
        out |= {f"{key} embedding p99 ms": round(r["emb_p99_ms"], 1), f"{key} image p99 ms": round(r["img_p99_ms"], 1),
                f"{key} recall@10": round(r["recall_at_10"], 4) if r["recall_at_10"] is not None else None}
    return out
