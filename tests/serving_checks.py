"""What the search-service tests share: the app run for real by uvicorn on a free loopback port, PNG bytes, a
direct (service-free) search to compare with, and the v1 gallery upgraded to the champion v3."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import factories
import numpy as np
import uvicorn
from PIL import Image

from fct_registry.engines.run import upgrade_set
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.usecases import upgrade
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.search import SearchResult, index_for_set

TOKEN = "test-admin-token-0123456789"
"""An admin token of acceptable length."""


@contextmanager
def running(app) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread on a free 127.0.0.1 port; yields its base URL."""
    # proto IPPROTO_TCP as uvicorn's own sockets: asyncio then sets TCP_NODELAY (else ~40 ms per request)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def png(pixels: np.ndarray) -> bytes:
    """(H, W) uint8 -> PNG bytes (lossless)."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def direct(model_dir: Path, set_path: Path, pixels: np.ndarray, k: int) -> SearchResult:
    """Embed (1, 1, H, W) uint8 with the backbone's ONNX file and search the set without the service."""
    queries = embed_images(OnnxModel(model_dir / "model.onnx"), pixels)
    return index_for_set(EmbeddingSet.open(set_path)).search(queries, k)


def upgraded_to_v3(world: factories.World, sets_root: Path) -> Path:
    """Upgrade the v1 gallery under ``sets_root`` to v3 through the registered chain (v1 -> v2 -> v3)."""
    source = EmbeddingSet.open(sets_root / "gallery_v1")
    steps = upgrade.plan_upgrade(world.registry, source, world.versions["v3"])
    return upgrade_set(source.path, steps, sets_root / "gallery_v1@v3").path


def v3_sets_root(world: factories.World, folder: Path) -> Path:
    """A sets root under ``folder`` holding the v1 gallery and its upgrade to v3 (the champion)."""
    sets_root = factories.copy_sets(world, folder / "embeddings")
    upgraded_to_v3(world, sets_root)
    return sets_root


def one_line_detail(response) -> str:
    """The ``detail`` of a 4xx answer, asserted to be one non-empty line of text; returns it."""
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail and "\r" not in detail, response.text
    return detail
