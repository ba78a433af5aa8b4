"""Flags that mean what they mean in diffusers' `train_dreambooth_lora_sdxl.py`, checked in one place.

- `--rank`, `--lora_alpha`, `--lora_dropout` are LoRA settings (DoRA's too; LoKr and LoHa read `--rank` and
  `--lora_alpha`): with `--adapter lily` they are an error (not silently ignored); `--match_lora_budget RANK` is
  the way to size Lily (or DoRA, LoKr, LoHa) after a LoRA rank.
- `--lr_scheduler piecewise_constant` takes diffusers' step rules (`--lr_step_rules`), e.g.
  `1:100,0.1:200,0.01`: multiplier 1 before step 100, 0.1 before step 200, then 0.01. Steps count
  optimizer steps, as in a single-process run, whatever the number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .errors import TrainingError

LORA_FLAGS = ("rank", "lora_alpha", "lora_dropout")
LORA_DEFAULTS = {"rank": 4, "lora_dropout": 0.0}  # diffusers' defaults; lora_alpha defaults to the rank


def check_lora_flags(flags: Mapping[str, object], kind: str, accepted: tuple[str, ...]) -> None:
    """LoRA flags given with an adapter kind that does not read them are an error (one sentence): all of them with
    Lily, `--lora_dropout` with LoKr and LoHa (peft's have no input dropout); `--rank` with --match_lora_budget."""
    given = [f"--{name}" for name in LORA_FLAGS if flags[name] is not None and name not in accepted]
    if given and not accepted:
        raise TrainingError(
            f"{', '.join(given)} {'is a LoRA setting' if len(given) == 1 else 'are LoRA settings'} with no Lily "
            "equivalent: size Lily with --lily_r (or --match_lora_budget RANK for the largest Lily not above a "
            "rank-RANK LoRA's parameter count), or train --adapter lora"
        )
    if given:
        raise TrainingError(
            f"{', '.join(given)} does not apply to --adapter {kind} (peft's {kind} has no input dropout; it takes "
            f"{', '.join(f'--{name}' for name in accepted)})"
        )
    if flags["rank"] is not None and flags.get("match_lora_budget") is not None:
        raise TrainingError("--rank and --match_lora_budget both set the rank: give one of them")


def lora_defaults(flags: Mapping[str, object]) -> dict[str, object]:
    """diffusers' LoRA defaults for the flags left unset (applied after `check_lora_flags`)."""
    return {name: default for name, default in LORA_DEFAULTS.items() if flags[name] is None}


def parse_step_rules(rules: str) -> tuple[list[tuple[float, int]], float]:
    """`"m1:s1,m2:s2,...,m_last"` as diffusers' piecewise_constant reads it, or a TrainingError sentence."""
    parts = [part.strip() for part in rules.split(",")]
    try:
        pairs = [(float(m), int(s)) for m, s in (part.split(":") for part in parts[:-1])]
        last = float(parts[-1])
    except ValueError:
        raise TrainingError(
            f"--lr_step_rules must look like '1:100,0.1:200,0.01' (multiplier:step pairs, then the final "
            f"multiplier), got {rules!r}"
        ) from None
    multipliers = [m for m, _ in pairs] + [last]
    if not all(math.isfinite(m) and m >= 0 for m in multipliers):
        raise TrainingError(f"--lr_step_rules multipliers must be finite and non-negative, got {rules!r}")
    steps = [s for _, s in pairs]
    if any(s < 1 for s in steps) or len(set(steps)) != len(steps):
        raise TrainingError(f"--lr_step_rules steps must be distinct positive whole numbers, got {rules!r}")
    return pairs, last


def check_step_rules(lr_scheduler: str, lr_step_rules: str | None) -> None:
    """`--lr_scheduler piecewise_constant` needs `--lr_step_rules`, and the rules must parse."""
    if lr_scheduler == "piecewise_constant" and not lr_step_rules:
        raise TrainingError("--lr_scheduler piecewise_constant needs --lr_step_rules, e.g. '1:100,0.1:200,0.01'")
    if lr_step_rules:
        parse_step_rules(lr_step_rules)


def scaled_step_rules(rules: str | None, num_processes: int) -> str | None:
    """The rules with each step times `num_processes` (accelerate steps the scheduler on every process)."""
    if not rules:
        return None
    pairs, last = parse_step_rules(rules)
    return ",".join([f"{m!r}:{s * num_processes}" for m, s in pairs] + [repr(last)])
