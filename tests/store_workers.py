"""Worker processes for the registry-store concurrency tests: each runs CLI commands in lock step with the others.

Kept in a plain module (not a test file) so that ``multiprocessing``'s spawn start method can import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def run_in_lock_step(worker: int, argvs: Sequence[Sequence[str]], barrier: Any, results: Any) -> None:
    """Run each argv through the CLI after every worker has reached ``barrier``; put
    ``(worker, round, exit code, stdout, stderr)`` on ``results`` for each. Imports happen before the first barrier, so
    the commands themselves start together."""
    from typer.testing import CliRunner

    from fct_registry.cli.app import app

    runner = CliRunner(env={"COLUMNS": "250", "FCT_REGISTRY_DEBUG": "0"})
    for round_number, argv in enumerate(argvs):
        barrier.wait(timeout=600)
        result = runner.invoke(app, list(argv))
        results.put((worker, round_number, result.exit_code, result.stdout, result.stderr))
