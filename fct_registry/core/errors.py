"""Domain errors of fct-registry.

Every error carries a one-line message that names the bad value and what was
expected, so the CLI can print ``str(error)`` to stderr and exit non-zero.
"""

from __future__ import annotations


class FctError(Exception):
    """Base class of every error raised on purpose by fct-registry."""


class ConfigError(FctError):
    """A params.yaml section or CLI option is missing, unknown or of the wrong type."""


class DataError(FctError):
    """A data file is missing, truncated or has unexpected shapes or labels."""


class EmbeddingSetError(FctError):
    """An embedding set on disk is malformed: bad manifest, checksum, dims or values."""


class VersionMismatchError(FctError):
    """Vectors of two different model versions were about to be compared or mixed."""


class ExportError(FctError):
    """An ONNX export failed its checks (training mode, axes, parity with PyTorch)."""


class ModelValidationError(FctError):
    """An ONNX model file does not meet the registry's contract (inputs, output, values, batch consistency)."""


class RuntimeInputError(FctError):
    """An ONNX Runtime session was fed inputs of the wrong names, shapes or types."""


class RegistryError(FctError):
    """The model registry cannot resolve a model version, alias or tag."""


class ChainError(FctError):
    """No chain of forward transformations joins two backbone versions."""


class UpgradeError(FctError):
    """An upgrade of an embedding set cannot run (nothing was written)."""


class SearchError(FctError):
    """A retrieval request has bad shapes, k or metric."""


def report_errors_in_one_line() -> None:
    """Make an uncaught :class:`FctError` print ``error: <message>`` to stderr and exit with status 1.

    Stage scripts call this first, so a bad input ends a ``dvc repro`` with one clear line instead of a
    traceback; any other exception keeps Python's usual traceback.
    """
    import sys

    previous = sys.excepthook

    def hook(kind, value, traceback):
        if isinstance(value, FctError):
            print(f"error: {value}", file=sys.stderr)
            sys.exit(1)
        previous(kind, value, traceback)

    sys.excepthook = hook
