"""``fct-registry models ...`` and ``fct-registry lineage``: what is registered, adding a model, how versions
connect."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated, get_args

import typer

from fct_registry.cli.common import AsJson, console, named, print_json, row, table, version_json
from fct_registry.onnx_boundary.contract import InputContract
from fct_registry.registry.publishing import IMAGE_ROLES, METRICS
from fct_registry.registry.versions import ROLES, RegisteredVersion
from fct_registry.usecases import models as usecase

app = typer.Typer(no_args_is_help=True, help="Registered models (backbones, side-info, transformations).")
lineage_app = typer.Typer()


def _choices(name: str, values: Iterable[str]) -> type[Enum]:
    """A str Enum of ``values`` for Typer's choice options, built from the library's own list of values."""
    return Enum(name, {value: value for value in values}, type=str)


Role = _choices("Role", ROLES)
ImageRole = _choices("ImageRole", IMAGE_ROLES)
Metric = _choices("Metric", METRICS)
Color, Layout, Resize = (_choices(field.title(), get_args(InputContract.model_fields[field].annotation))
                         for field in ("color", "layout", "resize"))
Preset = _choices("Preset", usecase.PRESETS)


def _links(version: RegisteredVersion) -> str:
    tags = version.tags
    if "fct.source_label" not in tags:
        return ""
    side = f" + {tags['fct.side_info_label']}" if "fct.side_info_label" in tags else ""
    return f"{tags['fct.source_label']} -> {tags['fct.target_label']}{side}"


@app.command("list")
def models_list(
    ctx: typer.Context,
    role: Annotated[Role | None, typer.Option(help="Only this role.")] = None,
    as_json: AsJson = False,
) -> None:
    """List registered model versions with their identity, dim, aliases and links."""
    roles = [role.value] if role is not None else [r.value for r in Role]
    versions = usecase.list_models(ctx.obj.registry(), roles)
    if as_json:
        print_json([version_json(v) for v in versions])
        return
    listing = table("registered models", "role", "version", "label", "sha256", "dim", "links", "mAP", "contract")
    for v in versions:
        row(listing, v.role, named(v), v.ref.label, v.ref.sha256[:12], v.tags.get("fct.embedding_dim", ""),
            _links(v), f"{float(v.tags['fct.map']):.3f}" if "fct.map" in v.tags else "", usecase.contract_summary(v))
    console().print(listing)


def _value(option: Enum | None) -> str | None:
    return None if option is None else option.value


@app.command("add")
def models_add(
    ctx: typer.Context,
    role: Annotated[ImageRole, typer.Argument(help="Register the file as a backbone or a side-info model.")],
    file: Annotated[Path, typer.Argument(help="The ONNX file: one input (B, C, H, W) or (B, H, W, C) float32, "
                                              "one output (B, d) float32, symbolic batch axis B.")],
    label: Annotated[str, typer.Option(help="The version's label, e.g. v4 (not only digits).")],
    metric: Annotated[Metric, typer.Option(help="Distance its embeddings are searched with.")],
    normalized: Annotated[bool, typer.Option(help="Its output rows have unit L2 norm (checked).")] = False,
    preset: Annotated[Preset | None, typer.Option(
        help="Start from a named contract: imagenet (rgb 224x224 center_crop, ImageNet mean/std) or grayscale01 "
             "(grayscale in [0, 1]; give --height/--width); single options below override it.")] = None,
    contract: Annotated[Path | None, typer.Option(
        help="A JSON file with the whole input contract (excludes --preset and the single options).")] = None,
    height: Annotated[int | None, typer.Option(help="Input height H in pixels.")] = None,
    width: Annotated[int | None, typer.Option(help="Input width W in pixels.")] = None,
    color: Annotated[Color | None, typer.Option(help="grayscale (C = 1) or rgb (C = 3).")] = None,
    layout: Annotated[Layout | None, typer.Option(help="Input axis order (default: nchw).")] = None,
    resize: Annotated[Resize | None, typer.Option(
        help="stretch to H x W, or resize the shorter side and crop the centre (default: stretch).")] = None,
    pixel_range: Annotated[float | None, typer.Option(
        help="uint8 pixels are divided by this first (255 -> [0, 1]) (default: 255).")] = None,
    mean: Annotated[list[float] | None, typer.Option(
        help="Per-channel mean subtracted after scaling; repeat once per channel (default: 0).")] = None,
    std: Annotated[list[float] | None, typer.Option(
        help="Per-channel std divided by after the mean; repeat once per channel (default: 1).")] = None,
    description: Annotated[str | None, typer.Option(help="Free text stored with the version.")] = None,
) -> None:
    """Validate a user's ONNX image embedding model against its input contract, then register it.

    Idempotent: the same bytes under the same label give the same version. A file that fails a check writes
    nothing.
    """
    chosen = usecase.build_contract(
        preset=_value(preset), contract_file=contract, height=height, width=width, color=_value(color),
        layout=_value(layout), resize=_value(resize), pixel_range=pixel_range,
        mean=tuple(mean) if mean else None, std=tuple(std) if std else None)
    version = usecase.add_model(ctx.obj.registry(), file, role.value, label, chosen, metric.value, normalized,
                                description)
    console().print(f"registered {named(version)}: label {version.ref.label}, sha256 {version.ref.sha256[:12]}, "
                    f"dim {version.tags.get('fct.embedding_dim', '?')}, contract {usecase.contract_summary(version)}"
                    f", metric {version.tags.get('fct.metric', '?')}", markup=False)


@lineage_app.command()
def lineage(ctx: typer.Context, as_json: AsJson = False) -> None:
    """Show which backbone version came from which, through which transformation (a text tree)."""
    registry = ctx.obj.registry()
    if as_json:
        print_json({"backbones": [version_json(v) for v in registry.versions("backbone")],
                    "transformations": [{"transformation": e.transformation, "source": e.source, "target": e.target,
                                         "side_info": e.side_info, "map": e.map}
                                        for e in registry.transformation_edges()]})
        return
    tree = usecase.lineage_text(registry)
    console().print(tree or "no backbone registered", markup=False)
