"""A throw-away multi-node Ray cluster on this machine, started with the ``ray start`` command line.

For tests and benchmarks of the Ray engine, and for trying it without a cluster: a head and further nodes, each a
``ray start --block`` process in its own process group, with its own temp dir, CPUs, custom resources and free
ports on 127.0.0.1, without token authentication (loopback only). Every node and every driver must agree on the
auth mode, and a driver reads it when it first loads Ray, so a driver process must start with :data:`DRIVER_ENV`
in its environment (a process that ran a local ``ray.init()`` is in token mode for good: use a fresh process).
:meth:`LocalRayCluster.stop` ends
exactly those processes (never ``ray stop``, which would stop every Ray of this user on the machine). This module
runs the ``ray`` executable; it does not import ray.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fct_registry.core.errors import ConfigError

DRIVER_ENV = {"RAY_AUTH_MODE": "disabled"}
"""The cluster's nodes run with it; a driver process must be started with it in its environment."""
STARTED = "Ray runtime started"
"""What ``ray start`` prints once its node is up."""
PR_SET_PDEATHSIG = 1
"""Linux ``prctl`` option: the signal a process gets when its parent ends."""
MAX_SOCKET_PATH = 107
"""Unix socket paths (Ray puts its sockets in each node's temp dir) must be shorter than this."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ports() -> list[str]:
    names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port")
    return [f"--{name}={free_port()}" for name in names]


@dataclass
class NodeSpec:
    """One node: its CPUs and custom resources (e.g. ``{"node_b": 1}`` to pin tasks to it)."""

    num_cpus: float = 1
    resources: Mapping[str, float] = field(default_factory=dict)


class LocalRayCluster:
    """Head plus further nodes, each started by ``ray start --block`` on 127.0.0.1; use as a context manager.

    Attributes:
        root: The cluster's folder: node ``i`` keeps its Ray temp dir in ``root/n<i>`` and its output in
            ``root/n<i>.log``.
        address: ``127.0.0.1:<GCS port>``, for ``ray.init(address=...)`` or ``upgrade --address``.
    """

    def __init__(self, root: str | os.PathLike[str], nodes: Sequence[NodeSpec], timeout_s: float = 120.0) -> None:
        """Describe the cluster; nothing starts before :meth:`start`.

        Args:
            root: An empty folder with a short path (Ray's socket paths inside it must stay under 107 bytes).
            nodes: The head first, then the other nodes (at least one node).
            timeout_s: How long each node may take to start.

        Raises:
            ConfigError: no node, or ``root`` too long for Ray's socket paths.
        """
        self.root = Path(root)
        if not nodes:
            raise ConfigError("a Ray cluster needs at least one node, got none")
        longest = len(str(self.root / "n0" / "session_2000-01-01_00-00-00_000000_4194304" / "sockets" / "raylet"))
        if longest >= MAX_SOCKET_PATH:
            raise ConfigError(f"cluster folder {self.root} is too long for Ray's socket paths ({longest} >= "
                              f"{MAX_SOCKET_PATH} bytes); use a shorter one")
        self.nodes = list(nodes)
        self.timeout_s = timeout_s
        self.address = f"127.0.0.1:{free_port()}"
        self.processes: list[subprocess.Popen] = []
        self.stopped = False
        self._seen: dict[int, int] = {}

    def _start_node(self, i: int, node: NodeSpec) -> None:
        ray = Path(sys.executable).with_name("ray")
        role = ["--head", f"--port={self.address.rsplit(':', 1)[1]}", "--include-dashboard=false",
                f"--dashboard-port={free_port()}"] if i == 0 else [f"--address={self.address}"]
        command = [str(ray), "start", "--block", *role, "--node-ip-address=127.0.0.1", f"--num-cpus={node.num_cpus}",
                   f"--resources={json.dumps(dict(node.resources))}", "--disable-usage-stats",
                   f"--temp-dir={self.root / f'n{i}'}", *_ports()]
        log = self.root / f"n{i}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **DRIVER_ENV},
                                       preexec_fn=_end_with_parent)
        self.processes.append(process)
        deadline = time.monotonic() + self.timeout_s
        while STARTED not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                raise ConfigError(f"ray node {i} did not start (exit code {process.poll()}): {tail[0]}")
            time.sleep(0.1)

    def start(self) -> LocalRayCluster:
        """Start the head, then each other node, waiting for each to be up.

        Raises:
            ConfigError: a node exited or did not start within ``timeout_s`` (the nodes started so far are
                stopped; its log's last line is named).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            for i, node in enumerate(self.nodes):
                self._start_node(i, node)
        except BaseException:
            self.stop()
            raise
        return self

    def process_ids(self) -> list[int]:
        """Every live process of the cluster: the members of the nodes' process groups and all their descendants
        (Ray puts each worker process in a group of its own), plus any process seen here before that is still
        alive (a worker orphaned by its raylet's end); by scanning /proc. After :meth:`stop`: none."""
        table = _processes()
        groups = {p.pid for p in self.processes}
        found = {pid for pid, (_, pgrp, _) in table.items() if pgrp in groups}
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        stack = list(found)
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in found:
                    found.add(child)
                    stack.append(child)
        self._seen.update((pid, table[pid][2]) for pid in found)
        found |= {pid for pid, start in self._seen.items() if pid in table and table[pid][2] == start}
        return sorted(found)

    def stop(self, grace_s: float = 5.0) -> None:
        """End every process of the cluster: SIGTERM to each node's process group, then (after at most ``grace_s``
        seconds) SIGKILL to the groups and to every process of :meth:`process_ids` still alive. Safe to call twice
        (the second call does nothing)."""
        if self.stopped:
            return
        self.stopped = True
        self.process_ids()  # remember the workers while their raylets still own them
        for process in reversed(self.processes):
            _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.process_ids() and time.monotonic() < deadline:
            time.sleep(0.1)
        for process in self.processes:
            _signal_group(process.pid, signal.SIGKILL)
        for pid in self.process_ids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.processes:
            process.wait()
        deadline = time.monotonic() + grace_s
        while self.process_ids() and time.monotonic() < deadline:  # SIGKILLed processes vanish within moments
            time.sleep(0.05)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _end_with_parent() -> None:
    """In a node's ``ray start`` process before it runs: be sent SIGTERM when the process that started it ends, so
    that a killed test or benchmark leaves no cluster behind (``ray start --block`` then stops its node)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _processes() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, process group, start time in clock ticks) of every live, non-zombie process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ... starttime (22nd)
        if fields[0] not in ("Z", "X"):
            table[int(entry.name)] = (int(fields[1]), int(fields[2]), int(fields[19]))
    return table


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
