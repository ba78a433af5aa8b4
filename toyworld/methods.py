"""The adapter methods the workbench compares: one entry each (its `--adapter` value, its name for people, the
training flags that size it to a budget, the budgets the sweep trains it at).

A budget is a LoRA rank: the parameter count of a LoRA of that rank on the same layers (`budget_rank` in the
records). LoRA is trained at that rank; Lily, DoRA, LoKr and LoHa are sized by `--match_lora_budget` to the largest
adapter not above it. Adding a method is adding one `Method` to `METHODS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

REFERENCE_BUDGET = 4  # LoRA rank 4: the budget every method is trained at

# The UNet layers every method adapts: the attention projections (diffusers' SDXL DreamBooth default) and each
# transformer block's feed-forward and input/output projections. On the attention projections alone no adapter
# reached the target on the star, circle or square in 1200 steps (benchmarks/results/attention_only/), while
# fine-tuning the whole UNet learned the star (0.97, benchmarks/results/finetune_ceiling.md). With these layers, one
# seed of Lily at its attention-only recipe (`python -m benchmarks.learning_curve --method lily --learning_rate 6e-3
# --seed 0 --save_steps 1200 --train_flags='--lr_scheduler=cosine' --subject S`) reached subject fidelity 0.89, 0.77,
# 1.00, 0.98 on star, circle, square, triangle (attention only, mean of 3 seeds: 0.41, 0.33, 0.75, 0.67). One regex, so
# that a run's flags can replace it as one flag.
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TARGET_MODULES_FLAG = "--target_modules=.*(" + "|".join(re.escape(name) for name in TARGET_MODULES) + ")$"

# Lily's sharing per budget: (stride_A, num_B). At the rank-4 budget, the shape the learning curves used (r = 7
# on the toy base's layers above), and the same shape at twice that budget (r = 14: the doubling goes into r alone,
# so the 2x runs show what more parameters buy Lily at its 1x sharing); below it, the shape with the largest r the
# budget allows (one A per group of 8 layers, the fewest experts): r = 3 at the rank-1 budget and r = 6 at rank 2,
# where stride_A 4 / num_B 4 would give r = 1 and 3 (tests/toyworld/test_methods.py checks these on the toy base).
LILY_SHAPES: dict[int, tuple[int, int]] = {1: (8, 2), 2: (8, 2), 4: (4, 4), 8: (4, 4)}


def lily_flags(budget: int) -> list[str]:
    """Lily within the budget, with the sharing of `LILY_SHAPES` (the rank-4 shape for a budget not listed)."""
    stride_a, num_b = LILY_SHAPES.get(budget, LILY_SHAPES[REFERENCE_BUDGET])
    return ["--adapter=lily", f"--lily_stride_A={stride_a}", f"--lily_num_B={num_b}", f"--match_lora_budget={budget}"]


def lora_flags(budget: int) -> list[str]:
    """LoRA at rank = budget, alpha = rank (a scale of 1)."""
    return ["--adapter=lora", f"--rank={budget}", f"--lora_alpha={budget}"]


def peft_flags(kind: str, *settings: str) -> Callable[[int], list[str]]:
    """A peft adapter (DoRA, LoKr, LoHa) sized by the training script to the budget, with its own `settings`."""

    def flags(budget: int) -> list[str]:
        return [f"--adapter={kind}", *settings, f"--match_lora_budget={budget}"]

    return flags


@dataclass(frozen=True)
class Method:
    """One adapter method: `name` is its `--adapter` value, `flags(budget)` its training flags at a budget; the
    benchmark trains it at `budgets`, and also at `optional_budgets` when asked (`--optional_budgets`)."""

    name: str
    display_name: str
    flags: Callable[[int], list[str]]
    budgets: tuple[int, ...]
    optional_budgets: tuple[int, ...] = ()

    @property
    def all_budgets(self) -> tuple[int, ...]:
        return (*self.budgets, *self.optional_budgets)


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        # Lily at 2x the rank-4 budget is asked for "if time allows": on 2 cores its 12 trainings take the full run
        # past 90 min (132 trainings: 94.3 min at d8e7f35), so it runs only with --optional_budgets.
        Method("lily", "Lily", lily_flags, (1, 2, 4), optional_budgets=(8,)),
        Method("lora", "LoRA", lora_flags, (1, 2, 4, 8)),
        Method("dora", "DoRA", peft_flags("dora"), (REFERENCE_BUDGET,)),
        # LoKr's default factor splits a 128-wide layer 8 x 16: complete from rank 8 on, at most 10,240 parameters
        # on the toy base; factor 4 lets it reach the rank-4 budget (rank 15, 31,232 parameters).
        Method("lokr", "LoKr", peft_flags("lokr", "--lokr_decompose_factor=4"), (REFERENCE_BUDGET,)),
        Method("loha", "LoHa", peft_flags("loha"), (REFERENCE_BUDGET,)),
    )
}


@dataclass(frozen=True)
class Recipe:
    """How one method is trained in the sweep: steps, learning rate, prior preservation and any further training
    flags (they replace the comparison engine's defaults of the same name, e.g. `--lr_scheduler`)."""

    steps: int
    learning_rate: float
    flags: tuple[str, ...] = ("--lr_scheduler=constant", "--cache_latents")
    prior: bool = False
    budget_learning_rates: tuple[tuple[int, float], ...] = ()  # (budget, lr) for a budget that departs from it

    def learning_rate_at(self, budget: int) -> float:
        """The learning rate at `budget`: `learning_rate` unless `budget_learning_rates` names the budget."""
        return dict(self.budget_learning_rates).get(budget, self.learning_rate)


COSINE = ("--lr_scheduler=cosine", "--cache_latents")

# Per method: the best (learning rate, prior preservation) of the cosine `--lr_sweep --prior both --learning_rates 2e-3
# 4e-3 6e-3 8e-3` on star over 1200 steps, one seed, every adapter on TARGET_MODULES
# (benchmarks/results/subject_driven_lr_sweep.md), ranked by progress to the target, ties by subject fidelity. Without
# prior preservation every method learned the star at its best rate (subject fidelity 0.82-0.91, every background);
# with it none passed 0.54, so no method trains with it, and class preservation is what that costs (0.00-0.12 at the
# picked rates). LoRA's pick is a near tie (2e-3: 0.905, 4e-3: 0.913); 6e-3 broke LoRA (0.003) and 8e-3 Lily, LoRA
# and DoRA.
# At the 2x budget Lily trains at half its rate: its update is h B_mix with a fixed scaling (no alpha / r), so at the
# same rate a larger r takes a larger step. The same star run at the 2x budget (`python -m benchmarks.learning_curve
# --subject star --rank 8 --seed 0 --save_steps 1200 --train_flags='--lr_scheduler=cosine' --method M
# --learning_rate LR`) broke Lily r 14 at 6e-3 (0.000) and gave 0.833 at 3e-3; LoRA r8 gave 0.914 at its 4e-3 and
# 0.907 at 2e-3, so LoRA keeps its rate.
RECIPE: dict[str, Recipe] = {
    "lily": Recipe(1200, 6e-3, COSINE, budget_learning_rates=((8, 3e-3),)),
    "lora": Recipe(1200, 4e-3, COSINE),
    "dora": Recipe(1200, 4e-3, COSINE),
    "lokr": Recipe(1200, 6e-3, COSINE),
    "loha": Recipe(1200, 6e-3, COSINE),
}
# Where RECIPE's settings come from (printed in the results file).
RECIPE_SOURCE = (
    "the cosine `--lr_sweep --prior both` on star over 1200 steps, one seed (benchmarks/results/"
    "subject_driven_lr_sweep.md): no method trains with prior preservation, which cost every method the subject "
    "there; Lily at the 2x budget (r 14) trains at half its rate, keeping lr x r as at 1x (on the same star run at "
    "2x, 6e-3 broke it: subject fidelity 0.000; 3e-3: 0.833)"
)


def method_name(method: str) -> str:
    """'Lily', 'LoRA', ...; an unknown name as given."""
    return METHODS[method].display_name if method in METHODS else method


def get_method(method: str) -> Method:
    """The method by name; `ValueError` naming the known ones otherwise."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return METHODS[method]


def budget_label(budget: int) -> str:
    """'LoRA r2 (1/2x)': the budget as a LoRA rank and as a fraction of the rank-4 budget."""
    ratio = budget / REFERENCE_BUDGET
    fraction = {0.25: "1/4", 0.5: "1/2"}.get(ratio, f"{ratio:g}")
    return f"LoRA r{budget} ({fraction}x)"
