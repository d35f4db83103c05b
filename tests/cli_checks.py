"""Checks shared by the CLI tests: a command succeeded, or failed with one ``error:`` line; rich tables as rows."""

from __future__ import annotations


def succeeds(result) -> str:
    """Exit code 0; returns stdout."""
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result.stdout


def fails(result, *phrases: str) -> str:
    """Exit code 1 and exactly one ``error: ...`` line on stderr containing every phrase; returns the line."""
    assert result.exit_code == 1, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ")
    for phrase in phrases:
        assert phrase in line, line
    return line


def table_rows(stdout: str) -> list[list[str]]:
    """Body rows of the rich tables in ``stdout``, as stripped cells."""
    lines = [line for line in stdout.splitlines() if line.startswith("│")]
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines]
