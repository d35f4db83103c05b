"""Use cases of ``fct-registry ui`` and ``serve``: the MLflow UI over the registry's store, started and stopped
cleanly; the search service's admin token and the refusal to serve a non-loopback address without one."""

from __future__ import annotations

import ipaddress
import os
import signal
import string
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from fct_registry.core.errors import ConfigError
from fct_registry.registry.model_registry import ModelRegistry


def mlflow_ui_command(registry: ModelRegistry, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow server`` command line and environment that serve the UI over the registry's store.

    One worker and no job execution: it starts in seconds with ~0.5 GB and stops cleanly (the defaults start
    ~15 processes and leave workers behind when killed).

    Returns:
        ``(argv, env)`` for :class:`subprocess.Popen`; ``env`` is this process's environment plus
        ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``.

    Raises:
        ConfigError: the registry is already a tracking server (an ``http(s)://`` URI): its own address is the UI.
    """
    if registry.tracking_uri.startswith(("http://", "https://")):
        raise ConfigError(f"the registry is the MLflow server at {registry.tracking_uri}, which serves the UI "
                          "itself; open that address in a browser instead of running `fct-registry ui`")
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", registry.tracking_uri,
            "--host", host, "--port", str(port), "--workers", "1"]
    return argv, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


UI_STOP_GRACE_S = 10
"""Seconds the MLflow server gets to stop after SIGTERM before its process group is killed."""


def run_mlflow_ui(registry: ModelRegistry, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Run the MLflow UI over the registry until it exits, Ctrl-C or SIGTERM; then stop its whole process group.

    Must run in the main thread (it handles SIGINT and SIGTERM for the duration).

    Returns:
        The server's exit code, or 0 when stopped by Ctrl-C / SIGTERM.
    """
    argv, env = mlflow_ui_command(registry, host, port)
    process = subprocess.Popen(argv, env=env, start_new_session=True)
    # Both signals stop it, even where SIGINT was inherited as ignored (a command started with `&` by a script).
    previous = {number: signal.signal(number, _interrupt) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=UI_STOP_GRACE_S)
            except subprocess.TimeoutExpired:  # uvicorn's graceful shutdown can wait on open connections
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


ADMIN_TOKEN_ENV = "FCT_REGISTRY_ADMIN_TOKEN"
"""Environment variable holding the token of the search service's admin endpoints (``POST /reload``)."""
MIN_ADMIN_TOKEN_LENGTH = 16
"""Shortest admin token accepted (a guessable token is no protection)."""
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + string.punctuation)


def admin_token(token_file: Path | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The admin token of ``fct-registry serve``: the contents of ``token_file`` if given, else the variable
    :data:`ADMIN_TOKEN_ENV`.

    Surrounding whitespace (a trailing newline) is stripped. The token is never echoed in an error.

    Args:
        token_file: A file whose whole contents are the token (``--admin-token-file``); wins over the variable.
        environ: The environment to read :data:`ADMIN_TOKEN_ENV` from; default ``os.environ``.

    Returns:
        The token, or None when neither the file nor the variable is given (an empty variable counts as unset).

    Raises:
        ConfigError: The file cannot be read, is empty, or the token holds characters other than printable ASCII
            without spaces (it must fit an ``Authorization: Bearer`` header), or is shorter than 16 characters.
    """
    if token_file is not None:
        try:
            token, source = Path(token_file).read_text(encoding="utf-8").strip(), f"admin token file {token_file}"
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read admin token file {token_file}: {exc}") from None
        if not token:
            raise ConfigError(f"admin token file {token_file} is empty; expected one line holding the token")
    else:
        token, source = (os.environ if environ is None else environ).get(ADMIN_TOKEN_ENV, "").strip(), ADMIN_TOKEN_ENV
        if not token:
            return None
    bad = [position for position, char in enumerate(token) if char not in _TOKEN_CHARS]
    if bad:
        raise ConfigError(f"the token in {source} holds a space or a character other than printable ASCII (at "
                          f"position {bad[0]}); expected one word usable in 'Authorization: Bearer <token>'")
    if len(token) < MIN_ADMIN_TOKEN_LENGTH:
        raise ConfigError(f"the token in {source} has {len(token)} characters; expected at least "
                          f"{MIN_ADMIN_TOKEN_LENGTH} (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
    return token


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` listens on the loopback interface only: ``localhost`` or a loopback IP literal.

    Any other name (which might resolve to a public address) and the wildcard addresses ``0.0.0.0``/``::`` are not.
    """
    if host.strip().lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_token_off_loopback(host: str, token: str | None) -> None:
    """Refuse to serve on a non-loopback ``host`` when no admin token protects the admin endpoints.

    Raises:
        ConfigError: ``host`` is not loopback (see :func:`is_loopback`) and ``token`` is None.
    """
    if token is None and not is_loopback(host):
        raise ConfigError(f"refusing to serve on non-loopback host {host!r} without an admin token; set "
                          f"{ADMIN_TOKEN_ENV} or pass --admin-token-file, or bind 127.0.0.1")
