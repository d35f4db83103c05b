"""Use case of ``fct-registry ui``: the MLflow UI over the registry's store, started and stopped cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from fct_registry.registry.model_registry import ModelRegistry


def mlflow_ui_command(registry: ModelRegistry, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow server`` command line and environment that serve the UI over the registry's store.

    One worker and no job execution: it starts in seconds with ~0.5 GB and stops cleanly (the defaults start
    ~15 processes and leave workers behind when killed).

    Returns:
        ``(argv, env)`` for :class:`subprocess.Popen`; ``env`` is this process's environment plus
        ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``.
    """
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", registry.tracking_uri,
            "--host", host, "--port", str(port), "--workers", "1"]
    return argv, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


UI_STOP_GRACE_S = 10
"""Seconds the MLflow server gets to stop after SIGTERM before its process group is killed."""


def run_mlflow_ui(registry: ModelRegistry, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Run the MLflow UI over the registry until it exits, Ctrl-C or SIGTERM; then stop its whole process group.

    Must run in the main thread (it handles SIGTERM for the duration).

    Returns:
        The server's exit code, or 0 when stopped by Ctrl-C / SIGTERM.
    """
    argv, env = mlflow_ui_command(registry, host, port)
    process = subprocess.Popen(argv, env=env, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=UI_STOP_GRACE_S)
            except subprocess.TimeoutExpired:  # uvicorn's graceful shutdown can wait on open connections
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
