"""Typed parameters: pydantic models that mirror the sections of ``params.yaml``.

Every model forbids unknown keys, so a typo in ``params.yaml`` is an error naming the key
instead of a silently ignored setting (a known defect of configs kept as raw dicts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

from fct_registry.core.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    """Where the images come from and how many are used (``data:``)."""

    source: Literal["fashion_mnist", "image_folder"] = "fashion_mnist"
    fashion_mnist_dir: Path | None = None
    image_folder: Path | None = None
    image_size: PositiveInt = 28
    train_limit: PositiveInt | None = None
    test_limit: PositiveInt | None = None

    @model_validator(mode="after")
    def _folder_given(self) -> DataParams:
        if self.source == "image_folder" and self.image_folder is None:
            raise ValueError("data.source is 'image_folder' but data.image_folder is not set")
        return self


class ProtocolParams(_Section):
    """How the old model's task differs from the new one's (``protocol:``).

    ``class_subset`` (FCT paper, Sec. 5.1): the old model sees only ``old_classes``.
    ``coarse_to_fine``: the old model learns 4 coarse labels (:data:`fct_registry.method.data.FASHION_MNIST_COARSE`).
    Retrieval is always scored on the fine labels.
    """

    name: Literal["class_subset", "coarse_to_fine"] = "class_subset"
    old_classes: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])


class BackboneParams(_Section):
    """One embedding backbone and its supervised training (``old:``, ``new:``, ``v3:``, ``bct:``)."""

    version: str
    arch: Literal["small_cnn", "cnn", "resnet"]
    width: PositiveInt = 32
    embedding_dim: PositiveInt = 128
    epochs: PositiveInt = 3
    batch_size: PositiveInt = 128
    lr: PositiveFloat = 1e-3
    weight_decay: float = Field(default=5e-4, ge=0)
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    augment: bool = True


class BctParams(_Section):
    """Backward compatible training baseline (Shen et al., CVPR 2020, Sec. 3): ``loss = CE + lambda * influence``."""

    backbone: BackboneParams
    influence_weight: float = Field(default=1.0, ge=0)


class SideInfoParams(_Section):
    """Self-supervised side-information model (SimCLR, Chen et al. 2020), ``side_info:``."""

    version: str = "s1"
    arch: Literal["small_cnn", "cnn"] = "small_cnn"
    """Encoder: ``small_cnn`` (2 conv blocks: width, 2 width channels) or ``cnn`` (3 blocks: width, 2 width,
    4 width), see :mod:`fct_registry.method.models.backbone`."""
    width: PositiveInt = 32
    embedding_dim: PositiveInt = 128
    projection_dim: PositiveInt = 64
    temperature: PositiveFloat = 0.5
    epochs: PositiveInt = 3
    batch_size: PositiveInt = 256
    lr: PositiveFloat = 1e-3


class TransformationParams(_Section):
    """Forward transformation h(old, side-info) -> new (FCT paper, Sec. 4; ml-fct design), ``transformation:``."""

    hidden_dim: PositiveInt = 512
    epochs: PositiveInt = 15
    batch_size: PositiveInt = 256
    lr: PositiveFloat = 5e-4
    weight_decay: float = Field(default=0.0, ge=0)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    training_data: Literal["cached_features", "augmented"] = "cached_features"
    loss: Literal["mse", "fastfill"] = "mse"
    """``mse``: FCT's MSE to the new embedding. ``fastfill``: FastFill's uncertainty-weighted MSE + classification
    loss (Jaeckle et al., ICLR 2023, Sec. 4); h then also outputs sigma and needs the new backbone's classifier."""
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    """FastFill's classification term: label smoothing of the cross-entropy of the frozen new classifier on h."""


class BackfillParams(_Section):
    """FastFill's backfill curves (``backfill:``; Jaeckle et al., ICLR 2023, Sec. 5): the stage's cost and protocol.

    ``points``: fractions i / (points - 1), 22 in the paper. ``queries``: test items sampled (seeded) as queries of
    each curve point, the gallery being the whole test split. ``oracle_seeds``: how many seeds of h get the
    reference curves (``fastfill_random``, ``distance_oracle``); the target curves use every seed.
    """

    points: int = Field(default=22, ge=2)
    queries: PositiveInt = 2000
    seed: int = 0
    oracle_seeds: PositiveInt = 1


class EvaluationParams(_Section):
    """Retrieval evaluation (``evaluation:``): metric and CMC ranks."""

    metric: Literal["l2", "cosine"] = "l2"
    top_k: list[PositiveInt] = Field(default_factory=lambda: [1, 5])
    batch_size: PositiveInt = 1024


class RegistryParams(_Section):
    """MLflow registry (``registry:``); ``tracking_uri: null`` means the embedded SQLite store under registry/."""

    tracking_uri: str | None = None
    champion_alias: str = "champion"
    promote_map_floor: float = Field(default=0.0, ge=0, le=1)
    promote_negative_flip_ceiling: float | None = Field(default=None, ge=0, le=1)
    """Largest registered negative flip rate (``fct.negative_flips``) a chain's link may have; None: no ceiling."""



class ServingParams(_Section):
    """The search index of ``fct-registry serve`` (``serving:``): exact, or an approximate faiss index built once per
    set and stored beside it (:mod:`fct_registry.vectors.ann_index`). Compatibility metrics never use it.

    ``index``: ``exact`` (faiss IndexFlat, every item scored), ``ivf`` (IVF-Flat: Jegou et al., TPAMI 2011 inverted
    lists over k-means cells), ``ivfpq`` (IVF with product-quantized residuals, Jegou et al., TPAMI 2011: ``pq_m``
    bytes per item with 8-bit codes) or ``hnsw`` (HNSW graph, Malkov & Yashunin, TPAMI 2018).
    Build knobs (change the stored index): ``nlist`` (k-means cells; None: sqrt(n_gallery) rounded to a power of
    two, at most n_gallery / 39), ``pq_m``/``pq_nbits``, ``hnsw_m``, ``ef_construction``, ``train_size`` (vectors
    the k-means and PQ are trained on; None: 64 per cell), ``seed`` (training sample and held-out queries).
    Search knobs (applied when loading; recall re-measured): ``nprobe`` (cells scanned), ``ef_search``.
    ``recall_queries``: items of the set used as held-out queries when recall@10 is measured.
    """

    index: Literal["exact", "ivf", "ivfpq", "hnsw"] = "ivf"
    nlist: PositiveInt | None = None
    nprobe: PositiveInt = 16
    pq_m: PositiveInt = 32
    pq_nbits: int = Field(default=8, ge=1, le=16)
    hnsw_m: int = Field(default=16, ge=2, le=256)
    ef_construction: PositiveInt = 40
    ef_search: PositiveInt = 64
    train_size: PositiveInt | None = None
    recall_queries: PositiveInt = 1000
    seed: int = 0

class Params(_Section):
    """The whole ``params.yaml``."""

    seed: int = 0
    threads: PositiveInt = 2
    data: DataParams = DataParams()
    protocol: ProtocolParams = ProtocolParams()
    old: BackboneParams
    side_info: SideInfoParams = SideInfoParams()
    new: BackboneParams
    bct: BctParams
    v3: BackboneParams
    transformation: TransformationParams = TransformationParams()
    backfill: BackfillParams = BackfillParams()
    evaluation: EvaluationParams = EvaluationParams()
    registry: RegistryParams = RegistryParams()
    serving: ServingParams = ServingParams()

    @model_validator(mode="after")
    def _bct_keeps_old_dim(self) -> Params:
        if self.bct.backbone.embedding_dim != self.old.embedding_dim:
            raise ValueError(
                f"bct.backbone.embedding_dim is {self.bct.backbone.embedding_dim} but BCT embeds into the old "
                f"space: it must equal old.embedding_dim ({self.old.embedding_dim})")
        return self


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file.

    Args:
        path: YAML file whose top-level keys are the sections of :class:`Params`.

    Returns:
        The validated parameters.

    Raises:
        ConfigError: the file is missing or not YAML, a key is unknown, or a value has the wrong type;
            the message names the key path and the bad value.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}".splitlines()[0]) from exc
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(
            f"{path}: {where}: {first['msg']} (got {first.get('input')!r})"
        ) from None
