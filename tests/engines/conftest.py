"""Fixtures of the engine tests."""

from __future__ import annotations

import pytest
from engine_world import Exported, export_models


@pytest.fixture(scope="session")
def h(tmp_path_factory) -> dict[str, Exported]:
    """The tiny transformations of :func:`engine_world.export_models`, exported once per session."""
    return export_models(tmp_path_factory.mktemp("onnx"))
