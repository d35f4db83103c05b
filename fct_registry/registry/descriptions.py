"""What a registered version says about itself in the MLflow UI: its description in words (Markdown).

Pure functions of the registered versions and their tags (:mod:`fct_registry.registry.versions`): a backbone says
what it embeds and how (input contract, dim, metric), which transformations upgrade its galleries from and to which
versions; a side-info model which transformations read it; a transformation (FCT: Ramanujan et al., CVPR 2022, arXiv
2112.02805) which versions it maps from and to, with which side-info, and its measured scores. Every other version
is named with a link to its page (the UI's route ``#/models/<name>/versions/<n>``, relative to the server, so it
works behind any host); the lineage picture (:mod:`fct_registry.registry.lineage_plot`) is embedded from the run that
holds it (the server's ``get-artifact`` endpoint). :mod:`fct_registry.registry.pages` writes the texts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fct_registry.core.errors import DataError
from fct_registry.onnx_boundary.contract import CONTRACT_TAG, parse_contract
from fct_registry.registry.versions import RegisteredVersion

SCORES = {"cmc_top1": "CMC top-1", "cmc_top5": "CMC top-5", "map": "mAP"}
"""Cross-model retrieval scores a transformation carries (``fct.<key>``), fractions in [0, 1]."""
FLIPS = {"negative_flips": "negative flip rate", "positive_flips": "positive flip rate"}
"""Per-query regressions a transformation carries (``fct.<key>``, fractions; Yan et al., CVPR 2021)."""
MEASURES = {**SCORES, "knn_overlap": "kNN overlap", "train_accuracy": "training accuracy",
            "train_loss": "training loss", "seconds": "training time (s)"}
"""Tags shown as measured numbers when a version has them, with their names in words."""
ROLE_WORDS = {"backbone": "Backbone", "side-info": "Side-info model", "transformation": "Forward transformation"}


@dataclass(frozen=True)
class Catalog:
    """Everything registered, as the UI pages need it.

    Attributes:
        names: Role -> registered model name (``fct-backbone``, ...).
        versions: Role -> its versions, oldest first.
        lineage_image: URL of the lineage PNG (relative to the server), or "" when there is none.
        lineage_run: URL of the run page that holds it, or "".
    """

    names: Mapping[str, str]
    versions: Mapping[str, Sequence[RegisteredVersion]]
    lineage_image: str = ""
    lineage_run: str = ""

    def by_sha(self, role: str, sha256: str) -> RegisteredVersion | None:
        """The version of ``role`` whose ONNX bytes have ``sha256`` (None when none is registered)."""
        return next((v for v in self.versions.get(role, ()) if v.ref.sha256 == sha256), None)

    def reading(self, tag: str, version: RegisteredVersion) -> list[RegisteredVersion]:
        """The transformations whose ``fct.<tag>_sha256`` is ``version``'s (``tag``: source, target, side_info)."""
        return [t for t in self.versions.get("transformation", ())
                if t.tags.get(f"fct.{tag}_sha256") == version.ref.sha256]


def page_url(name: str, version: int | str) -> str:
    """The MLflow UI's page of a model version, relative to the server: ``#/models/<name>/versions/<n>``."""
    return f"#/models/{name}/versions/{version}"


def link(version: RegisteredVersion) -> str:
    """``**v2** ([fct-backbone version 2](#/models/fct-backbone/versions/2))``."""
    url = page_url(version.name, version.version)
    return f"**{version.ref.label}** ([{version.name} version {version.version}]({url}))"


def describe(version: RegisteredVersion, catalog: Catalog) -> str:
    """The Markdown description of one version (see the module docstring)."""
    body = {"backbone": _backbone, "side-info": _side_info, "transformation": _transformation}[version.role]
    parts = [*body(version, catalog), *_provenance(version), _lineage(catalog)]
    return "\n\n".join(part for part in parts if part)


def describe_model(role: str, catalog: Catalog) -> str:
    """The Markdown description of a registered model (all versions of a role)."""
    names = catalog.names
    intro = {
        "backbone": f"Backbones: the image embedding models. A gallery stored with one version is upgraded to "
                    f"a newer one by the forward transformations of [{names['transformation']}]"
                    f"(#/models/{names['transformation']}) (the arrows below), without reading any image again.",
        "side-info": f"Side-info models: self-supervised image models whose vectors are stored beside a "
                     f"gallery's embeddings when it is written; the transformations of "
                     f"[{names['transformation']}](#/models/{names['transformation']}) read them to upgrade it.",
        "transformation": f"Forward transformations (FCT, Ramanujan et al., CVPR 2022): each maps the stored "
                          f"embeddings of one [{names['backbone']}](#/models/{names['backbone']}) version (plus "
                          f"side-info) into the space of a newer one; chained, they upgrade a gallery v1 -> v2 -> v3.",
    }[role]
    listed = [f"- {link(v)}{_summary(v, catalog)}" for v in catalog.versions.get(role, ())]
    return "\n\n".join(part for part in (intro, "\n".join(listed), _lineage(catalog)) if part)


def run_title(version: RegisteredVersion) -> str:
    """The name of the run that logged a version, after what it made: ``fct-backbone/3 · backbone v3``,
    ``fct-transformation/2 · h-v2-v3: v2 + s1 -> v3``."""
    tags = version.tags
    if version.role == "transformation":
        side = f" + {tags['fct.side_info_label']}" if "fct.side_info_label" in tags else ""
        what = f"{version.ref.label}: {tags.get('fct.source_label', '?')}{side} -> {tags.get('fct.target_label', '?')}"
    else:
        what = f"{version.role} {version.ref.label}"
    return f"{version.name}/{version.version} · {what}"


def run_note(version: RegisteredVersion) -> str:
    """The description of the run that logged a version: a link to the version's page."""
    return (f"Logged the ONNX file registered as [{version.name} version {version.version}]"
            f"({page_url(version.name, version.version)}) ({ROLE_WORDS[version.role].lower()} "
            f"{version.ref.label}); its description there says what it is and how it connects.")


def _backbone(version: RegisteredVersion, catalog: Catalog) -> list[str]:
    tags = version.tags
    lines = [f"{ROLE_WORDS['backbone']} {version.ref.label}: an image embedding model.{_own_words(tags)}",
             _image_model(tags)]
    arrivals = [_hop("from", t, catalog.by_sha("backbone", t.tags.get("fct.source_sha256", ""))) for t in
                catalog.reading("target", version)]
    departures = [_hop("to", t, catalog.by_sha("backbone", t.tags.get("fct.target_sha256", ""))) for t in
                  catalog.reading("source", version)]
    if arrivals or departures:
        lines.append("\n".join([*arrivals, *departures]))
    else:
        lines.append("No registered transformation reads or writes this version: a gallery stored with it can only "
                     "be re-embedded from its images.")
    return [*lines, _measured(tags)]


def _side_info(version: RegisteredVersion, catalog: Catalog) -> list[str]:
    tags = version.tags
    users = catalog.reading("side_info", version)
    used = ("\n".join(f"- read by transformation {link(t)}{_summary(t, catalog)}" for t in users) if users else
            "No registered transformation reads it yet.")
    return [f"{ROLE_WORDS['side-info']} {version.ref.label}: its vectors are stored beside a gallery's "
            f"embeddings when the gallery is written, so that a later transformation can upgrade the gallery "
            f"without reading any image.{_own_words(tags)}", _image_model(tags), used, _measured(tags)]


def _transformation(version: RegisteredVersion, catalog: Catalog) -> list[str]:
    tags = version.tags
    source = catalog.by_sha("backbone", tags.get("fct.source_sha256", ""))
    target = catalog.by_sha("backbone", tags.get("fct.target_sha256", ""))
    side = catalog.by_sha("side-info", tags.get("fct.side_info_sha256", ""))
    source_text = link(source) if source else f"**{tags.get('fct.source_label', '?')}** (not registered)"
    target_text = link(target) if target else f"**{tags.get('fct.target_label', '?')}** (not registered)"
    with_side = (f", with the vectors of side-info model {link(side)} stored beside them," if side else
                 " alone (no side-info),")
    lines = [f"{ROLE_WORDS['transformation']} {version.ref.label}: it maps the stored embeddings of backbone "
             f"{source_text}{with_side} into the embedding space of backbone {target_text}, so a gallery stored "
             f"with {tags.get('fct.source_label', '?')} is upgraded to {tags.get('fct.target_label', '?')} "
             f"without reading any image.{_own_words(tags)}"]
    inputs = _shapes(tags)
    if inputs:
        lines.append(f"Reads {inputs}; writes `embedding` (batch, {tags.get('fct.embedding_dim', '?')}) in "
                     f"{tags.get('fct.target_label', '?')}'s space (float32; the schema below).")
    scores = [f"{word} **{float(tags[f'fct.{key}']):.3f}**" for key, word in SCORES.items() if f"fct.{key}" in tags]
    if scores:
        seed = f" (this file: seed {tags['fct.seed']})" if "fct.seed" in tags else ""
        lines.append(f"Measured{seed}: {tags.get('fct.target_label', '?')} queries against a gallery upgraded by "
                     f"it: {', '.join(scores)}.{_spread(tags)}")
    else:
        lines.append("No retrieval scores were measured for it.")
    lines.append(_flips(tags))
    return [*lines, _measured(tags, exclude=SCORES)]


def _flips(tags: Mapping[str, str]) -> str:
    """The negative flip rate in words (empty when the version has none)."""
    try:
        negative = float(tags["fct.negative_flips"])
    except (KeyError, ValueError):
        return ""
    positive = f" (and {float(tags['fct.positive_flips']):.3f} the other way, wrong before and right after)" if (
        "fct.positive_flips" in tags) else ""
    return (f"Negative flip rate **{negative:.3f}**: the share of queries whose nearest neighbour had the right class "
            f"before the update ({tags.get('fct.source_label', '?')} searching its own gallery) and the wrong one "
            f"after it ({tags.get('fct.target_label', '?')} queries against the upgraded gallery){positive}; "
            "Positive-Congruent Training, Yan et al., CVPR 2021.")


def _summary(version: RegisteredVersion, catalog: Catalog) -> str:
    """A short tail for a list item: a transformation's hop and mAP, an image model's dim."""
    tags = version.tags
    if version.role == "transformation":
        side = f" + {tags['fct.side_info_label']}" if "fct.side_info_label" in tags else ""
        score = f", mAP {float(tags['fct.map']):.3f}" if "fct.map" in tags else ""
        score += f", negative flips {float(tags['fct.negative_flips']):.3f}" if "fct.negative_flips" in tags else ""
        return f": {tags.get('fct.source_label', '?')}{side} -> {tags.get('fct.target_label', '?')}{score}"
    aliases = f", alias {', '.join(version.aliases)}" if version.aliases else ""  # "@name" would become a link
    return f": {tags['fct.embedding_dim']}-d{aliases}" if "fct.embedding_dim" in tags else aliases


def _hop(direction: str, transformation: RegisteredVersion, other: RegisteredVersion | None) -> str:
    tags = transformation.tags
    end = "source" if direction == "from" else "target"
    other_text = link(other) if other else f"**{tags.get(f'fct.{end}_label', '?')}** (not registered)"
    side = f" (reads side-info {tags['fct.side_info_label']}" if "fct.side_info_label" in tags else " (no side-info"
    score = f", mAP {float(tags['fct.map']):.3f})" if "fct.map" in tags else ")"
    how = f"by transformation {link(transformation)}{side}{score}"
    if direction == "from":
        return f"- a gallery stored with {other_text} is upgraded to this version {how}"
    return f"- a gallery stored with this version is upgraded to {other_text} {how}"


def _image_model(tags: Mapping[str, str]) -> str:
    """Input contract, output dim, metric and normalisation of an image model, in words."""
    parts = []
    if CONTRACT_TAG in tags:
        try:
            c = parse_contract(tags[CONTRACT_TAG], "")
        except DataError:
            c = None
        if c is not None:
            mean, std = ", ".join(f"{m:g}" for m in c.mean), ", ".join(f"{s:g}" for s in c.std)
            scaled = "" if set(c.mean) == {0.0} and set(c.std) == {1.0} else f", then (x − {mean}) / {std}"
            parts.append(f"Images: {c.height}×{c.width} {c.color}, {c.layout.upper()}, resized by {c.resize}, "
                         f"pixels / {c.pixel_range:g}{scaled}.")
    inputs = _shapes(tags)
    if inputs:
        parts.append(f"Reads {inputs}.")
    if "fct.embedding_dim" in tags:
        normalized = "L2-normalised" if tags.get("fct.normalized") == "true" else "not normalised"
        metric = {"l2": "L2 distance", "cosine": "cosine similarity"}.get(tags.get("fct.metric", ""), "?")
        parts.append(f"Writes `embedding` (batch, {tags['fct.embedding_dim']}), {normalized}, searched by {metric}.")
    return " ".join(parts)


def _shapes(tags: Mapping[str, str]) -> str:
    """``fct.inputs`` (name -> trailing shape) as ```image` (batch, 1, 28, 28)``."""
    try:
        inputs = json.loads(tags.get("fct.inputs", "{}"))
    except ValueError:
        return ""
    if not isinstance(inputs, dict):
        return ""
    return " and ".join(f"`{name}` (batch, {', '.join(str(d) for d in shape)})" for name, shape in inputs.items()
                        if isinstance(shape, list))


def _own_words(tags: Mapping[str, str]) -> str:
    return f" {tags['fct.description']}" if tags.get("fct.description") else ""


def _spread(tags: Mapping[str, str]) -> str:
    """`` Over seeds 0, 1, 2: CMC top-1 0.864 ± 0.002, ...`` from ``fct.seed_spread`` (empty when absent)."""
    try:
        spread = json.loads(tags.get("fct.seed_spread", "{}"))
    except ValueError:
        return ""
    if not isinstance(spread, dict) or not spread.get("seeds"):
        return ""
    parts = []
    for key, word in {**SCORES, "negative_flips": FLIPS["negative_flips"]}.items():
        if f"{key}_mean" in spread:
            std = f" ± {float(spread[f'{key}_std']):.3f}" if f"{key}_std" in spread else ""
            parts.append(f"{word} {float(spread[f'{key}_mean']):.3f}{std}")
    seeds = ", ".join(str(s) for s in spread["seeds"])
    return f" Over seeds {seeds} of the same recipe: {', '.join(parts)}." if parts else ""


def _measured(tags: Mapping[str, str], exclude: Mapping[str, str] | None = None) -> str:
    """Other measured numbers (training accuracy, loss, time) in one line, when the version has them."""
    shown = []
    for key, word in MEASURES.items():
        if f"fct.{key}" in tags and key not in (exclude or {}):
            try:
                shown.append(f"{word} {float(tags[f'fct.{key}']):.3g}")
            except ValueError:
                continue
    return f"Measured when it was trained: {', '.join(shown)}." if shown else ""


def _provenance(version: RegisteredVersion) -> list[str]:
    tags = version.tags
    origin = {"pipeline": "Trained by the project's DVC pipeline", "user": "Added by a user (`fct-registry models add` "
              "or `fit`)"}.get(tags.get("fct.origin", ""), "Registered")
    facts = [f"ONNX sha256 `{version.ref.sha256[:12]}`"]
    if tags.get("fct.data_hash"):
        facts.append(f"training data `{tags['fct.data_hash'][:12]}`")
    if tags.get("fct.git_commit"):
        facts.append(f"git commit `{tags['fct.git_commit'][:12]}`")
    params = tags.get("fct.params", "{}")
    shown = f"; params `{params}`" if params != "{}" and len(params) <= 200 else (
        "; params in the `fct.params` tag" if params != "{}" else "")
    return [f"{origin}: {', '.join(facts)}{shown}. Every fact above is also a `fct.*` tag below."]


def _lineage(catalog: Catalog) -> str:
    if not catalog.lineage_image:
        return ""
    return (f"**Lineage** (boxes: backbone versions; arrows: transformations with their mAP; "
            f"[the run that holds it]({catalog.lineage_run})):\n\n![lineage of the backbone versions]"
            f"({catalog.lineage_image})")
