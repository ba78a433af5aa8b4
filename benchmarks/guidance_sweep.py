#!/usr/bin/env python
"""How the subject-driven scores depend on the guidance scale: the saved adapters of a finished benchmark run,
re-scored at several guidance scales (no training).

    python -m benchmarks.guidance_sweep --budget 4 --guidance_scales 2 3.5 5 --jobs 2

Every run of `--budget` in the benchmark's JSON (`--benchmark`) is scored with the benchmark's scorer
(`toyworld.compare.score`: the same prompts, seeds and steps) at each guidance scale, and so is the base model on
each subject. Subject fidelity is also shown on each background, because a subject can be drawn right on one
background and wrong on another. Scores are cached per (run, guidance) in `--cache_dir`: an interrupted sweep
continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.learning_curve import machine, results_footer, write_keeping_notes
from lily_diffusion.grids import GridAdapter, describe_adapter
from toyworld.compare import EvalPlan, score
from toyworld.compare_jobs import files_fingerprint, pipeline_and_evaluator
from toyworld.methods import method_name
from toyworld.paths import BASE_MODEL_DIR, EVALUATOR_DIR, REPO, RESULTS, SUBJECTS_DIR
from toyworld.render import BACKGROUNDS
from toyworld.report import budget_of, estimate, subject_of
from toyworld.runner import Job, run_jobs
from toyworld.subjects import SUBJECTS, get_subject

logger = logging.getLogger(__name__)

BENCHMARK = RESULTS / "subject_driven.json"
RUNS_DIR = RESULTS / "subject_driven_runs"
RESULTS_MD = RESULTS / "guidance_sweep.md"
CACHE_DIR = REPO / "output" / "guidance_sweep"
GUIDANCE_SCALES = (2.0, 3.5, 5.0)
NOTES_HEADING = "## Reading the sweep"  # a hand-written section of the results file, kept on every rewrite
BASE_RUN = "base model"


@dataclass(frozen=True)
class SweepPayload:
    """One scoring: a run's adapter folder (None: the base model) on its subject, with the benchmark's plan at one
    guidance scale."""

    run: str
    folder: Path | None
    subject: str
    plan: EvalPlan


def score_at_guidance(payload: SweepPayload) -> dict[str, Any]:
    """The worker: the scores of one adapter (or the base model) with the payload's plan."""
    pipe, evaluator = pipeline_and_evaluator()
    if payload.folder is None:
        adapter = GridAdapter("base", None, "base", 0)
    else:
        adapter = describe_adapter(payload.run, payload.folder)
    return {"scores": score(pipe, adapter, evaluator, payload.plan, get_subject(payload.subject))}


def sweep_runs(records: Sequence[dict[str, Any]], budget: int, subjects: Sequence[str]) -> list[dict[str, Any]]:
    """The benchmark's runs at `budget` on `subjects`, in file order."""
    return [r for r in records if budget_of(r) == budget and subject_of(r) in subjects]


def make_jobs(
    runs: Sequence[dict[str, Any]], runs_dir: Path, guidance_scales: Sequence[float]
) -> list[Job[SweepPayload]]:
    """The base model on each subject, then every run, at every guidance scale; settings hold what a score depends
    on (the adapter file's bytes among them, through the fingerprint of its folder)."""
    models = files_fingerprint(BASE_MODEL_DIR, EVALUATOR_DIR, SUBJECTS_DIR)
    plans = {g: replace(EvalPlan(), guidance_scale=g) for g in guidance_scales}
    jobs = []
    for subject in dict.fromkeys(subject_of(r) for r in runs):
        for g in guidance_scales:
            payload = SweepPayload(BASE_RUN, None, subject, plans[g])
            settings = {"base": subject, "plan": asdict(plans[g]), "models": models}
            jobs.append(Job(f"{BASE_RUN}-{subject}-g{g:g}", payload, settings))
    for run in runs:
        folder = runs_dir / run["name"]
        fingerprint = files_fingerprint(folder)
        for g in guidance_scales:
            payload = SweepPayload(run["name"], folder, subject_of(run), plans[g])
            settings = {"run": run["name"], "adapter": fingerprint, "plan": asdict(plans[g]), "models": models}
            jobs.append(Job(f"{run['name']}-g{g:g}", payload, settings))
    return jobs


def render(
    rows: Sequence[dict[str, Any]],
    guidance_scales: Sequence[float],
    budget: int,
    benchmark: str,
    benchmark_guidance: float | None,
    footer: str,
) -> str:
    """Markdown: per subject, one row per (method, guidance) with each score's mean [95% CI] over the seeds."""
    columns = ["subject", *(f"subject_{b}" for b in BACKGROUNDS), "background_seen", "background_unseen"]
    columns.append("class_preservation")
    names = ["subject fidelity", *(f"subject fidelity, {b}" for b in BACKGROUNDS)]
    names += ["prompt fidelity, seen", "prompt fidelity, unseen", "class preservation"]
    lines = [
        "# Subject-driven scores by guidance scale",
        "",
        f"The benchmark's saved adapters at the LoRA r{budget} budget (`{benchmark}`, every seed), scored "
        f"again with its scorer at guidance {', '.join(f'{g:g}' for g in guidance_scales)} ("
        + (
            "its file does not record the benchmark's guidance"
            if benchmark_guidance is None
            else f"the benchmark scored them at {benchmark_guidance:g}"
        )
        + "). Cells: mean [95% bootstrap interval] over the training seeds; "
        "subject fidelity is also split by the background the prompt asks for.",
        "",
    ]
    for subject in dict.fromkeys(r["subject"] for r in rows):
        seen = ", ".join(get_subject(subject).seen_backgrounds)
        lines += [f"## {subject} (seen backgrounds: {seen})", ""]
        lines.append("| method | guidance | " + " | ".join(names) + " | n |")
        lines.append("|---|---:|" + "---:|" * len(names) + "---:|")
        for method in dict.fromkeys(r["method"] for r in rows if r["subject"] == subject):
            for g in guidance_scales:
                group = [r for r in rows if (r["subject"], r["method"], r["guidance"]) == (subject, method, g)]
                if not group:
                    continue
                cells = [str(estimate(group, column)) for column in columns]
                label = "base model" if method == BASE_RUN else method_name(method)
                lines.append(f"| {label} | {g:g} | " + " | ".join(cells) + f" | {len(group)} |")
        lines.append("")
    return "\n".join(lines) + "\n" + footer


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", type=Path, default=BENCHMARK, help="The benchmark's JSON (its runs).")
    parser.add_argument("--runs_dir", type=Path, default=RUNS_DIR, help="Where its runs' adapter folders are.")
    parser.add_argument("--budget", type=int, default=4, help="The LoRA rank whose budget's runs are scored.")
    parser.add_argument("--subjects", nargs="+", choices=sorted(SUBJECTS), default=list(SUBJECTS))
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=list(GUIDANCE_SCALES))
    parser.add_argument("--jobs", type=int, default=None, help="Scoring processes (default: one per 2 cores).")
    parser.add_argument("--cache_dir", type=Path, default=CACHE_DIR, help="Per-(run, guidance) scores.")
    parser.add_argument("--results", type=Path, default=RESULTS_MD, help="Markdown output (JSON beside it).")
    args = parser.parse_args(input_args)
    if any(not math.isfinite(g) or not 1.0 <= g <= 100.0 for g in args.guidance_scales):
        parser.error(f"--guidance_scales must be numbers from 1 to 100, not {args.guidance_scales}")
    if args.budget < 1 or (args.jobs is not None and args.jobs < 1):
        parser.error("--budget and --jobs must be at least 1")
    if not args.benchmark.is_file():
        parser.error(f"--benchmark {args.benchmark} is not a file; run python -m benchmarks.subject_driven first")
    args.guidance_scales = sorted(set(args.guidance_scales))
    return args


def main(input_args: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Score, write the Markdown and JSON results, return one row per scored (run, guidance)."""
    args = parse_args(input_args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started, where = time.perf_counter(), machine()
    benchmark = json.loads(args.benchmark.read_text())
    runs = sweep_runs(benchmark["runs"], args.budget, args.subjects)
    missing = sorted({r["name"] for r in runs if not (args.runs_dir / r["name"]).is_dir()})
    if not runs or missing:
        raise SystemExit(f"no adapter folder in {args.runs_dir} for: {', '.join(missing) or 'any run at the budget'}")
    jobs = make_jobs(runs, args.runs_dir, args.guidance_scales)
    outcomes = run_jobs(jobs, score_at_guidance, args.jobs, args.cache_dir, desc="scorings")
    failed = [f"{o.job.name}: {o.error}" for o in outcomes if not o.ok]
    if failed:
        raise SystemExit("scoring failed for " + "; ".join(failed))
    by_name = {r["name"]: r for r in runs}
    rows = []
    for outcome in outcomes:
        payload = outcome.job.payload
        method = BASE_RUN if payload.folder is None else by_name[payload.run]["method"]
        rows.append(
            {
                "run": payload.run,
                "method": method,
                "subject": payload.subject,
                "guidance": payload.plan.guidance_scale,
                "scores": outcome.result["scores"],
            }
        )
    footer = results_footer("benchmarks.guidance_sweep", input_args, started, where)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    guidance = benchmark.get("plan", {}).get("guidance_scale")  # files written before the plan was recorded: None
    text = render(rows, args.guidance_scales, args.budget, args.benchmark.name, guidance, footer)
    write_keeping_notes(args.results, text, NOTES_HEADING)
    args.results.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
