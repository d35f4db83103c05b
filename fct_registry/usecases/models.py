"""Use cases of ``fct-registry models`` and ``lineage``: what is registered, adding a model, how versions connect."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fct_registry.core.errors import ConfigError, DataError
from fct_registry.core.refs import ModelRef
from fct_registry.onnx_boundary.contract import (
    CONTRACT_TAG,
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputContract,
    contract_from_fields,
    parse_contract,
)
from fct_registry.onnx_boundary.validation import validate_image_model
from fct_registry.registry.chains import lineage_tree
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.publishing import IMAGE_ROLES, METRICS, register_image_model
from fct_registry.registry.versions import ROLES, RegisteredVersion, file_sha256

PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": {"height": 224, "width": 224, "color": "rgb", "layout": "nchw", "resize": "center_crop",
                 "pixel_range": 255.0, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "grayscale01": {"color": "grayscale", "layout": "nchw", "resize": "stretch", "pixel_range": 255.0,
                    "mean": (0.0,), "std": (1.0,)},
}
"""Named input contracts: ``imagenet`` (torchvision's RGB 224x224, centre crop, ImageNet mean/std) and
``grayscale01`` (grayscale scaled to [0, 1], the project's own models; give height and width)."""
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def list_models(registry: ModelRegistry, roles: Sequence[str] = ROLES) -> list[RegisteredVersion]:
    """Every registered version of ``roles``, grouped by role (in the order given), oldest first.

    Raises:
        RegistryError: an unknown role.
    """
    return [version for role in roles for version in registry.versions(role)]


def lineage_text(registry: ModelRegistry) -> str:
    """Text tree of backbone versions and the transformations between them (see :func:`chains.lineage_tree`).

    Each version's line carries its registered model version and aliases, e.g. ``fct-backbone/3 @champion``.

    Raises:
        RegistryError: a transformation version lacks its source/target tags.
    """
    backbones = registry.versions("backbone")
    notes = {v.ref: " ".join([f"{v.name}/{v.version}", *(f"@{a}" for a in v.aliases)]) for v in backbones}
    return lineage_tree([v.ref for v in backbones], registry.transformation_edges(), notes)


def build_contract(preset: str | None = None, contract_file: str | os.PathLike | None = None,
                   **fields: Any) -> InputContract:
    """An input contract from a JSON file, or from a preset overridden by single fields.

    Args:
        preset: A key of :data:`PRESETS`, or None.
        contract_file: A JSON file holding a contract (see
            :class:`~fct_registry.onnx_boundary.contract.InputContract`); excludes ``preset`` and ``fields``.
        **fields: ``InputContract`` fields (``height``, ``width``, ``color``, ``layout``, ``resize``,
            ``pixel_range``, ``mean``, ``std``); None values are ignored.

    Raises:
        ConfigError: an unknown preset, or a contract file together with a preset or fields.
        DataError: the contract file cannot be read, or the contract is incomplete or invalid (names the field and
            the problem).
    """
    given = {key: value for key, value in fields.items() if value is not None}
    if contract_file is not None:
        if preset is not None or given:
            raise ConfigError(f"a contract file ({contract_file}) excludes a preset and single fields "
                              f"(got preset {preset}, fields {sorted(given)})")
        try:
            text = Path(contract_file).read_text()
        except OSError as exc:
            raise DataError(f"cannot read contract file {contract_file}: {exc.strerror}") from None
        return parse_contract(text, str(contract_file))
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown contract preset {preset!r}; expected one of {', '.join(PRESETS)}")
    values = {**PRESETS.get(preset or "", {}), **given}
    return contract_from_fields(values)


def add_model(registry: ModelRegistry, path: str | os.PathLike, role: str, label: str, contract: InputContract,
              metric: str, normalized: bool, description: str | None = None) -> RegisteredVersion:
    """Register a user's ONNX image embedding model (backbone or side-info) after checking it against ``contract``.

    The file is validated by :func:`~fct_registry.onnx_boundary.validation.validate_image_model` before the
    registry is opened, so a bad file writes nothing. It is then registered by
    :func:`~fct_registry.registry.publishing.register_image_model` with ``fct.origin`` ``user``, its contract,
    dim, inputs, metric, normalisation, source file name, measured batch consistency and description.

    Args:
        registry: The model registry.
        path: The ``.onnx`` file: one input (B, C, H, W) or (B, H, W, C) float32 prepared as ``contract`` says, one
            output (B, d) float32.
        role: ``backbone`` or ``side-info``.
        label: The project's label of the version, e.g. ``v4`` (letters, digits, ``.``, ``_``, ``-``; not only
            digits, which name MLflow version numbers).
        contract: How images are prepared for the model.
        metric: ``l2`` or ``cosine``, the distance its embeddings are searched with.
        normalized: Its output rows have unit L2 norm (checked on the probe batch).
        description: Free text, stored as the ``fct.description`` tag.

    Returns:
        The new version, or the one already registered with the same bytes and label (idempotent).

    Raises:
        ConfigError: an unknown role or metric, or a bad label.
        ModelValidationError: the file fails validation (one line naming the file, the problem and the expectation).
        RegistryError: the same bytes are registered under another label or with another contract, or MLflow
            refuses the version.
    """
    if role not in IMAGE_ROLES:
        raise ConfigError(f"role {role!r} cannot be added from a file; expected one of {', '.join(IMAGE_ROLES)}")
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    if not LABEL_PATTERN.match(label) or label.isdigit():
        raise ConfigError(f"label {label!r} must start with a letter or digit, use only letters, digits, '.', '_' "
                          "and '-', and not be all digits (those are MLflow version numbers)")
    result = validate_image_model(path, contract, normalized=normalized)
    tags: dict[str, Any] = {"source_file": Path(path).name, "batch_max_rel_diff": result.max_batch_diff}
    if description:
        tags["description"] = description
    ref = ModelRef(label=label, sha256=file_sha256(path))
    return register_image_model(registry, path, role, ref, contract, result.embedding_dim,
                                {result.input_name: list(contract.input_shape)}, metric, normalized, "user",
                                tags=tags)


def contract_summary(version: RegisteredVersion) -> str:
    """A version's input contract in brief, e.g. ``"rgb 224x224 nchw"`` (``center_crop`` appended when used);
    ``""`` when it has none (a transformation, or an image model registered before contracts), ``"invalid"`` when
    its tag cannot be read."""
    if CONTRACT_TAG not in version.tags:
        return ""
    try:
        contract = parse_contract(version.tags[CONTRACT_TAG], str(version))
    except DataError:
        return "invalid"
    crop = " center_crop" if contract.resize == "center_crop" else ""
    return f"{contract.color} {contract.height}x{contract.width} {contract.layout}{crop}"
