"""Weights-only statistics of a Lily file: expert norms, A and B spectra, router norms (no model needed)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from ..serialization import check_finite, read_lily_file
from .stats import effective_rank, matrix_singular_values, pool_singular_values

logger = logging.getLogger(__name__)

B_SUFFIX = ".lily_B"
A_SUFFIX = ".lily_A.weight"
ROUTER_SUFFIX = ".lily_router.weight"


@dataclass
class PoolStats:
    """One group's expert pool `[num_B, r, out]`: how large each expert is and how much mixing can reach."""

    component: str
    group: str
    num_B: int
    r: int
    out_features: int
    expert_norms: list[float]
    expert_effective_ranks: list[float]
    pool_effective_rank: float
    pool_singular_values: list[float]

    @property
    def norm_shares(self) -> list[float]:
        total = sum(self.expert_norms)
        return [n / total if total > 0 else 0.0 for n in self.expert_norms]


@dataclass
class AStats:
    """One shared down-projection A `[r, in]`, named after the first layer it serves."""

    component: str
    leader: str
    effective_rank: float
    singular_values: list[float]


@dataclass
class LilyWeightStats:
    """Everything `lily-inspect` reads from a Lily file alone."""

    configs: dict[str, dict[str, object]]
    pools: list[PoolStats]
    a_matrices: list[AStats]
    router_norms: dict[str, float]  # "component.path" -> Frobenius norm of the layer's router


def lily_weight_stats(path_or_dir: str | os.PathLike[str]) -> LilyWeightStats:
    """Read a Lily file (every check of the loader's reader, plus finiteness) and summarise its weights."""
    components = read_lily_file(path_or_dir)
    pools: list[PoolStats] = []
    a_matrices: list[AStats] = []
    router_norms: dict[str, float] = {}
    for component, weights in components.items():
        check_finite(weights.tensors, f"the {component} adapter")
        for key, tensor in sorted(weights.tensors.items()):
            if key.endswith(B_SUFFIX):
                pools.append(_pool_stats(component, key[: -len(B_SUFFIX)], tensor))
            elif key.endswith(A_SUFFIX):
                values = matrix_singular_values(tensor)
                a_matrices.append(AStats(component, key[: -len(A_SUFFIX)], effective_rank(values), values.tolist()))
            elif key.endswith(ROUTER_SUFFIX):
                router_norms[f"{component}.{key[: -len(ROUTER_SUFFIX)]}"] = tensor.to(torch.float64).norm().item()
    logger.info("Read %d expert pools, %d A matrices, %d routers.", len(pools), len(a_matrices), len(router_norms))
    configs = {component: weights.config.to_dict() for component, weights in components.items()}
    return LilyWeightStats(configs, pools, a_matrices, router_norms)


def _pool_stats(component: str, group: str, B: torch.Tensor) -> PoolStats:
    num_B, r, out = B.shape
    norms = [B[e].to(torch.float64).norm().item() for e in range(num_B)]
    expert_ranks = [effective_rank(matrix_singular_values(B[e])) for e in range(num_B)]
    values = pool_singular_values(B)
    return PoolStats(component, group, num_B, r, out, norms, expert_ranks, effective_rank(values), values.tolist())
