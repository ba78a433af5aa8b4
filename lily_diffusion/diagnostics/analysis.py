"""From recorded expert mixes and weights to per-layer findings: selectivity, effective ranks, expert use."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..adapter import lily_adapters
from ..config import LilyConfig
from ..pipeline import components_of
from ..sharing import target_name
from .collect import Activations
from .lora import LoraLayerStats
from .stats import (
    effective_rank,
    entropy,
    lily_stacked_singular_values,
    lily_update_singular_values,
    max_pairwise_tv,
    tv_spread,
)
from .weights import LilyWeightStats, PoolStats

UNUSED_SHARE = 0.1  # an expert is unused below this fraction of the uniform share 1/num_B


@dataclass
class LayerAnalysis:
    """One Lily layer on the recorded inputs (each input: one prompt at one call)."""

    key: str  # "component.module path"
    group: str
    num_B: int
    r: int
    inputs: int
    mean_mix: list[float]
    router_entropy: float  # mean over inputs of H(p(x)), nats; 0 = one expert, log(num_B) = uniform
    max_entropy: float  # log(num_B)
    tv_spread: float  # mean TV distance of p(x) from the mean mix, over all inputs
    tv_prompts: float  # the same among the prompts at one call, averaged over calls
    tv_timesteps: float  # the same among the calls (timesteps) for one prompt, averaged over prompts
    max_tv: float  # largest TV distance between two inputs' mixes
    per_input_effective_rank: float  # mean over inputs of erank(ΔW(x)); at most r
    stacked_effective_rank: float  # erank of the updates stacked over the inputs
    stacked_singular_values: list[float]
    lora_rank: int | None = None
    lora_effective_rank: float | None = None


@dataclass
class ExpertUse:
    """Which experts of one group's pool carry the weight: mean router weight times expert norm, normalised."""

    component: str
    group: str
    expert_norms: list[float]
    mean_weights: list[float] | None  # mean p_e over the group's layers and inputs (None: weights only)
    shares: list[float]
    unused: list[int] = field(default_factory=list)


def analyse_layers(
    pipe: object,
    activations: Activations,
    lora_layers: list[LoraLayerStats] | None = None,
    adapter_name: str = "default",
) -> list[LayerAnalysis]:
    """Router selectivity and update ranks of every Lily layer whose mixes were recorded."""
    lora = {stats.key: stats for stats in lora_layers or []}
    results = []
    for component, model in components_of(pipe).items():
        adapter = lily_adapters(model).get(adapter_name)
        if adapter is None:
            continue
        scaling = adapter.config.scaling * adapter.scale
        for path, slot in adapter.layout.slots.items():
            key = f"{component}.{path}"
            if key not in activations.mixes:
                continue
            by_call = activations.mixes[key].to(torch.float64)  # [calls, prompts, num_B]
            mixes = by_call.reshape(-1, adapter.config.num_B)
            A, B = adapter.lily_A[slot.a_index].detach(), adapter.lily_B[slot.group].detach()
            per_input = lily_update_singular_values(A, B, mixes, scaling)
            stacked = lily_stacked_singular_values(A, B, mixes, scaling)
            paired = lora.get(key)
            results.append(
                LayerAnalysis(
                    key=key,
                    group=adapter.layout.groups[slot.group].key,
                    num_B=adapter.config.num_B,
                    r=adapter.config.r,
                    inputs=mixes.shape[0],
                    mean_mix=mixes.mean(dim=0).tolist(),
                    router_entropy=entropy(mixes).mean().item(),
                    max_entropy=math.log(adapter.config.num_B),
                    tv_spread=tv_spread(mixes),
                    tv_prompts=sum(tv_spread(call) for call in by_call) / by_call.shape[0],
                    tv_timesteps=sum(tv_spread(by_call[:, i]) for i in range(by_call.shape[1])) / by_call.shape[1],
                    max_tv=max_pairwise_tv(mixes),
                    per_input_effective_rank=sum(effective_rank(v) for v in per_input) / len(per_input),
                    stacked_effective_rank=effective_rank(stacked),
                    stacked_singular_values=stacked.tolist(),
                    lora_rank=paired.rank if paired else None,
                    lora_effective_rank=paired.effective_rank if paired else None,
                )
            )
    return results


def expert_use(pools: list[PoolStats], layers: list[LayerAnalysis] | None = None) -> list[ExpertUse]:
    """Each pool's expert shares: `mean p_e · ‖B_e‖` over its layers' inputs (by norm alone without `layers`)."""
    uses = []
    for pool in pools:
        members = [la for la in layers or [] if la.group == pool.group and la.key.startswith(pool.component + ".")]
        if members:
            weights = torch.tensor([la.mean_mix for la in members], dtype=torch.float64).mean(dim=0).tolist()
            scores = [w * n for w, n in zip(weights, pool.expert_norms, strict=True)]
        else:
            weights, scores = None, list(pool.expert_norms)
        total = sum(scores)
        shares = [s / total if total > 0 else 0.0 for s in scores]
        unused = [e for e, share in enumerate(shares) if share < UNUSED_SHARE / pool.num_B]
        uses.append(ExpertUse(pool.component, pool.group, pool.expert_norms, weights, shares, unused))
    return uses


def lora_group(stats: LoraLayerStats, configs: dict[str, dict[str, object]]) -> str:
    """The Lily group a LoRA layer would belong to (`target@outxin`), using the Lily file's target list."""
    component, _, path = stats.key.partition(".")
    config = configs.get(component)
    target = None
    if config is not None:
        target = target_name(path, LilyConfig.from_dict(config).target_modules)
    return f"{target or path.rsplit('.', 1)[-1]}@{stats.out_features}x{stats.in_features}"


def summarise(
    weights: LilyWeightStats,
    layers: list[LayerAnalysis],
    lora_layers: list[LoraLayerStats],
    uses: list[ExpertUse],
) -> dict[str, float | int | None]:
    """Whole-model figures: means over layers, unused experts, Lily's reach vs LoRA's rank."""

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    lily_r = next(iter(weights.configs.values()))["r"] if weights.configs else None
    summary: dict[str, float | int | None] = {
        "lily_r": lily_r,
        "lily_layers_inspected": len(layers),
        "mean_router_entropy": mean([la.router_entropy for la in layers]),
        "max_entropy": mean([la.max_entropy for la in layers]),
        "mean_tv_spread": mean([la.tv_spread for la in layers]),
        "mean_tv_prompts": mean([la.tv_prompts for la in layers]),
        "mean_tv_timesteps": mean([la.tv_timesteps for la in layers]),
        "max_tv": max((la.max_tv for la in layers), default=None),
        "mean_per_input_effective_rank": mean([la.per_input_effective_rank for la in layers]),
        "mean_stacked_effective_rank": mean([la.stacked_effective_rank for la in layers]),
        "layers_stacked_above_r": sum(la.stacked_effective_rank > la.r for la in layers) if layers else None,
        "max_stacked_effective_rank": max((la.stacked_effective_rank for la in layers), default=None),
        "mean_pool_effective_rank": mean([p.pool_effective_rank for p in weights.pools]),
        "experts": sum(p.num_B for p in weights.pools),
        "unused_experts": sum(len(u.unused) for u in uses),
        "lora_layers": len(lora_layers),
        "lora_rank": max((s.rank for s in lora_layers), default=None),
        "mean_lora_effective_rank": mean([s.effective_rank for s in lora_layers]),
    }
    return summary
