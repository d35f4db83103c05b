"""The options of the search index (``serving:`` of params.yaml), shared by ``fct-registry serve`` and ``fct-registry
sets index``: each one left out keeps the params.yaml value (or the default without a params.yaml)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer


class Kind(str, Enum):
    """Search index kinds (``serving.index``)."""

    exact = "exact"
    ivf = "ivf"
    ivfpq = "ivfpq"
    hnsw = "hnsw"


def _option(help_text: str, *names: str) -> Any:
    return typer.Option(*names, help=f"{help_text} Default: params.yaml serving.", show_default=False)


IndexKind = Annotated[Kind | None, _option("exact, ivf (IVF-Flat), ivfpq (IVF-PQ, compressed) or hnsw.", "--index")]
Nlist = Annotated[int | None, _option("IVF cells (k-means); unset: sqrt(gallery size) as a power of two.")]
Nprobe = Annotated[int | None, _option("IVF cells scanned per query.")]
PqM = Annotated[int | None, _option("ivfpq: bytes per item (sub-quantizers; must divide the dim).")]
PqNbits = Annotated[int | None, _option("ivfpq: bits per sub-quantizer code.")]
HnswM = Annotated[int | None, _option("hnsw: links per node.")]
EfConstruction = Annotated[int | None, _option("hnsw: candidate list while building.")]
EfSearch = Annotated[int | None, _option("hnsw: candidate list per query.")]
TrainSize = Annotated[int | None, _option("IVF kinds: vectors k-means and PQ train on; unset: 64 per centroid.")]
RecallQueries = Annotated[int | None, _option("Held-out items of the set recall@10 is measured on.")]


def overrides(index: Kind | None, **knobs: int | None) -> dict[str, Any]:
    """The options as keyword arguments of :func:`~fct_registry.usecases.gallery_index.serving_params`."""
    return {"index": None if index is None else index.value, **knobs}
