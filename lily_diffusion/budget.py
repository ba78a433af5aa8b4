"""Parameter counts before adding anything, and the Lily config (or peft rank) that fits a LoRA rank's budget."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

import torch
from peft import PeftConfig, inject_adapter_in_model
from torch import nn

from .config import LilyConfig
from .sharing import build_layout, find_targets


def count_lily_parameters(model: nn.Module, config: LilyConfig) -> int:
    """Trainable parameters `add_lily(model, config)` would create (exactly).

    Σ_groups ceil(n/stride_A)·r·in + Σ_groups num_B·r·out + layers·r·num_B.
    """
    layout = build_layout(model, config)
    r, num_B = config.r, config.num_B
    a_params = sum(group.num_A(layout.stride_A) * r * group.in_features for group in layout.groups)
    b_params = sum(num_B * r * group.out_features for group in layout.groups)
    return a_params + b_params + layout.num_layers * r * num_B


def count_lora_parameters(model: nn.Module, rank: int, config: LilyConfig | None = None) -> int:
    """Trainable parameters of a LoRA of `rank` on the layers `config` targets: Σ rank·(in + out)."""
    targets = find_targets(model, config or LilyConfig())
    return sum(rank * (base.in_features + base.out_features) for _, _, base in targets)


def lily_config_for_lora_budget(model: nn.Module, lora_rank: int, config: LilyConfig | None = None) -> LilyConfig:
    """The largest-rank Lily config whose count is closest to, and not above, LoRA at `lora_rank`.

    `stride_A`, `num_B`, targets and the rest are kept from `config`; only `r` is chosen. The count
    is linear in r, so the answer is r = floor(budget / count at r=1).
    """
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank <= 0:
        raise ValueError(f"lora_rank must be a positive integer, got {lora_rank!r}.")
    config = config or LilyConfig()
    budget = count_lora_parameters(model, lora_rank, config)
    per_rank = count_lily_parameters(model, dataclasses.replace(config, r=1))
    r = budget // per_rank
    if r < 1:
        raise ValueError(
            f"No Lily config with stride_A={config.stride_A}, num_B={config.num_B} fits LoRA rank {lora_rank} "
            f"({budget:,} parameters; Lily needs {per_rank:,} per unit of rank). Raise stride_A or lower num_B."
        )
    return dataclasses.replace(config, r=r)


def _one_layer_count(config: PeftConfig, in_features: int, out_features: int) -> int:
    """Trainable parameters peft adds with `config` to one Linear(in, out), built on the meta device (no memory)."""
    with torch.device("meta"):
        holder = nn.Module()
        holder.layer = nn.Linear(in_features, out_features)
    layer_config = dataclasses.replace(config, target_modules=["layer"])
    inject_adapter_in_model(layer_config, holder, adapter_name="count", low_cpu_mem_usage=True)
    return sum(p.numel() for p in holder.parameters() if p.requires_grad)


def count_peft_parameters(model: nn.Module, config: PeftConfig, targets: LilyConfig | None = None) -> int:
    """Trainable parameters a peft adapter (`config`: LoRA, DoRA, LoKr, LoHa...) adds to the layers `targets`
    selects on `model`, exactly as peft builds them (a meta-device layer per distinct shape; `model` is untouched)."""
    shapes = Counter(
        (base.in_features, base.out_features) for _, _, base in find_targets(model, targets or LilyConfig())
    )
    return sum(n * _one_layer_count(config, fan_in, fan_out) for (fan_in, fan_out), n in shapes.items())


def peft_rank_for_lora_budget(
    model: nn.Module, lora_rank: int, config_at: Callable[[int], PeftConfig], targets: LilyConfig | None = None
) -> int:
    """The largest rank r whose adapter `config_at(r)` has no more trainable parameters than LoRA at `lora_rank`.

    The count never falls as r grows. LoKr's stops growing once its Kronecker factors are full matrices; when
    that plateau is within the budget, the answer is the smallest r on it (a larger r adds no parameter).
    """
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank <= 0:
        raise ValueError(f"lora_rank must be a positive integer, got {lora_rank!r}.")
    targets = targets or LilyConfig()
    budget = count_lora_parameters(model, lora_rank, targets)
    layers = find_targets(model, targets)
    top = max(max(base.in_features, base.out_features) for _, _, base in layers)

    def count(rank: int) -> int:
        return count_peft_parameters(model, config_at(rank), targets)

    if count(1) > budget:
        raise ValueError(f"No rank fits LoRA rank {lora_rank} ({budget:,} parameters): rank 1 has {count(1):,}.")
    plateau = count(top)
    if plateau <= budget:
        return _first_rank(lambda r: count(r) >= plateau, 1, top)
    return _first_rank(lambda r: count(r) > budget, 1, top) - 1


def _first_rank(is_reached: Callable[[int], bool], low: int, high: int) -> int:
    """The smallest r in [low, high] where the monotone predicate holds (it holds at `high`): a binary search."""
    while low < high:
        middle = (low + high) // 2
        if is_reached(middle):
            high = middle
        else:
            low = middle + 1
    return low
