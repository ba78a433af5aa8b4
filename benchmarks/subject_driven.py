#!/usr/bin/env python
"""Subject-driven DreamBooth sweep on the toy world: every method x budget x bundled subject x training seed.

python -m benchmarks.subject_driven              # the full sweep (writes benchmarks/results/subject_driven.md)
python -m benchmarks.subject_driven --quick      # 1 subject, Lily and LoRA at the rank-4 budget, a few steps
python -m benchmarks.subject_driven --lr_sweep   # each method's learning rate on one subject (fills RECIPE)
python -m benchmarks.subject_driven --work_dir runs/sd --resume   # continue an interrupted run

Methods and budgets come from `toyworld.methods` (LoRA ranks 1, 2, 4, 8; Lily at 1/4, 1/2 and 1x the parameters of
LoRA rank 4, and 2x with `--optional_budgets`; DoRA, LoKr and LoHa at the rank-4 budget when the training script can
train them); steps, learning rate and schedule per method from `RECIPE`. Trainings run in parallel processes
(`--jobs`, default one per core), one torch thread each; every run's scores are cached in `--work_dir/scores`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from diffusers.optimization import SchedulerType

from benchmarks.learning_curve import machine
from toyworld.compare import EvalPlan, RunResult, RunSpec, override_flags, results_records, runs_grid
from toyworld.compare_jobs import make_jobs, run_all_parallel
from toyworld.methods import (
    METHODS,
    RECIPE,
    RECIPE_SOURCE,
    REFERENCE_BUDGET,
    TARGET_MODULES,
    budget_label,
    method_name,
)
from toyworld.paths import RESULTS as RESULTS_DIR
from toyworld.paths import SAMPLES
from toyworld.report import (
    PROMPT_TARGET,
    SUBJECT_TARGET,
    PlotData,
    Record,
    adapter_settings_table,
    best_setting,
    estimate,
    grid_runs,
    headline_table,
    load_learning_curve,
    paired_lines,
    per_subject_tables,
    plot_quality_vs_params,
    plot_quality_vs_steps,
    summary_table,
    target_progress,
)
from toyworld.runner import default_jobs, read_cached, use_one_thread
from toyworld.subjects import DEFAULT_SUBJECT, SUBJECTS, get_subject

SEEDS = (0, 1, 2)
EVAL_SEEDS, QUICK_EVAL_SEEDS = (0, 1, 2, 3), (0, 1)
QUICK_STEPS = 40
LR_SWEEP_SUBJECT = "star"
LR_SWEEP_RATES = (1e-3, 2e-3, 4e-3, 8e-3)

# --prior: the prior-preservation settings each planned run is trained with.
PRIOR_CHOICES = {"on": (True,), "off": (False,), "both": (False, True)}

RESULTS = RESULTS_DIR / "subject_driven.md"
LR_SWEEP_RESULTS = RESULTS_DIR / "subject_driven_lr_sweep.md"
LEARNING_CURVES = RESULTS_DIR / "learning_curves.json"

LEGEND = (
    "Columns (the evaluator never sees how an image was made; benchmarks/results/evaluator.md):\n"
    "- subject fidelity: mean P(this subject) of the which-subject CNN over the instance-prompt images "
    "(DreamBooth's DINO analogue);\n"
    "- subject similarity: cosine similarity of the object's appearance features to the instance images "
    "(CLIP-I analogue);\n"
    "- prompt fidelity: fraction of instance-prompt images showing the background named (CLIP-T analogue), for the "
    "two backgrounds the instance images show (seen) and the one they never show (unseen: recontextualisation);\n"
    "- class preservation: fraction of class-prompt images that are the plain class, not the subject "
    "(language drift).\n"
    "Budgets are LoRA ranks: the parameter count of a LoRA of that rank (LoRA r4 = 1x); Lily, DoRA, LoKr and LoHa "
    "are the largest adapter not above it (`--match_lora_budget`). Values are means over (subject, seed) runs with "
    "their 95% bootstrap interval [low, high] and the number of runs n ((n=1): one run, no interval).\n"
)


def recipe_spec(method: str, budget: int, subject: str, seed: int, steps: int | None = None) -> RunSpec:
    """The run of `method` at `budget` on `subject` with its `RECIPE` (its steps unless `steps` is given)."""
    recipe = RECIPE[method]
    return RunSpec(
        method,
        recipe.learning_rate_at(budget),
        recipe.prior,
        seed,
        steps or recipe.steps,
        subject,
        budget,
        tuple(recipe.flags),
    )


def full_plan(
    methods: Sequence[str],
    subjects: Sequence[str] = tuple(SUBJECTS),
    seeds: Sequence[int] = SEEDS,
    optional_budgets: bool = False,
) -> list[RunSpec]:
    """Every method at each of its budgets (with `optional_budgets`, also its optional ones), on every subject, with
    every training seed; in the order an interrupted run is most useful in: the rank-4 budget first (every method
    compared), then the other budgets; within a budget seed by seed, so that each finished seed holds every method on
    every subject (paired comparisons)."""
    runs = [
        recipe_spec(method, budget, subject, seed)
        for method in methods
        for budget in (METHODS[method].all_budgets if optional_budgets else METHODS[method].budgets)
        for subject in subjects
        for seed in seeds
    ]
    order = {method: i for i, method in enumerate(methods)}
    return sorted(runs, key=lambda r: (r.budget != REFERENCE_BUDGET, r.budget, r.seed, order[r.method]))


def quick_plan(subject: str, steps: int) -> list[RunSpec]:
    """Lily and LoRA at the rank-4 budget on one subject, one seed, `steps` steps."""
    return [recipe_spec(method, REFERENCE_BUDGET, subject, 0, steps) for method in ("lily", "lora")]


def lr_sweep_plan(
    methods: Sequence[str], subject: str, learning_rates: Sequence[float], steps: int | None = None
) -> list[RunSpec]:
    """Each method at the rank-4 budget on one subject, one seed, at each learning rate (the rest of its recipe)."""
    return [
        dataclasses.replace(recipe_spec(method, REFERENCE_BUDGET, subject, 0, steps), learning_rate=lr)
        for method in methods
        for lr in learning_rates
    ]


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 subject, Lily and LoRA at the rank-4 budget, 1 seed.")
    mode.add_argument(
        "--lr_sweep", action="store_true", help="Each method at the rank-4 budget on one subject at each lr, 1 seed."
    )
    parser.add_argument(
        "--subject",
        choices=sorted(SUBJECTS),
        default=None,
        help=f"The subject of --quick (default {DEFAULT_SUBJECT.name}) or --lr_sweep (default {LR_SWEEP_SUBJECT}).",
    )
    parser.add_argument(
        "--learning_rates",
        type=float,
        nargs="+",
        default=None,
        help=f"The learning rates of --lr_sweep (default {' '.join(f'{lr:g}' for lr in LR_SWEEP_RATES)}).",
    )
    parser.add_argument(
        "--lr_scheduler",
        choices=[kind.value for kind in SchedulerType],
        default=None,
        help="The learning-rate schedule of every run (default: each method's RECIPE schedule). A run whose "
        "schedule is not constant has it in its name (star-lily-budget4-lr0.003-cosine-noprior-seed0).",
    )
    parser.add_argument(
        "--prior",
        choices=tuple(PRIOR_CHOICES),
        default=None,
        help="Prior preservation in every run (default: each method's RECIPE); both: every run once with it and "
        "once without (with --lr_sweep, each method's best of lr x prior). The run's name says which "
        "(star-lora-budget4-lr0.002-cosine-noprior-seed0).",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="Methods to train (default: every method of toyworld.methods the training script can train).",
    )
    parser.add_argument(
        "--optional_budgets",
        action="store_true",
        help="The full run also trains each method at its optional budgets (Lily at 2x the rank-4 budget: 12 more "
        "trainings, about 8 min on 2 cores).",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help=f"Training steps per run (default: RECIPE's; quick: {QUICK_STEPS})."
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
        "--report_only",
        action="store_true",
        help="Train nothing: write the results from the runs --work_dir has finished, marked as partial if any "
        "planned run is missing.",
    )
    parser.add_argument(
        "--rescore",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="Train nothing: score the adapters of the finished run whose results JSON this is (they are in "
        "--work_dir) with this invocation's scorer, e.g. at another guidance. Each run's training time, and the "
        "command and wall time of the run that trained them, come from that file.",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="Trainings at once, one process each (default: one per core)."
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help=f"Markdown output (default {RESULTS}; --lr_sweep: {LR_SWEEP_RESULTS.name}; quick: none); per-run "
        "scores go beside it as .json.",
    )
    parser.add_argument(
        "--inference_steps", type=int, default=EvalPlan.steps, help="Denoising steps per scored image."
    )
    parser.add_argument(
        "--learning_curve",
        type=Path,
        default=None,
        help=f"A learning-curve JSON to plot quality vs steps from (default for the full run: {LEARNING_CURVES}).",
    )
    parser.add_argument(
        "--grids",
        type=Path,
        default=None,
        help=f"Folder for one grid per subject (default for the full run: {SAMPLES}; otherwise none).",
    )
    args = parser.parse_args(input_args)
    for name in ("inference_steps", "steps", "jobs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    if args.subject is not None and not (args.quick or args.lr_sweep):
        parser.error("--subject is for --quick and --lr_sweep (the full run trains every subject)")
    if args.learning_rates is not None and not args.lr_sweep:
        parser.error("--learning_rates is for --lr_sweep (the other runs take each method's RECIPE learning rate)")
    if args.learning_rates is not None and min(args.learning_rates) <= 0:
        parser.error(f"--learning_rates must be positive, got {args.learning_rates}")
    if args.optional_budgets and (args.quick or args.lr_sweep):
        parser.error("--optional_budgets is for the full run (--quick and --lr_sweep train the rank-4 budget only)")
    if args.methods is not None and args.quick:
        parser.error("--methods is not for --quick (it trains Lily and LoRA)")
    for method in args.methods or ():
        if method not in METHODS:
            parser.error(f"--methods {method}: unknown; the methods are {', '.join(METHODS)}")
    if args.learning_curve is not None and not args.learning_curve.is_file():
        parser.error(f"--learning_curve {args.learning_curve} is not a file")
    if args.report_only and args.work_dir is None:
        parser.error("--report_only needs --work_dir (the folder whose finished runs it reports)")
    if args.resume and args.work_dir is None:
        parser.error("--resume needs --work_dir (the folder whose cached scores it continues from)")
    if args.rescore is not None and (args.work_dir is None or args.report_only):
        parser.error("--rescore needs --work_dir (the folder holding the adapters) and scores, so not --report_only")
    if args.rescore is not None and not args.rescore.is_file():
        parser.error(f"--rescore {args.rescore} is not a file")
    cached = sorted((args.work_dir / "scores").glob("*.json")) if args.work_dir is not None else []
    if cached and not (args.resume or args.report_only or args.rescore):
        parser.error(
            f"{args.work_dir} already holds {len(cached)} finished runs' scores; pass --resume to continue from "
            "them, or choose another --work_dir"
        )
    return args


def plan_of(args: argparse.Namespace) -> list[RunSpec]:
    """The runs the arguments ask for."""
    methods = args.methods or list(METHODS)
    if args.quick:
        plan = quick_plan(args.subject or DEFAULT_SUBJECT.name, args.steps or QUICK_STEPS)
    elif args.lr_sweep:
        rates = args.learning_rates or LR_SWEEP_RATES
        plan = lr_sweep_plan(methods, args.subject or LR_SWEEP_SUBJECT, rates, args.steps)
    else:
        runs = full_plan(methods, optional_budgets=args.optional_budgets)
        plan = [recipe_spec(s.method, s.budget, s.subject, s.seed, args.steps) for s in runs]
    if args.prior is not None:
        priors = PRIOR_CHOICES[args.prior]
        plan = [dataclasses.replace(spec, prior=prior) for spec in plan for prior in priors]
    return plan if args.lr_scheduler is None else [with_schedule(spec, args.lr_scheduler) for spec in plan]


def with_schedule(spec: RunSpec, schedule: str) -> RunSpec:
    """The run with `--lr_scheduler=schedule` in place of its recipe's (its name says so unless constant)."""
    return dataclasses.replace(
        spec, extra_flags=tuple(override_flags(spec.extra_flags, [f"--lr_scheduler={schedule}"]))
    )


def finished_seconds(specs: Sequence[RunSpec], work_dir: Path, plan: EvalPlan) -> dict[str, float]:
    """The runs of `specs` that `work_dir`'s cache holds for these settings, by name: the seconds each one's job took
    (training and scoring, in one process)."""
    cache_dir = work_dir / "scores"
    runs = [job for job in make_jobs(specs, work_dir, plan) if job.payload.spec is not None]  # not the base model
    cached = {job.name: read_cached(job, cache_dir) for job in runs}
    return {name: entry.seconds for name, entry in cached.items() if entry is not None}


# what a results JSON's "trainings" records about the invocation that trained its runs (`main` writes them)
TRAININGS_FIELDS = ("command", "wall_minutes", "machine", "jobs", "earlier_runs")


def rescore_inputs(results_json: Path, specs: Sequence[RunSpec], work_dir: Path) -> tuple[dict[str, float], dict]:
    """For `--rescore`: each run's training seconds by name, and the `trainings` record (command, wall time,
    machine) of the finished run whose results JSON is `results_json`. `SystemExit` in one sentence unless that
    file trained every planned run with the same spec and `work_dir` holds each one's adapter file at its size."""
    try:
        data = json.loads(results_json.read_text())
        records = {str(r["name"]): r for r in data["runs"]}
        trainings = data["trainings"]
        absent = [key for key in TRAININGS_FIELDS if key not in trainings]
        if absent:
            raise KeyError(f"trainings lacks {', '.join(absent)}")
    except (ValueError, KeyError, TypeError) as error:
        raise SystemExit(
            f"error: --rescore {results_json} is not a results file that records what trained its runs ({error!r})"
        ) from None

    def same_spec(record: dict | None, spec: RunSpec) -> bool:
        return record is not None and spec == RunSpec(
            **{f.name: record.get(f.name) for f in dataclasses.fields(RunSpec)}
            | {"extra_flags": tuple(record.get("extra_flags") or ())}
        )

    def has_adapter(spec: RunSpec) -> bool:
        size = records[spec.name]["file_bytes"]
        return any(p.stat().st_size == size for p in (work_dir / spec.name).glob("*.safetensors"))

    unmatched = [spec.name for spec in specs if not same_spec(records.get(spec.name), spec)]
    missing = [] if unmatched else [spec.name for spec in specs if not has_adapter(spec)]
    for names, what in ((unmatched, f"{results_json} did not train"), (missing, f"{work_dir} lacks the adapter of")):
        if names:
            listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise SystemExit(f"error: --rescore: {what} {len(names)} planned run(s): {listed}")
    return {spec.name: float(records[spec.name]["train_seconds"]) for spec in specs}, trainings


def trainings_line(trainings: dict, results_json: Path, work_dir: Path) -> str:
    """Where a rescored report's adapters and training times come from."""
    earlier = trainings["earlier_runs"]
    return (
        f"Trained nothing: the adapters in `{work_dir}` are those of the run in `{results_json.name}`, trained by "
        f"`{trainings['command']}` ({trainings['wall_minutes']} min wall on {trainings['machine']}, "
        f"{trainings['jobs']} training processes"
        + (f"; {earlier} of its runs trained by earlier invocations in its work folder" if earlier else "")
        + "); the training times above are that run's."
    )


def partial_note(missing: Sequence[RunSpec], planned: int, argv: Sequence[str]) -> str:
    """The block that marks a report of an unfinished plan, naming what is missing and the command (this one's
    arguments, training instead of `--report_only`) that continues it."""
    if not missing:
        return ""
    counts = Counter((spec.method, spec.budget) for spec in missing)
    what = ", ".join(f"{method_name(m)} at {budget_label(b)}: {n}" for (m, b), n in counts.items())
    flags = [flag for flag in argv if flag != "--report_only"]
    again = shlex.join(
        ["python", "-m", "benchmarks.subject_driven", *flags, *(["--resume"] * ("--resume" not in flags))]
    )
    return (
        f"> **Partial: {planned - len(missing)} of {planned} planned runs have finished.** Every table below holds "
        f"only the finished runs. Missing runs: {what}. `{again}` trains only the missing ones.\n\n"
    )


def write_plots(records: Sequence[dict[str, object]], results: Path, learning_curve: Path | None) -> list[PlotData]:
    """Quality vs parameters (and vs steps, given a learning curve) as PNGs beside the results file."""
    if not records:
        return []
    plots = [plot_quality_vs_params(records, results.with_name(f"{results.stem}_params.png"))]
    if learning_curve is not None:
        points = load_learning_curve(learning_curve)
        plots.append(plot_quality_vs_steps(points, results.with_name(f"{results.stem}_steps.png")))
    return plots


def write_grids(
    results: Sequence[RunResult], records: Sequence[dict[str, object]], plan: EvalPlan, folder: Path
) -> list[Path]:
    """Per subject, the target, the base model and the best Lily, LoRA and other adapter (`report.grid_runs`)."""
    by_name = {result.spec.name: result for result in results}
    others = [m for m in dict.fromkeys(str(r["method"]) for r in records) if m not in ("lily", "lora")]
    paths = []
    for name in dict.fromkeys(str(r["subject"]) for r in records):
        subject = get_subject(name)
        budget, reached, chosen = grid_runs(records, name, others)
        runs = [by_name[str(record["name"])] for record in chosen]
        why = "the smallest where a method learns the subject" if reached else "no method learns the subject"
        steps = _joined(f"{r['steps']} steps" for r in chosen)
        title = (
            f'"{subject.instance_prompt}": target, base model, best run per method at the {budget_label(budget)} '
            f"budget ({why}; {steps})"
        )
        prompts = [subject.caption(subject.seen_backgrounds[0]), subject.caption(subject.unseen_background)]
        grid = runs_grid(runs, subject, plan, [*prompts, subject.class_prompt], title)
        path = folder / f"subject_driven_grid_{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        paths.append(path)
    return paths


def _joined(values: Iterable[object]) -> str:
    """The distinct values in order, comma-separated."""
    return ", ".join(str(v) for v in dict.fromkeys(values))


def prior_words(prior: object) -> str:
    """'prior preservation' or 'no prior', as the reports write a run's setting."""
    return "prior preservation" if prior else "no prior"


def plan_lines(records: Sequence[Record]) -> str:
    """One markdown line per method: the budgets, steps, learning rates and training flags its runs had."""
    lines = []
    for method in dict.fromkeys(str(r["method"]) for r in records):
        own = [r for r in records if r["method"] == method]
        budgets = _joined(f"r{b}" for b in sorted({int(r["budget_rank"]) for r in own}))
        rates = _joined(f"{float(r['learning_rate']):g}" for r in own)
        flags = _joined(" ".join(f"`{flag}`" for flag in r["extra_flags"]) or "no further flags" for r in own)
        steps = _joined(r["steps"] for r in own)
        prior = _joined(prior_words(r["prior"]) for r in own)
        lines.append(f"- {method_name(method)}: budgets {budgets}; {steps} steps, lr {rates}, {prior}; {flags}")
    return "\n".join(lines) + "\n"


def lr_sweep_lines(records: Sequence[dict[str, object]]) -> str:
    """Per method, its best setting (learning rate, prior preservation) by `report.target_progress` (what RECIPE
    should then fix)."""
    lines = []
    for method in dict.fromkeys(str(r["method"]) for r in records):
        group = best_setting(records, method, REFERENCE_BUDGET, "target")
        if group:
            lr = float(group[0]["learning_rate"])  # type: ignore[arg-type]
            lines.append(
                f"- {method_name(method)}: lr {lr:g}, {prior_words(group[0]['prior'])} "
                f"(subject fidelity {estimate(group, 'subject')}, "
                f"prompt fidelity {estimate(group, 'background')}, "
                f"progress to the target {target_progress(group):.2f})"
            )
    return "\n".join(lines) + "\n"


def render_report(
    args: argparse.Namespace,
    records: Sequence[dict[str, object]],
    base_scores: dict[str, dict[str, float]],
    plan: EvalPlan,
    extras: Sequence[str],
) -> str:
    """The results file's text above its footer (plots, grids, failures, wall time and command)."""
    subjects = list(dict.fromkeys(str(r["subject"]) for r in records))
    scoring = (
        f"Scores over {len(plan.seeds)} generation seeds x 3 subject prompts (two seen backgrounds, one unseen) and "
        f"{len(plan.class_seeds)} class-prompt images; {plan.steps} inference steps, guidance {plan.guidance_scale}. "
        f"Every adapter trains the UNet's {', '.join(f'`{name}`' for name in TARGET_MODULES)} layers "
        "(`TARGET_MODULES`, toyworld/methods.py)."
    )
    if args.lr_sweep:
        return (
            f"# Learning-rate sweep: each method at the {budget_label(REFERENCE_BUDGET)} budget on "
            f"{', '.join(subjects)}\n\n"
            f"One training seed per (method, lr). {scoring}\n\nRuns:\n{plan_lines(records)}\n"
            f"{summary_table(records, base_scores.get(subjects[0]) if subjects else None)}\n{LEGEND}\n"
            "## Best learning rate per method\n\nEach method's best lr (and prior preservation, where both were "
            "run) on this one subject is then fixed in `RECIPE` (toyworld/methods.py) for every subject of the full "
            "sweep. Best means the highest "
            f"progress to the target: min(subject fidelity / {SUBJECT_TARGET}, prompt fidelity / {PROMPT_TARGET}), "
            "so a rate that learns the subject by losing the asked background does not win.\n\n"
            f"{lr_sweep_lines(records)}\n"
        )
    settings = adapter_settings_table(records)
    return (
        "# Subject-driven generation: Lily vs LoRA and peft's adapters on the toy world\n\n"
        f"{len(records)} runs: each method at each of its budgets (LoRA ranks) x {len(subjects)} subjects "
        f"({', '.join(subjects)}) x training seeds {_joined(sorted({r['seed'] for r in records}))}. {scoring}\n\n"
        f"Each method's learning rate is picked by `--lr_sweep` on one subject, then fixed for every subject "
        f"(`RECIPE`; here: {RECIPE_SOURCE}). Runs:\n{plan_lines(records)}\n"
        f"## Headline\n\nA method learns the subject at a budget when its runs there have mean subject fidelity >= "
        f"{SUBJECT_TARGET} and mean prompt fidelity (all three backgrounds) >= {PROMPT_TARGET}.\n\n"
        f"{headline_table(records)}\n"
        "## Lily vs LoRA, paired over (subject, seed)\n\nSame subject, training seed and prompts; each method at its "
        "best setting at the budget.\n\n"
        + "\n".join([*paired_lines(records), *paired_lines(records, "background_unseen")] or ["(no budget with both)"])
        + f"\n\n## All runs\n\n{summary_table(records)}\n{LEGEND}\n"
        + (f"## Adapter sizes\n\n{settings}\n" if settings else "")
        + f"## Per subject\n\n{per_subject_tables(records, base_scores)}\n"
        + "".join(extras)
    )


def main(input_args: Sequence[str] | None = None) -> str:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = list(sys.argv[1:] if input_args is None else input_args)
    args = parse_args(argv)
    use_one_thread()
    full = not (args.quick or args.lr_sweep)
    specs = plan_of(args)
    plan = EvalPlan(seeds=QUICK_EVAL_SEEDS if args.quick else EVAL_SEEDS, steps=args.inference_steps)
    results_path = args.results or (RESULTS if full else LR_SWEEP_RESULTS if args.lr_sweep else None)
    grids_dir = args.grids or (SAMPLES if full else None)
    learning_curve = args.learning_curve or (LEARNING_CURVES if full and LEARNING_CURVES.is_file() else None)
    n_jobs = args.jobs or default_jobs()
    logging.getLogger(__name__).info("%d runs, %d at a time", len(specs), n_jobs)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work_dir = args.work_dir or Path(scratch)
        trained, trainings = rescore_inputs(args.rescore, specs, work_dir) if args.rescore else ({}, None)
        before = finished_seconds(specs, work_dir, plan)
        to_run = [spec for spec in specs if spec.name in before] if args.report_only else specs
        results, base_scores, failed = run_all_parallel(to_run, work_dir, plan, n_jobs, work_dir / "scores", trained)
        records = results_records(results)
        grids = write_grids(results, records, plan, grids_dir) if grids_dir is not None and records else []
        run_seconds = finished_seconds(specs, work_dir, plan)
    minutes = (time.perf_counter() - started) / 60
    missing = [spec for spec in specs if spec.name not in run_seconds]
    process_hours = sum(run_seconds.values()) / 3600
    # an lr sweep has one budget: no quality-vs-parameters plot
    plots = (
        write_plots(records, results_path, learning_curve) if results_path is not None and not args.lr_sweep else []
    )
    extras = [f"![{p.title}]({p.path.name})\n\n" for p in plots]
    if grids:
        extras.append("## Grids\n\n")
        where = results_path.parent if results_path is not None else Path.cwd()
        extras += [f"![{path.stem}]({os.path.relpath(path, where)})\n\n" for path in grids]
    failures = "".join(f"- {o.job.name}: {o.error}\n" for o in failed)
    title, _, body = render_report(args, records, base_scores, plan, extras).partition("\n\n")
    command = shlex.join(["python", "-m", "benchmarks.subject_driven", *argv])
    where = machine()
    own = "scoring" if args.rescore else "training and scoring"
    report = (
        f"{title}\n\n{partial_note(missing, len(specs), argv)}{body}"
        + (f"## Failed runs\n\n{failures}\n" if failures else "")
        + (f"{trainings_line(trainings, args.rescore, work_dir)}\n\n" if trainings else "")
        + f"{len(run_seconds)} of {len(specs)} planned runs finished, {len(before)} of them by earlier invocations "
        f"(their scores cached in the work folder). Every finished run's own time, {own} in one "
        f"process with one torch thread, sums to {process_hours:.2f} process-hours: about "
        f"{process_hours / n_jobs:.2f} h of wall time at {n_jobs} processes. This invocation: {minutes:.1f} min wall "
        f"on {where}, {n_jobs} processes.\n\n"
        f"```bash\n{command}\n```\n"
    )
    if results_path is not None:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(report)
        # what trained the adapters: this invocation, or (rescored) the run whose file it read
        trainings = trainings or dict(
            zip(TRAININGS_FIELDS, (command, round(minutes, 1), where, n_jobs, len(before)), strict=True)
        )
        data = {"plan": dataclasses.asdict(plan), "trainings": trainings, "base_model": base_scores, "runs": records}
        data["failed"] = {o.job.name: o.error for o in failed}
        results_path.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    logging.getLogger(__name__).info("%s", report)
    if failed:
        again = f"rerun with --work_dir {args.work_dir} --resume" if args.work_dir else "rerun with --work_dir"
        raise SystemExit(f"{len(failed)} of the runs failed (listed above); {again} to retry only those")
    return report


if __name__ == "__main__":
    main()
