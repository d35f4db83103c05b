"""Real servers for tests: a throwaway PostgreSQL cluster and ``mlflow server`` processes backed by it.

A team's shared registry is an MLflow tracking server over a database, with artifacts proxied by the server
(``--serve-artifacts``). :func:`postgres_cluster` starts PostgreSQL's own binaries (Debian's ``postgresql``
package: ``/usr/lib/postgresql/<major>/bin``) on 127.0.0.1 with its data and unix socket in a temp folder;
:func:`mlflow_server` starts ``mlflow server`` on a database of it. Both stop everything they started when the
``with`` block ends, also on failure. Without the binaries the fixture fails (never skips) naming the fix.

PostgreSQL refuses to run as root: as root the server binaries run as the ``postgres`` user (``runuser``), and
the cluster's folder lives where that user can reach it (the test sandbox is private to root): ``/dev/shm`` when
it is there (a RAM disk: the few thousand small files of a cluster are deleted in a blink at the end), else
``/tmp``.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

POSTGRES_GLOB = "/usr/lib/postgresql/*/bin"
POSTGRES_OS_USER = "postgres"
DB_USER = "mlflow"
MLFLOW = Path(sys.executable).with_name("mlflow")
FCT_REGISTRY = Path(sys.executable).with_name("fct-registry")
# The server's GenAI job runner (huey, 10 worker threads) is not needed by a model registry; off spares the CPUs.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bin() -> Path:
    """The folder of PostgreSQL's server binaries (initdb, pg_ctl, postgres, createdb); the newest major wins.

    Fails the test (no skip) when they are missing: a shared-registry test that silently skips proves nothing.
    """
    found = []
    for folder in Path("/").glob(POSTGRES_GLOB.lstrip("/")):
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            major = re.match(r"\d+", folder.parent.name)
            found.append((int(major.group()) if major else 0, folder))
    if found:
        return max(found)[1]
    on_path = shutil.which("initdb"), shutil.which("pg_ctl")
    if all(on_path):
        return Path(on_path[0]).parent
    pytest.fail(f"PostgreSQL server binaries (initdb, pg_ctl) not found under {POSTGRES_GLOB} nor on PATH: "
                "run `make setup` as root (it apt-installs Debian's `postgresql`), or install PostgreSQL",
                pytrace=False)


@dataclass(frozen=True)
class Postgres:
    """A running PostgreSQL cluster: superuser :data:`DB_USER`, trust auth, TCP on 127.0.0.1:``port`` only."""

    bin: Path
    folder: Path
    port: int

    def uri(self, database: str) -> str:
        """SQLAlchemy URI of ``database`` for MLflow (``postgresql+psycopg2``: SQLAlchemy 2.1 defaults to psycopg 3)."""
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create ``name`` (a copy of ``template`` when given); returns its URI."""
        _run([self.bin / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER,
              *(["-T", template] if template else []), name])
        return self.uri(name)

    def sql(self, database: str, query: str) -> str:
        """Run one query with psql; returns its unaligned, tuples-only output."""
        return _run([self.bin / "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER, "-d", database,
                     "-At", "-v", "ON_ERROR_STOP=1", "-c", query])


def _as_server_user(command: list[str | os.PathLike]) -> list[str]:
    """``command`` as the ``postgres`` user when running as root (initdb and postgres refuse root)."""
    argv = [str(c) for c in command]
    if os.geteuid() != 0:
        return argv
    try:
        pwd.getpwnam(POSTGRES_OS_USER)
    except KeyError:
        pytest.fail(f"running as root but there is no {POSTGRES_OS_USER!r} user to run PostgreSQL as: install "
                    "Debian's `postgresql` package (it creates the user)", pytrace=False)
    return ["runuser", "-u", POSTGRES_OS_USER, "--", *argv]


def _run(argv: list[str | os.PathLike], timeout: float = 120) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


@contextmanager
def postgres_cluster() -> Iterator[Postgres]:
    """initdb + pg_ctl start a private cluster; stopped (immediate) and deleted when the block ends."""
    binaries = postgres_bin()
    root = os.geteuid() == 0
    folder = Path(tempfile.mkdtemp(prefix="fct-pg-", dir=_cluster_parent(root)))
    if root:
        shutil.chown(folder, POSTGRES_OS_USER)
    data = folder / "data"
    started = False
    try:
        _run(_as_server_user([binaries / "initdb", "-D", data, "-U", DB_USER, "--auth=trust", "-E", "UTF8",
                              "--locale=C", "--no-sync"]))
        for _attempt in range(3):  # the port is picked free, but another process may take it first
            port = free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off")
            start = subprocess.run(_as_server_user([binaries / "pg_ctl", "-D", data, "-l", folder / "postgres.log",
                                                    "-w", "-t", "60", "-o", options, "start"]),
                                   capture_output=True, text=True, timeout=90)
            if start.returncode == 0:
                started = True
                break
        if not started:
            log = (folder / "postgres.log").read_text() if (folder / "postgres.log").is_file() else ""
            raise RuntimeError(f"PostgreSQL did not start:\n{start.stdout}{start.stderr}\n{log[-3000:]}")
        yield Postgres(binaries, folder, port)
    finally:
        if started:
            stop = subprocess.run(_as_server_user([binaries / "pg_ctl", "-D", data, "-m", "immediate", "-w", "-t",
                                                   "30", "stop"]), capture_output=True, text=True, timeout=60)
            if stop.returncode != 0:  # last resort: the postmaster's pid is the first line of postmaster.pid
                pid_file = data / "postmaster.pid"
                if pid_file.is_file():
                    _kill_tree(int(pid_file.read_text().split()[0]))
        shutil.rmtree(folder, ignore_errors=True)


def _cluster_parent(as_root: bool) -> str | None:
    """Where the cluster's folder goes: a RAM disk when there is one; as root a place the postgres user reaches."""
    for candidate in ("/dev/shm", "/tmp" if as_root else None):
        if candidate and os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    return None


def migrate(postgres: Postgres, database: str) -> str:
    """Create ``database`` and run MLflow's schema migrations on it (``mlflow db upgrade``); returns its URI.

    A migrated empty database is a template: ``create_database(name, template=...)`` copies it in well under a
    second, where a server would spend ~10 s migrating a new one.
    """
    uri = postgres.create_database(database)
    _run([MLFLOW, "db", "upgrade", uri], timeout=300)
    return uri


@dataclass(frozen=True)
class MlflowServer:
    """A running ``mlflow server``: its URL (the tracking URI clients use) and where it keeps artifacts."""

    url: str
    artifacts: Path
    log: Path
    process: subprocess.Popen


@contextmanager
def mlflow_server(backend_uri: str, folder: Path, workers: int = 1, timeout_s: float = 120) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1 over ``backend_uri`` with proxied artifacts under ``folder/artifacts``.

    Waits until ``GET /health`` answers; the server's process group is killed when the block ends.
    """
    artifacts = folder / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log = folder / "mlflow-server.log"
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")} | SERVER_ENV
    argv = [MLFLOW, "server", "--backend-store-uri", backend_uri, "--serve-artifacts", "--artifacts-destination",
            artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    with open(log, "w") as out:
        process = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT, env=env,
                                   cwd=folder, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server on {url} did not come up (exit {process.poll()}):\n"
                            f"{log.read_text()[-4000:]}", pytrace=False)
            time.sleep(0.25)
        yield MlflowServer(url, artifacts, log, process)
    finally:
        _kill_tree(process.pid, group=True)
        process.wait(timeout=30)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _kill_tree(pid: int, group: bool = False, grace_s: float = 15) -> None:
    """SIGTERM ``pid`` and its descendants (and its process group), then SIGKILL whatever is left after grace."""
    try:
        parent = psutil.Process(pid)
        processes = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    if group:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
