"""Parameter counts before adding anything, and the Lily config that fits a LoRA rank's budget."""

from __future__ import annotations

import dataclasses

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
