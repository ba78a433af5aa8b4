#!/usr/bin/env python
"""How much of a subject-driven score's spread is evaluation noise and how much is the training seed.

Each trained run (a folder of the benchmark, e.g. `benchmarks/results/subject_driven_runs/<name>`) is scored with
the benchmark's scorer (`toyworld.compare.score`) on several disjoint sets of generation seeds: the benchmark's own
set (0-3) first, then sets from 100 on. Runs that differ only in their training seed form a group. The spread of a
run's scores over seed sets is the evaluation noise of one benchmark score; the spread of a group's run means is
the training seed's:

    python -m benchmarks.eval_noise --runs benchmarks/results/subject_driven_runs/square-lora-budget4-*-seed[012]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline

from benchmarks.learning_curve import machine, results_footer
from lily_diffusion.grids import describe_adapter
from toyworld.compare import EvalPlan, score
from toyworld.evaluate import ToyEvaluator
from toyworld.paths import BASE_MODEL_DIR, RESULTS
from toyworld.subjects import get_subject

logger = logging.getLogger(__name__)

RESULTS_MD = RESULTS / "eval_noise.md"
SEEDS_PER_SET = len(EvalPlan.seeds)
METRICS = ("subject", "background_unseen")
SEED_SUFFIX = re.compile(r"-seed\d+$")


@dataclass(frozen=True)
class Spread:
    """Standard deviations of one metric: of a run's score over seed sets (mean over runs), and of a group's run
    means over training seeds (mean over groups of two or more runs)."""

    evaluation: float
    training: float


def group_of(run: str) -> str:
    """A run's name without its training seed: the runs of one (subject, method, budget, lr, prior)."""
    return SEED_SUFFIX.sub("", run)


def seed_sets(count: int) -> list[tuple[int, ...]]:
    """The benchmark's generation seeds, then `count - 1` disjoint sets of as many from seed 100 on."""
    extra = [tuple(range(100 + SEEDS_PER_SET * k, 100 + SEEDS_PER_SET * (k + 1))) for k in range(count - 1)]
    return [EvalPlan.seeds, *extra]


def spread(scores: Mapping[str, Sequence[float]]) -> Spread:
    """`scores`: each run's metric on every seed set. Runs need two or more sets; a group needs two or more runs
    to count towards the training spread (NaN if none has)."""
    if any(len(values) < 2 for values in scores.values()):
        raise ValueError("every run needs scores on two or more seed sets")
    evaluation = statistics.fmean(statistics.stdev(values) for values in scores.values())
    groups: dict[str, list[float]] = {}
    for run, values in scores.items():
        groups.setdefault(group_of(run), []).append(statistics.fmean(values))
    between = [statistics.stdev(means) for means in groups.values() if len(means) > 1]
    return Spread(evaluation, statistics.fmean(between) if between else float("nan"))


def score_runs(runs: Sequence[Path], sets: Sequence[tuple[int, ...]]) -> dict[str, dict[str, list[float]]]:
    """Per run, per metric, its score on each seed set."""
    pipe = StableDiffusionXLPipeline.from_pretrained(BASE_MODEL_DIR, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    evaluator = ToyEvaluator.load()
    table: dict[str, dict[str, list[float]]] = {}
    for folder in runs:
        subject = get_subject(folder.name.split("-", 1)[0])
        adapter = describe_adapter(folder.name, folder)
        per_set = [score(pipe, adapter, evaluator, EvalPlan(seeds=seeds), subject) for seeds in sets]
        table[folder.name] = {metric: [scores[metric] for scores in per_set] for metric in METRICS}
        logger.info("%s: subject fidelity %s", folder.name, [round(v, 3) for v in table[folder.name]["subject"]])
    return table


def render(table: Mapping[str, Mapping[str, Sequence[float]]], sets: Sequence[tuple[int, ...]], footer: str) -> str:
    """The results file: per run its scores on each seed set, then the two spreads per metric."""
    header = " | ".join(f"seeds {s[0]}-{s[-1]}" for s in sets)
    lines = [
        "# Evaluation noise vs training-seed spread (subject-driven benchmark)",
        "",
        "Each run is scored by the benchmark's scorer on disjoint sets of generation seeds, 4 per prompt (the "
        "benchmark scores seeds 0-3 only). Evaluation = standard deviation of one run's score over the seed sets "
        "(mean over runs): the noise of one benchmark score. Training seed = standard deviation of the run means "
        "over training seeds within a group (same subject, method, budget, lr; mean over groups).",
        "",
        "## Subject fidelity per seed set",
        "",
        f"| run | {header} | mean |",
        "|---|" + "---:|" * (len(sets) + 1),
    ]
    for run, metrics in table.items():
        values = metrics["subject"]
        cells = " | ".join(f"{v:.3f}" for v in values)
        lines.append(f"| {run} | {cells} | {statistics.fmean(values):.3f} |")
    lines += ["", "## Spread (standard deviation)", "", "| metric | evaluation (one seed set) | training seed |"]
    lines.append("|---|---:|---:|")
    for metric in METRICS:
        result = spread({run: metrics[metric] for run, metrics in table.items()})
        lines.append(f"| {metric} | {result.evaluation:.3f} | {result.training:.3f} |")
    return "\n".join(lines) + "\n\n" + footer


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="Trained run folders of the benchmark.")
    parser.add_argument("--sets", type=int, default=4, help="Seed sets per run (two or more; default 4).")
    parser.add_argument("--results", type=Path, default=RESULTS_MD, help="Markdown output (JSON beside it).")
    args = parser.parse_args(input_args)
    if args.sets < 2:
        parser.error("--sets must be at least 2 (one set has no spread)")
    missing = [str(path) for path in args.runs if not path.is_dir()]
    if missing:
        parser.error(f"not run folders: {', '.join(missing)}")
    return args


def main(input_args: Sequence[str] | None = None) -> dict[str, dict[str, list[float]]]:
    args = parse_args(input_args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    started, where = time.perf_counter(), machine()
    sets = seed_sets(args.sets)
    table = score_runs(args.runs, sets)
    footer = results_footer("benchmarks.eval_noise", input_args, started, where)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(render(table, sets, footer))
    args.results.with_suffix(".json").write_text(json.dumps({"seed_sets": sets, "scores": table}, indent=1) + "\n")
    logger.info("wrote %s", args.results)
    return table


if __name__ == "__main__":
    main()
