"""Identity of a model version, shared by every layer: a label plus the sha256 of its ONNX file."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ModelRef(BaseModel):
    """Identity of one model version: the project's logical label plus the sha256 of its ONNX file.

    Two refs are the same model iff ``label`` and ``sha256`` are both equal; ``str(ref)`` is
    ``"<label>@<first 12 hex of sha256>"``, e.g. ``"v1@3f2a9c0d1e4b"``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    label: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    def __str__(self) -> str:
        return f"{self.label}@{self.sha256[:12]}"
