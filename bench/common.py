"""Shared pieces of the benchmarks: machine description, synthetic embedding sets, the project's transformation
chain, a matrix-multiply peak, timing and result files.

The benchmarks are run by hand (``python bench/<name>.py [--quick]`` or ``python bench/run_all.py``), never by
pytest. Each writes ``bench/results/<name>.json`` and ``<name>.md`` (``<name>-quick.*`` for ``--quick`` smoke
runs, so a smoke run is never mistaken for a measurement).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

from fct_registry.core.refs import ModelRef
from fct_registry.engines.chain import ChainStep
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.set_writer import write_embedding_set

if TYPE_CHECKING:  # torch is imported where it is used, so a measured subprocess can import this module lightly
    from torch import nn

    from fct_registry.method.models.transformation import ForwardTransformation

RESULTS = Path(__file__).resolve().parent / "results"
LABELS = ("v1", "v2", "v3", "v4")
CHAIN_DIMS = (8, 128, 128, 128)
"""Embedding width of each label: params.yaml's old (8-d), new (128-d) and v3 (128-d), plus a further 128-d v4."""
SIDE_LABEL, SIDE_DIM = "s1", 128
HIDDEN_DIM = 512
"""params.yaml ``transformation.hidden_dim``."""
SHARD_ROWS = 65536
"""Rows per Parquet shard (``upgrade_set`` feeds ONNX Runtime smaller batches: ``engines.shards.BATCH_ROWS``)."""


def arguments(doc: str, quick: str, workdir: str = "where sets are written") -> argparse.ArgumentParser:
    """A benchmark's command line: described by the first line of its module docstring ``doc``, with ``--quick``
    (help ``quick``) and ``--workdir`` (default: the temp dir); the benchmark adds its own options."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()), help=workdir)
    return parser


def fsync_write(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` (truncating it) and fsync it, as the set writer does."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def machine() -> dict[str, Any]:
    """CPU, cores, RAM, OS, load and library versions of this machine, for the results files."""
    import faiss
    import onnxruntime
    import pyarrow
    import ray
    import torch
    import torchvision

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torchvision": torchvision.__version__,
        "onnxruntime": onnxruntime.__version__,
        "faiss": faiss.__version__,
        "ray": ray.__version__,
        "numpy": np.__version__,
        "pyarrow": pyarrow.__version__,
    }


def synthetic_ref(label: str) -> ModelRef:
    """A stand-in identity for a model the benchmark never builds (sha256 of ``"bench <label>"``)."""
    return ModelRef(label=label, sha256=hashlib.sha256(f"bench {label}".encode()).hexdigest())


def synth_set(path: Path, rows: int, dim: int, model: ModelRef, side_dim: int | None = SIDE_DIM,
              seed: int = 0) -> EmbeddingSet:
    """Write a set of ``rows`` standard-normal float32 vectors (rows, dim) [+ side-info (rows, side_dim)] to ``path``.

    Streams batches of :data:`SHARD_ROWS` rows into ``write_embedding_set``, so memory stays flat in ``rows``.
    Item ids are 0..rows-1, labels -1 (unknown), side-info model :func:`synthetic_ref` ``("s1")``.
    """
    rng = np.random.default_rng(seed)

    def batches() -> Iterator[EmbeddingBatch]:
        for start in range(0, rows, SHARD_ROWS):
            n = min(SHARD_ROWS, rows - start)
            side = None if side_dim is None else rng.standard_normal((n, side_dim), dtype=np.float32)
            yield EmbeddingBatch(np.arange(start, start + n), np.full(n, -1),
                                 rng.standard_normal((n, dim), dtype=np.float32), side, model=model)

    side_model = None if side_dim is None else synthetic_ref(SIDE_LABEL)
    return write_embedding_set(path, batches(), model, side_model, lineage=[f"bench: {rows} synthetic rows"],
                               shard_rows=SHARD_ROWS)


def export_chain(folder: Path, hops: int) -> tuple[list[ChainStep], list[ForwardTransformation]]:
    """Export ``hops`` forward transformations v1 -> v2 -> ... with the project's dims (random seeded weights).

    Step i maps ``CHAIN_DIMS[i]`` + 128-d side-info -> ``CHAIN_DIMS[i + 1]`` with hidden 512 (as params.yaml).

    Returns:
        The chain's steps (ONNX files in ``folder``, parity-checked by ``export_onnx``) and the torch modules
        (eval mode) they were exported from, in order.
    """
    import torch

    from fct_registry.method.models.transformation import ForwardTransformation
    from fct_registry.onnx_boundary.export import export_onnx
    from fct_registry.onnx_boundary.model_files import example_inputs

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    steps, modules = [], []
    for i in range(hops):
        module = ForwardTransformation(CHAIN_DIMS[i], CHAIN_DIMS[i + 1], SIDE_DIM, HIDDEN_DIM).eval()
        name = f"h-{LABELS[i]}-{LABELS[i + 1]}"
        report = export_onnx(module, example_inputs(module), folder / f"{name}.onnx")
        steps.append(ChainStep(onnx_path=report.path, source=synthetic_ref(LABELS[i]),
                               target=synthetic_ref(LABELS[i + 1]), side_info=synthetic_ref(SIDE_LABEL), name=name))
        modules.append(module)
    return steps, modules


def linear_flops(module: nn.Module) -> int:
    """FLOPs per row of the module's Linear layers: 2 * sum(in * out) (multiply-adds; BatchNorm/ReLU ignored)."""
    from torch import nn

    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def best_seconds(repeats: int, fn: Callable[..., object], *args: object, **kwargs: object) -> tuple[float, list[float]]:
    """Run ``fn(*args, **kwargs)`` ``repeats`` times; (fastest wall time, all wall times) in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times), times


def gemm_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """float32 (n, n) @ (n, n) matrix-multiply rate, FLOP/s (2 n^3 / best time), with torch and with numpy."""
    import torch

    rates = {}
    for lib, a, b, mm in (("torch", torch.randn(n, n), torch.randn(n, n), torch.mm),
                          ("numpy", *np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32), np.matmul)):
        mm(a, b)  # warm-up
        rates[f"{lib}_flops"] = 2 * n**3 / best_seconds(repeats, mm, a, b)[0]
    return {"n": n, **rates, "peak_flops": max(rates.values())}


def command() -> str:
    """The exact command line of this process."""
    return shlex.join([sys.executable, *sys.argv])


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, object]]) -> str:
    """Rows with the same keys -> a Markdown table (floats to 3 significant digits, thousands separated)."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, quick: bool, title: str, host: Mapping[str, Any], params: Mapping[str, Any],
                  results: Mapping[str, Any], headline: Mapping[str, Any],
                  tables: Sequence[tuple[str, Sequence[Mapping[str, object]]]], notes: Sequence[str] = ()) -> Path:
    """Write ``RESULTS/<name>[-quick].json`` (everything) and ``.md`` (for people); returns the JSON path.

    Args:
        name: The benchmark's name, e.g. ``"upgrade_throughput"``.
        quick: A ``--quick`` smoke run (files get the ``-quick`` suffix).
        title: The Markdown page's title.
        host: :func:`machine`, taken when the benchmark started.
        params: The sizes and settings the run used.
        results: All measurements (JSON only).
        headline: A few key figures (JSON and Markdown; collected by ``run_all.py``).
        tables: (section title, rows) pairs shown in the Markdown.
        notes: Lines under "Notes" in the Markdown: method, caveats.
    """
    stem = f"{name}-quick" if quick else name
    finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = {"benchmark": name, "quick": quick, "command": command(), "cwd": os.getcwd(), "finished": finished,
              "machine": dict(host), "params": dict(params), "headline": dict(headline), "results": dict(results)}
    page = [f"# {title}" + (" (quick smoke run: sizes too small to quote)" if quick else ""), "",
            f"Command (in `{os.getcwd()}`): `{command()}`  ", f"Finished: {finished}", "",
            "## Machine", "", markdown_table([{"item": k, "value": v} for k, v in host.items()]), "",
            "## Parameters", "", markdown_table([{"param": k, "value": v} for k, v in params.items()]), "",
            "## Headline", "", markdown_table([{"figure": k, "value": v} for k, v in headline.items()]), ""]
    for section, rows in tables:
        page += [f"## {section}", "", markdown_table(rows), ""]
    if notes:
        page += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    RESULTS.mkdir(exist_ok=True)
    json_path = RESULTS / f"{stem}.json"
    for path, text in ((json_path, json.dumps(record, indent=2) + "\n"), (RESULTS / f"{stem}.md", "\n".join(page))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return json_path
