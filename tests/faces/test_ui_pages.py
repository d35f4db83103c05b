"""A person's view of the registry: `fct-registry ui` serves the MLflow UI over the tiny world, and a headless
Chromium (Debian's `chromium`, installed by `make setup` as root) renders a transformation's version page.

The rendered page must show the description in words (with links to the versions it maps from and to), the lineage
picture and the logged signature; the screenshot must not be blank. Set ``FCT_UI_SCREENSHOT=<path.png>`` to keep
the screenshot (the README's docs/img/mlflow_version.png is made this way).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import factories
import numpy as np
import psutil
import pytest
from PIL import Image

WINDOW = (1400, 1000)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> factories.World:
    return factories.shared_world(tmp_path_factory)


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("Debian's `chromium` is not installed: run `apt-get install -y chromium` (as root `make setup` "
                    "installs it); the UI test renders pages with it")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def render(url: str, screenshot: Path, profile: Path) -> str:
    """Load ``url`` in headless Chromium; write its screenshot, return its DOM after scripts ran."""
    argv = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=15000",
            f"--screenshot={screenshot}", "--dump-dom", url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_a_transformation_page_shows_its_description_lineage_and_signature(world, tmp_path):
    chromium()  # fail first, before starting a server, when the browser is missing
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(tmp_path / "ui.log", "w") as log:
        ui = subprocess.Popen([str(Path(sys.executable).with_name("fct-registry")), "--root", str(world.root), "ui",
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(f"{base}/health", timeout_s=60)
        h12 = world.versions["h-v1-v2"]
        shot = tmp_path / "version.png"
        dom = render(f"{base}/#/models/{h12.name}/versions/{h12.version}", shot, tmp_path / "profile")

        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", dom))
        assert ("Forward transformation h-v1-v2: it maps the stored embeddings of backbone v1 (fct-backbone "
                "version 1)") in text, text[:3000]
        assert "CMC top-1 0.700, CMC top-5 0.900, mAP 0.620" in text
        assert "Inputs (2)" in text and "Outputs (1)" in text  # the signature, in the Schema section
        for key in ("v1", "v2", "s1"):
            version = world.versions[key]
            assert f'href="#/models/{version.name}/versions/{version.version}"' in dom
        (image,) = re.findall(r'<img src="(get-artifact\?path=lineage\.png[^"]+)"', dom)
        with urllib.request.urlopen(f"{base}/{image.replace('&amp;', '&')}", timeout=10) as response:
            assert response.read(8) == b"\x89PNG\r\n\x1a\n"

        with Image.open(shot) as opened:
            assert opened.size == WINDOW
            pixels = np.asarray(opened.convert("RGB"), dtype=np.float32)
        assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200, "blank screenshot"
        if os.environ.get("FCT_UI_SCREENSHOT"):
            shutil.copy(shot, os.environ["FCT_UI_SCREENSHOT"])
    finally:
        server = psutil.Process(ui.pid).children(recursive=True)
        ui.send_signal(signal.SIGINT)
        try:
            assert ui.wait(timeout=30) == 0
        finally:
            for process in [psutil.Process(ui.pid), *server] if ui.poll() is None else server:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
