"""The world of the engine tests: tiny real ONNX transformations, small sets, and checks computed by hand."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fct_registry.core.refs import ModelRef
from fct_registry.engines.chain import ChainStep
from fct_registry.method.models.transformation import ForwardTransformation
from fct_registry.onnx_boundary.export import export_onnx
from fct_registry.vectors.batch import EmbeddingBatch
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.set_writer import write_embedding_set


def ref(label: str) -> ModelRef:
    return ModelRef(label=label, sha256=hashlib.sha256(f"model {label}".encode()).hexdigest())


V1, V2, V3, S1, S2 = map(ref, ("v1", "v2", "v3", "s1", "s2"))
D_OLD, D_SIDE, D_MID, D_NEW = 4, 3, 6, 5


class LinearWithSide(nn.Module):
    """h(old_embedding (B, d_old), side_info (B, d_side)) = W_o old + W_s side + b -> (B, d_new)."""

    def __init__(self, d_old: int, d_side: int, d_new: int) -> None:
        super().__init__()
        self.old = nn.Linear(d_old, d_new)
        self.side = nn.Linear(d_side, d_new, bias=False)

    def forward(self, old_embedding: torch.Tensor, side_info: torch.Tensor) -> torch.Tensor:
        return self.old(old_embedding) + self.side(side_info)


class LinearNoSide(nn.Module):
    """h(old_embedding (B, d_old)) -> (B, d_new), a transformation without side-info."""

    def __init__(self, d_old: int, d_new: int) -> None:
        super().__init__()
        self.old = nn.Linear(d_old, d_new)

    def forward(self, old_embedding: torch.Tensor) -> torch.Tensor:
        return self.old(old_embedding)


class LogOfNegative(nn.Module):
    """log(100 - old^2) (B, d): finite for the standard-normal parity inputs, NaN once |old| > 10."""

    def forward(self, old_embedding: torch.Tensor) -> torch.Tensor:
        return torch.log(100.0 - old_embedding.square())


@dataclass
class Exported:
    module: nn.Module
    path: Path


def export_models(folder: Path) -> dict[str, Exported]:
    """Tiny real transformations exported to ONNX into ``folder``: h1 v1->v2 (4+3 -> 6), h2 v2->v3 (6+3 -> 5),
    noside v1->v2 (4 -> 6), nan (4 -> 4), and fastfill v2->v3 (6+3 -> 5 plus a FastFill ``uncertainty``)."""
    torch.manual_seed(0)
    fastfill = ForwardTransformation(D_MID, D_NEW, D_SIDE, hidden_dim=8, uncertainty=True).eval()
    specs = {
        "h1": (LinearWithSide(D_OLD, D_SIDE, D_MID), {"old_embedding": D_OLD, "side_info": D_SIDE}),
        "h2": (LinearWithSide(D_MID, D_SIDE, D_NEW), {"old_embedding": D_MID, "side_info": D_SIDE}),
        "noside": (LinearNoSide(D_OLD, D_MID), {"old_embedding": D_OLD}),
        "nan": (LogOfNegative(), {"old_embedding": D_OLD}),
        "fastfill": (fastfill, {"old_embedding": D_MID, "side_info": D_SIDE}),
    }
    out = {}
    for name, (module, widths) in specs.items():
        module.eval()
        example = {n: torch.randn(2, w) for n, w in widths.items()}
        out[name] = Exported(module, export_onnx(module, example, folder / f"{name}.onnx").path)
    return out


def step(h, name: str, source: ModelRef, target: ModelRef, side: ModelRef | None = S1) -> ChainStep:
    return ChainStep(onnx_path=h[name].path, source=source, target=target, side_info=side,
                     name=f"fct-transformation/{name}")


def chain(h) -> list[ChainStep]:
    return [step(h, "h1", V1, V2), step(h, "h2", V2, V3)]


def make_set(path: Path, n: int = 300, side: bool = True, shard_rows: int = 128, d: int = D_OLD,
             seed: int = 0) -> EmbeddingSet:
    """n items in ceil(n / shard_rows) shards; ids shuffled (not sorted) so row order is really tested."""
    rng = np.random.default_rng(seed)
    batch = EmbeddingBatch(
        ids=rng.permutation(10 * n)[:n].astype(np.int64) * 7,
        labels=rng.integers(-1, 10, size=n),
        embeddings=rng.normal(size=(n, d)).astype(np.float32),
        side_info=rng.normal(size=(n, D_SIDE)).astype(np.float32) if side else None,
        model=V1,
    )
    return write_embedding_set(path, batch, model=V1, side_info_model=S1 if side else None,
                               lineage=["gallery v1 embedded"], shard_rows=shard_rows)


def by_hand(h, names: list[str], batch: EmbeddingBatch, with_sigma: bool = False
            ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Apply the torch modules one after the other, as the upgrade should; with_sigma: also the last module's
    FastFill sigma (n,)."""
    x, sigma = torch.from_numpy(batch.embeddings), None
    with torch.inference_mode():
        for name in names:
            kwargs = {"side_info": torch.from_numpy(batch.side_info)} if name in ("h1", "h2", "fastfill") else {}
            x = h[name].module(old_embedding=x, **kwargs)
            x, sigma = x if isinstance(x, tuple) else (x, None)
    return (x.numpy(), sigma[:, 0].numpy()) if with_sigma else x.numpy()


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".tmp-"))
