"""The model version an embedding query states, checked against the served backbone.

An embedding sent to ``POST /search`` is only meaningful against a gallery made by the same model version (FCT:
Ramanujan et al., CVPR 2022, arXiv 2112.02805): a v2 vector searched among v3 vectors returns chance-level
neighbours, and when both models have the same dimension nothing else can tell. So a query may state its model,
named as everywhere in fct-registry (:meth:`~fct_registry.registry.model_registry.ModelRegistry.get`), plus the
two exact forms the service itself prints:

- ``"fct-backbone/3"``: registered model name and MLflow version number (as in ``str(RegisteredVersion)``);
- ``"3"``: the MLflow version number;
- ``"v3@3f2a9c0d1e4b"``: label and sha256 prefix (at least 12 hex digits) of the ONNX file, the
  :class:`~fct_registry.core.refs.ModelRef` form of ``/search``'s ``model`` and ``/info``'s ``gallery.model``;
- ``"v3"``: a label, the **newest** version with that label (so it may name a newer retrained ``v3`` than the served
  one; pin with one of the forms above);
- ``"@champion"``: whatever version the alias points to now.

The exact forms that name the served version are accepted without asking the registry; any other name is looked
up, so the refusal can name the version it is.
"""

from __future__ import annotations

import re

from fct_registry.core.errors import RegistryError, VersionMismatchError
from fct_registry.registry.model_registry import ModelRegistry
from fct_registry.registry.versions import RegisteredVersion

ROLE = "backbone"
_REF = re.compile(r"(?P<label>.+)@(?P<sha>[0-9a-f]{12,64})", re.DOTALL)
_NAMED = re.compile(r"(?P<name>[^/]+)/(?P<version>[0-9]{1,18})", re.DOTALL)
_NUMBER = re.compile(r"[0-9]{1,18}")


class UnknownQueryModel(RegistryError):
    """A query's stated model names no registered backbone version."""


def exact_names(version: RegisteredVersion) -> list[str]:
    """The names that pin ``version`` exactly, e.g. ``["fct-backbone/3", "3", "v3@3f2a9c0d1e4b"]``."""
    return [f"{version.name}/{version.version}", str(version.version), str(version.ref)]


def check_query_model(stated: str, served: RegisteredVersion, registry: ModelRegistry) -> None:
    """Refuse a query whose stated model is not the served backbone version.

    Args:
        stated: The query's ``model`` (see the module docstring for the forms).
        served: The backbone version being served.
        registry: Where other names are looked up.

    Raises:
        VersionMismatchError: ``stated`` names another registered version (names both).
        UnknownQueryModel: ``stated`` names no registered backbone version (names it and the accepted forms).
        RegistryError: The registry cannot be read.
    """
    if _names_exactly(stated, served):
        return
    claimed = _resolve(stated, served.name, registry)
    if claimed.ref != served.ref:
        raise VersionMismatchError(
            f"query embedding is from {claimed} ({stated!r}) but this service serves {served}; embed the query "
            f"with {served.name}/{served.version} or upload the image")


def _names_exactly(stated: str, served: RegisteredVersion) -> bool:
    ref = _REF.fullmatch(stated)
    if ref is not None:
        return ref["label"] == served.ref.label and served.ref.sha256.startswith(ref["sha"])
    return stated in exact_names(served)[:2]


def _resolve(stated: str, name: str, registry: ModelRegistry) -> RegisteredVersion:
    """The registered backbone version ``stated`` names (``name``: the backbones' registered model name)."""
    forms = (f"expected {name}/<version>, <version>, <label>@<sha256 prefix of 12+ hex>, <label> or @<alias> of a "
             f"registered {name} version")
    if stated.startswith("@"):
        try:
            return registry.resolve_alias(ROLE, stated[1:])
        except RegistryError as exc:
            raise UnknownQueryModel(f"query model {stated!r}: {exc}") from None
    named = _NAMED.fullmatch(stated)
    if named is not None and named["name"] != name:
        raise UnknownQueryModel(f"query model {stated!r} is not a {name} version; {forms}")
    known = registry.versions(ROLE)
    ref = _REF.fullmatch(stated)
    if named is not None or _NUMBER.fullmatch(stated):
        number = int(named["version"] if named is not None else stated)
        matches = [v for v in known if v.version == number]
    elif ref is not None:
        matches = [v for v in known if v.ref.label == ref["label"] and v.ref.sha256.startswith(ref["sha"])]
    else:
        matches = [v for v in known if v.ref.label == stated]
    if not matches:
        listed = ", ".join(f"{v.version} ({v.ref})" for v in known) or "none registered"
        raise UnknownQueryModel(f"query model {stated!r} is not a registered {name} version (known: {listed}); "
                                f"{forms}")
    return matches[-1]
