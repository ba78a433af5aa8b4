#!/usr/bin/env python
"""Lily vs LoRA DreamBooth on the bundled toy subject: learning-rate grid x prior preservation x seeds.

python -m benchmarks.subject_driven            # the full run (writes benchmarks/results/subject_driven.md)
python -m benchmarks.subject_driven --quick    # one run per method, a smoke test of the whole pipeline
python -m benchmarks.subject_driven --work_dir runs/sd --resume   # continue an interrupted run

Trainings run in parallel processes (`--jobs`, default one per core), one torch thread each.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from toyworld.compare import (
    CLASS_PROMPT,
    INSTANCE_PROMPT,
    EvalPlan,
    RunSpec,
    best_grid,
    results_records,
)
from toyworld.compare_jobs import run_all_parallel
from toyworld.report import (
    PlotData,
    load_learning_curve,
    paired_lines,
    per_subject_tables,
    plot_quality_vs_params,
    plot_quality_vs_steps,
    summary_table,
)
from toyworld.runner import default_jobs, use_one_thread
from toyworld.subjects import DEFAULT_SUBJECT

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
    "Values are means over the training runs with their 95% bootstrap interval [low, high] and the number of runs n "
    "((n=1): one run, no interval).\n"
)


def run_records(records: Sequence[dict[str, object]]) -> list[dict[str, object]]:
    """The runs' records with the subject and the budget (the LoRA rank matched) the report groups by."""
    return [{"subject": DEFAULT_SUBJECT.name, "budget_rank": LORA_RANK, **record} for record in records]


def write_plots(
    records: Sequence[dict[str, object]], results: Path | None, learning_curve: Path | None
) -> list[PlotData]:
    """Quality vs parameters (and vs steps, given a learning curve) as PNGs beside the results file."""
    if results is None or not records:
        return []
    plots = [plot_quality_vs_params(records, results.with_name(f"{results.stem}_params.png"))]
    if learning_curve is not None:
        points = load_learning_curve(learning_curve)
        plots.append(plot_quality_vs_steps(points, results.with_name(f"{results.stem}_steps.png")))
    return plots


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
    parser.add_argument(
        "--work_dir",
        type=Path,
        default=None,
        help="Where runs go, their scores cached in work_dir/scores (default: a temporary folder).",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Reuse the scores cached in --work_dir/scores: an interrupted benchmark skips the runs it finished.",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="Trainings at once, one process each (default: one per core)."
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help=f"Markdown output (default {RESULTS}; quick: none); per-run scores go beside it as .json.",
    )
    parser.add_argument(
        "--inference_steps", type=int, default=EvalPlan.steps, help="Denoising steps per scored image."
    )
    parser.add_argument(
        "--learning_curve",
        type=Path,
        default=None,
        help="A learning-curve JSON (points with method, steps, scores) to plot quality vs steps from.",
    )
    parser.add_argument("--grid", type=Path, default=None, help=f"Grid PNG (default {GRID}; quick: none).")
    args = parser.parse_args(input_args)
    if args.inference_steps < 1:
        parser.error(f"--inference_steps must be at least 1, got {args.inference_steps}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.learning_curve is not None and not args.learning_curve.is_file():
        parser.error(f"--learning_curve {args.learning_curve} is not a file")
    if args.resume and args.work_dir is None:
        parser.error("--resume needs --work_dir (the folder whose cached scores it continues from)")
    cached = sorted((args.work_dir / "scores").glob("*.json")) if args.work_dir is not None else []
    if cached and not args.resume:
        parser.error(
            f"{args.work_dir} already holds {len(cached)} finished runs' scores; pass --resume to continue from "
            "them, or choose another --work_dir"
        )
    return args


def main(input_args: Sequence[str] | None = None) -> str:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = list(sys.argv[1:] if input_args is None else input_args)
    args = parse_args(argv)
    use_one_thread()
    steps = args.steps or (QUICK_STEPS if args.quick else FULL_STEPS)
    plan = EvalPlan(seeds=(0, 1) if args.quick else (0, 1, 2, 3), steps=args.inference_steps)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work_dir = args.work_dir or Path(scratch)
        n_jobs = args.jobs or default_jobs()
        results, base_scores, failed = run_all_parallel(
            plan_runs(args.quick, steps), work_dir, LORA_RANK, plan, n_jobs, work_dir / "scores"
        )
        grid_path = args.grid or (None if args.quick else GRID)
        if grid_path is not None:
            prompts = [
                f"{INSTANCE_PROMPT} on a white background",
                f"{INSTANCE_PROMPT} on a black background",
                CLASS_PROMPT,
            ]
            best_grid(results, plan, prompts).save(grid_path)
    minutes = (time.perf_counter() - started) / 60
    records = run_records(results_records(results))
    results_path = args.results or (None if args.quick else RESULTS)
    plots = write_plots(records, results_path, args.learning_curve)
    failures = "".join(f"- {o.job.name}: {o.error}\n" for o in failed)
    report = (
        f"# Subject-driven generation: Lily vs LoRA on the toy world\n\n"
        f"{steps} steps per run, batch 2, LoRA rank {LORA_RANK} (alpha = rank), Lily stride_A=4 / num_B=4 "
        f"with r picked by `--match_lora_budget {LORA_RANK}`. Scores over {len(plan.seeds)} generation seeds x "
        f"{len(plan.subject_prompts())} subject prompts, and {len(plan.class_seeds)} class-prompt images "
        f"(distinct seeds); "
        f"{plan.steps} inference steps, guidance {plan.guidance_scale}.\n\n"
        f"{summary_table(records, base_scores)}\n{LEGEND}\n"
        f"## Lily vs LoRA, paired over (subject, seed)\n\n"
        + ("\n".join(paired_lines(records)) or "(no budget with runs of both)")
        + "\n\n## Per subject\n\n"
        f"{per_subject_tables(records, {DEFAULT_SUBJECT.name: base_scores})}\n"
        + "".join(f"![{p.title}]({p.path.name})\n\n" for p in plots)
        + (f"## Failed runs\n\n{failures}\n" if failures else "")
        + f"Total wall time {minutes:.1f} min on {platform.processor() or platform.machine()}, {n_jobs} training "
        f"processes with one torch thread each.\n\n"
        f"```bash\n{shlex.join(['python', '-m', 'benchmarks.subject_driven', *argv])}\n```\n"
    )
    if results_path is not None:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(report)
        data = {"base_model": base_scores, "runs": records, "failed": {o.job.name: o.error for o in failed}}
        results_path.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    logging.getLogger(__name__).info("%s", report)
    if failed:
        again = f"rerun with --work_dir {args.work_dir} --resume" if args.work_dir else "rerun with --work_dir"
        raise SystemExit(f"{len(failed)} of the runs failed (listed above); {again} to retry only those")
    return report


if __name__ == "__main__":
    main()
