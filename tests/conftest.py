"""Session-wide isolation: DVC, MLflow, ONNX Runtime and Ray write under a temp folder, never the user's home."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SANDBOX = Path(tempfile.mkdtemp(prefix="fct-tests-"))
for _name, _sub in {
    "HOME": "home",
    "XDG_CACHE_HOME": "cache",
    "XDG_CONFIG_HOME": "config",
    "XDG_DATA_HOME": "data",
    "DVC_SITE_CACHE_DIR": "dvc-site-cache",
    "RAY_TMPDIR": "ray",
    "TMPDIR": "tmp",
}.items():
    _path = _SANDBOX / _sub
    _path.mkdir(parents=True, exist_ok=True)
    os.environ[_name] = str(_path)
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("MLFLOW_REGISTRY_URI", None)
tempfile.tempdir = str(_SANDBOX / "tmp")


def pytest_sessionfinish(session, exitstatus) -> None:
    """Remove the sandbox (models, stores, Ray's and DVC's files) once the session is over."""
    import shutil

    shutil.rmtree(_SANDBOX, ignore_errors=True)
