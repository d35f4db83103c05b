"""What the MLflow UI shows for the registry, rewritten after every change (a registered version, a moved alias).

- every version's **description** in words (:mod:`fct_registry.registry.descriptions`): what it is, links to the
  versions it maps from and to and to its side-info, its measured scores, and the lineage picture; each registered
  model's description lists its versions;
- the **lineage graph** (:mod:`fct_registry.registry.lineage_plot`) as ``lineage.png``, with the text tree of
  ``fct-registry lineage`` as ``lineage.txt``, in one run of the ``fct-registry`` experiment (tag
  ``fct.kind = lineage of <prefix>-backbone``) once a transformation is registered, logged again only when the
  graph changed;
- the run that logged a version is **named after what it made** (``fct-transformation/2 · h-v2-v3: v2 + s1 -> v3``)
  and links to the version.

Only texts that changed are written, so publishing again is cheap and a registry filled before this module existed
gets its pages by one call of :func:`publish_pages`. Two processes registering at the same moment both publish; a
page may then miss the other's version until the next registration or alias move publishes again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fct_registry.registry import mlflow_store
from fct_registry.registry.chains import lineage_tree
from fct_registry.registry.descriptions import Catalog, describe, describe_model, run_note, run_title
from fct_registry.registry.lineage_plot import LineageArrow, LineageNode, draw_lineage
from fct_registry.registry.versions import ROLES, RegisteredVersion, transformation_edges

if TYPE_CHECKING:
    from fct_registry.registry.model_registry import ModelRegistry

LINEAGE_PNG, LINEAGE_TXT = "lineage.png", "lineage.txt"
DRAWING = 1
"""Bump when :func:`~fct_registry.registry.lineage_plot.draw_lineage` draws differently, so that stores redraw."""
SUBTITLE = "green: an alias points to it · mAP: target-model queries vs. the gallery upgraded by the arrow"


def publish_pages(registry: ModelRegistry, logged: RegisteredVersion | None = None) -> None:
    """Bring what the UI shows up to date with the registry (see the module docstring).

    Args:
        registry: The model registry.
        logged: A version just registered: its run is named after it first.
    """
    if logged is not None:
        mlflow_store.name_run(registry.store, logged, run_title(logged), run_note(logged))
    catalog = Catalog({role: registry.model_name(role) for role in ROLES},
                      {role: registry.versions(role) for role in ROLES})
    if catalog.versions["backbone"] and catalog.versions["transformation"]:  # a graph worth drawing
        nodes, arrows = lineage_graph(catalog)
        backbone = catalog.names["backbone"]
        title = f"Lineage of {backbone}: versions (boxes), transformations (arrows)"
        tree = lineage_text(catalog)
        drawn = [DRAWING, title, SUBTITLE, [asdict(n) for n in nodes], [asdict(a) for a in arrows], tree]
        digest = hashlib.sha256(json.dumps(drawn).encode()).hexdigest()

        def write(folder: Path) -> None:
            draw_lineage(nodes, arrows, folder / LINEAGE_PNG, title, SUBTITLE)
            (folder / LINEAGE_TXT).write_text(tree + "\n")

        note = (f"The lineage of **{backbone}**, drawn again whenever a transformation is registered or an alias "
                f"moves; artifacts `{LINEAGE_PNG}` and `{LINEAGE_TXT}`.\n\n```\n{tree}\n```")
        experiment, run_id = mlflow_store.keep_run_files(registry.store, f"lineage of {backbone}",
                                                         f"lineage of {backbone}", digest, write, note)
        # the digest in the URL makes a browser fetch the picture again once it changed
        catalog = replace(catalog, lineage_image=f"get-artifact?path={LINEAGE_PNG}&run_uuid={run_id}&v={digest[:12]}",
                          lineage_run=f"#/experiments/{experiment}/runs/{run_id}/artifacts/{LINEAGE_PNG}")
    for role in ROLES:
        if catalog.versions[role]:
            mlflow_store.set_descriptions(registry.store, catalog.names[role], describe_model(role, catalog),
                                          {v.version: describe(v, catalog) for v in catalog.versions[role]})


def lineage_graph(catalog: Catalog) -> tuple[list[LineageNode], list[LineageArrow]]:
    """Boxes for the backbone versions (label, registered version, aliases) and an arrow per transformation whose
    source and target are registered (label, registered version, side-info, mAP)."""
    backbones = catalog.versions["backbone"]
    nodes = [LineageNode(v.version, (v.ref.label, f"{v.name}/{v.version}", *(f"@{a}" for a in v.aliases)),
                         bool(v.aliases)) for v in backbones]
    arrows = []
    for t in catalog.versions["transformation"]:
        source = catalog.by_sha("backbone", t.tags.get("fct.source_sha256", ""))
        target = catalog.by_sha("backbone", t.tags.get("fct.target_sha256", ""))
        if source is None or target is None:
            continue
        side = f"+ {t.tags['fct.side_info_label']} · " if "fct.side_info_label" in t.tags else "no side-info · "
        score = f"mAP {float(t.tags['fct.map']):.3f}" if "fct.map" in t.tags else "mAP n/a"
        label = f"{t.ref.label}\n{t.name}/{t.version}\n{side}{score}"
        arrows.append(LineageArrow(source.version, target.version, label))
    return nodes, arrows


def lineage_text(catalog: Catalog) -> str:
    """The text tree of ``fct-registry lineage`` (:func:`~fct_registry.registry.chains.lineage_tree`)."""
    backbones = catalog.versions["backbone"]
    notes = {v.ref: " ".join([f"{v.name}/{v.version}", *(f"@{a}" for a in v.aliases)]) for v in backbones}
    return lineage_tree([v.ref for v in backbones], transformation_edges(catalog.versions["transformation"]), notes)
