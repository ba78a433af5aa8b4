"""The README demo: DreamBooth Lily and LoRA on the bundled subject and base model, then a grid and a score table.

python -m toyworld.demo [--output_dir output/demo]
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from .compare import EvalPlan, RunSpec, best_grid, results_table
from .compare_jobs import run_all_parallel
from .methods import RECIPE
from .runner import default_jobs, use_one_thread
from .subjects import DEFAULT_SUBJECT

# Lily and LoRA with the benchmark's steps, learning rates and schedule (`toyworld.methods.RECIPE`), on the default
# subject at the rank-4 budget; both without prior preservation unless asked (as benchmarks/results/recipe_2400/
# subject_driven_noprior.md), so that only the adapter and its learning rate differ.
DEMO_METHODS = ("lily", "lora")
LORA_RANK = 4


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path("output/demo"))
    parser.add_argument(
        "--steps", type=int, default=None, help="Training steps per adapter (default: the benchmark's recipe)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--with_prior_preservation",
        action="store_true",
        help="Train with class images (less language drift, a slower learned subject).",
    )
    parser.add_argument("--eval_seeds", type=int, default=4, help="Seeds per evaluation prompt.")
    parser.add_argument("--inference_steps", type=int, default=EvalPlan.steps, help="Denoising steps per image.")
    parser.add_argument(
        "--jobs", type=int, default=None, help="Processes at once, one torch thread each (default: one per core)."
    )
    args = parser.parse_args(input_args)
    for name in ("jobs", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def main(input_args: Sequence[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(input_args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    plan = EvalPlan(seeds=tuple(range(args.eval_seeds)), steps=args.inference_steps)
    specs = [
        RunSpec(
            method,
            RECIPE[method].learning_rate_at(LORA_RANK),
            args.with_prior_preservation,
            args.seed,
            args.steps or RECIPE[method].steps,
            budget=LORA_RANK,
            extra_flags=RECIPE[method].flags,
        )
        for method in DEMO_METHODS
    ]
    use_one_thread()  # tiny models: a second thread per process only adds oversubscription on a busy machine
    results, base_scores, failed = run_all_parallel(specs, args.output_dir / "runs", plan, args.jobs or default_jobs())
    if failed:
        raise SystemExit("; ".join(f"{o.job.name} failed: {o.error}" for o in failed))
    table = results_table(results, base_scores[DEFAULT_SUBJECT.name])
    (args.output_dir / "scores.md").write_text(table)
    subject = DEFAULT_SUBJECT  # its unseen background: the subject somewhere its photos never showed it
    grid = best_grid(results, plan, [subject.caption(subject.unseen_background), subject.class_prompt])
    grid.save(args.output_dir / "grid.png")
    logging.getLogger(__name__).info(
        "\n%s\nwrote %s and %s", table, args.output_dir / "scores.md", args.output_dir / "grid.png"
    )
    return args.output_dir


if __name__ == "__main__":
    main()
