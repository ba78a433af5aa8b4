#!/usr/bin/env python
"""Lily vs LoRA DreamBooth on the bundled toy subject: learning-rate grid x prior preservation x seeds.

python -m benchmarks.subject_driven            # the full run (writes benchmarks/results/subject_driven.md)
python -m benchmarks.subject_driven --quick    # one run per method, a smoke test of the whole pipeline
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from toyworld.compare import (
    CLASS_PROMPT,
    INSTANCE_PROMPT,
    EvalPlan,
    RunSpec,
    best_grid,
    results_records,
    results_table,
    run_all,
)

RESULTS = Path(__file__).resolve().parent / "results" / "subject_driven.md"
GRID = Path(__file__).resolve().parents[1] / "samples" / "subject_driven_grid.png"
LEARNING_RATES = {"lily": (1e-3, 3e-3, 1e-2), "lora": (1e-3, 3e-3, 1e-2)}
LORA_RANK = 4
FULL_STEPS = 600  # 36 runs of ~25 s training each on 2 idle cores: ~20 min with scoring
QUICK_STEPS = 40


LEGEND = (
    "Columns (the evaluator never sees how an image was made; benchmarks/results/evaluator.md):\n"
    "- subject fidelity: mean P(this subject) of the which-subject CNN over the instance-prompt images "
    "(DreamBooth's DINO analogue);\n"
    "- subject similarity: cosine similarity of the object's appearance features to the 5 instance images "
    "(CLIP-I analogue);\n"
    "- prompt fidelity: fraction of instance-prompt images showing the background named (CLIP-T analogue), for the "
    "two backgrounds the instance images show (seen) and the one they never show (unseen: recontextualisation);\n"
    "- class preservation: fraction of class-prompt images that are plain stars, not the subject (language drift).\n"
    "Values are mean ± standard deviation over the training seeds ((n=1): one seed); train s is the wall time of "
    "one training run.\n"
)


def plan_runs(quick: bool, steps: int) -> list[RunSpec]:
    if quick:
        return [RunSpec("lily", 3e-3, False, 0, steps), RunSpec("lora", 3e-3, False, 0, steps)]
    return [
        RunSpec(method, lr, prior, seed, steps)
        for method, prior in itertools.product(LEARNING_RATES, (False, True))
        for lr in LEARNING_RATES[method]
        for seed in (0, 1, 2)
    ]


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="One short run per method (a few minutes).")
    parser.add_argument(
        "--steps", type=int, default=None, help=f"Training steps per run (default {FULL_STEPS}; quick: {QUICK_STEPS})."
    )
    parser.add_argument("--work_dir", type=Path, default=None, help="Where runs go (default: a temporary folder).")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help=f"Markdown output (default {RESULTS}; quick: none); per-run scores go beside it as .json.",
    )
    parser.add_argument("--grid", type=Path, default=None, help=f"Grid PNG (default {GRID}; quick: none).")
    return parser.parse_args(input_args)


def main(input_args: Sequence[str] | None = None) -> str:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(input_args)
    steps = args.steps or (QUICK_STEPS if args.quick else FULL_STEPS)
    plan = EvalPlan(seeds=(0, 1) if args.quick else (0, 1, 2, 3))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work_dir = args.work_dir or Path(scratch)
        results, base_scores = run_all(plan_runs(args.quick, steps), work_dir, LORA_RANK, plan)
        grid_path = args.grid or (None if args.quick else GRID)
        if grid_path is not None:
            prompts = [
                f"{INSTANCE_PROMPT} on a white background",
                f"{INSTANCE_PROMPT} on a black background",
                CLASS_PROMPT,
            ]
            best_grid(results, plan, prompts).save(grid_path)
    minutes = (time.perf_counter() - started) / 60
    report = (
        f"# Subject-driven generation: Lily vs LoRA on the toy world\n\n"
        f"{steps} steps per run, batch 2, LoRA rank {LORA_RANK} (alpha = rank), Lily stride_A=4 / num_B=4 "
        f"with r picked by `--match_lora_budget {LORA_RANK}`. Scores over {len(plan.seeds)} generation seeds x "
        f"{len(plan.subject_prompts())} subject prompts, and {len(plan.class_seeds)} class-prompt images "
        f"(distinct seeds); "
        f"{plan.steps} inference steps, guidance {plan.guidance_scale}.\n\n"
        f"{results_table(results, base_scores)}\n{LEGEND}\n"
        f"Total wall time {minutes:.1f} min on {platform.processor() or platform.machine()} "
        f"({torch.get_num_threads()} torch threads).\n\n"
        f"```bash\npython -m benchmarks.subject_driven{' --quick' if args.quick else ''}\n```\n"
    )
    results_path = args.results or (None if args.quick else RESULTS)
    if results_path is not None:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(report)
        records = {"base_model": base_scores, "runs": results_records(results)}
        results_path.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")
    logging.getLogger(__name__).info("%s", report)
    return report


if __name__ == "__main__":
    main()
