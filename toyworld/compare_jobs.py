"""The comparison engine's runs as parallel, cached jobs: each worker trains one adapter and scores it.

`run_all_parallel` is `compare.run_all` through `toyworld.runner`: the base model's scores and every run are
jobs; a worker loads the base pipeline and the evaluator once and trains through the training script (which
inherits its one-thread environment). Scores are the same as `run_all`'s for the same settings: every image is
generated from its own seeded generator.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lily_diffusion.grids import GridAdapter, describe_adapter

from .compare import EvalPlan, RunResult, RunSpec, adapter_settings, method_flags, score, train
from .paths import BASE_MODEL_DIR, EVALUATOR_DIR, SUBJECTS_DIR
from .runner import Job, Outcome, run_jobs
from .subjects import get_subject

logger = logging.getLogger(__name__)

BASE_JOB = "base-model"


@dataclass(frozen=True)
class RunPayload:
    """What a worker needs for one job: a run (None: score the base model on `subject`), where it goes, the plan;
    with `trained_seconds`, the run's adapter is already in its folder (trained earlier, in that many seconds) and
    is only scored."""

    spec: RunSpec | None
    work_dir: Path
    plan: EvalPlan
    subject: str
    trained_seconds: float | None = None


@functools.cache
def files_fingerprint(*folders: Path) -> str:
    """A hash of every file under `folders` (names and bytes): a cached score is only valid for these models."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def pipeline_and_evaluator() -> tuple[Any, Any]:
    """The base pipeline and the evaluator, loaded once per (worker) process."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from .evaluate import ToyEvaluator

    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline.from_pretrained(BASE_MODEL_DIR, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe, ToyEvaluator.load()


def base_job_name(subject: str) -> str:
    return f"{BASE_JOB}-{subject}"


def train_and_score(payload: RunPayload) -> dict[str, Any]:
    """The worker: train one adapter (from scratch: a half-written run folder is removed) and score it; a payload
    with `trained_seconds` scores the adapter already in the run's folder."""
    pipe, evaluator = pipeline_and_evaluator()
    subject = get_subject(payload.subject)
    if payload.spec is None:
        return {"scores": score(pipe, GridAdapter("base", None, "base", 0), evaluator, payload.plan, subject)}
    output_dir = payload.work_dir / payload.spec.name
    if payload.trained_seconds is not None:
        adapter, seconds = describe_adapter(payload.spec.name, output_dir), payload.trained_seconds
    else:
        if output_dir.exists():
            shutil.rmtree(output_dir)
        adapter, seconds = train(payload.spec, payload.work_dir)
    return {
        "adapter": {
            "file": adapter.path.name,
            "kind": adapter.kind,
            "num_parameters": adapter.num_parameters,
            "settings": adapter_settings(adapter),
        },
        "file_bytes": adapter.path.stat().st_size,
        "train_seconds": seconds,
        "scores": score(pipe, adapter, evaluator, payload.plan, subject),
    }


def make_jobs(
    specs: Sequence[RunSpec], work_dir: Path, plan: EvalPlan, trained: Mapping[str, float] | None = None
) -> list[Job[RunPayload]]:
    """The base model's job per subject of the runs, then one job per run; settings hold everything a score
    depends on. A run named in `trained` (name: its training seconds) is scored from the adapter already in its
    folder: the same settings, since the adapter is the one its spec trains."""
    trained = trained or {}
    common = {"plan": asdict(plan), "models": files_fingerprint(BASE_MODEL_DIR, EVALUATOR_DIR, SUBJECTS_DIR)}
    subjects = dict.fromkeys(spec.subject for spec in specs)
    bases = [
        Job(
            base_job_name(subject),
            RunPayload(None, work_dir, plan, subject),
            {"kind": "base", "subject": subject, **common},
        )
        for subject in subjects
    ]
    runs = [
        Job(
            spec.name,
            RunPayload(spec, work_dir, plan, spec.subject, trained.get(spec.name)),
            {"spec": asdict(spec), "method_flags": method_flags(spec), **common},
        )
        for spec in specs
    ]
    return [*bases, *runs]


def describe_scores(result: dict[str, Any]) -> str:
    """One line of a finished job's scores."""
    return json.dumps({key: round(value, 3) for key, value in result["scores"].items()})


def run_result(payload: RunPayload, result: dict[str, Any]) -> RunResult:
    """A `RunResult` from a job's (possibly cached) result; the adapter file is found in this `work_dir`."""
    spec, adapter = payload.spec, result["adapter"]
    assert spec is not None  # the base model's jobs have no RunResult
    path = payload.work_dir / spec.name / adapter["file"]
    grid_adapter = GridAdapter(spec.name, path, adapter["kind"], adapter["num_parameters"])
    return RunResult(
        spec,
        grid_adapter,
        result["file_bytes"],
        result["train_seconds"],
        dict(result["scores"]),
        dict(adapter.get("settings", {})),
    )


def first_runs(jobs: Sequence[Job[RunPayload]]) -> list[str]:
    """The runs that must finish before the others start: per subject with more than one prior-preservation run,
    the first of them (it generates the class images the others read; each subject has its own, so these runs
    need not wait for each other). A subject's only prior run shares them with nothing."""
    prior_runs = [job for job in jobs if job.payload.spec is not None and job.payload.spec.prior]
    shared = Counter(job.payload.subject for job in prior_runs)
    first = {job.payload.subject: job.name for job in reversed(prior_runs)}
    return [name for subject, name in first.items() if shared[subject] > 1]


def run_all_parallel(
    specs: Sequence[RunSpec],
    work_dir: Path,
    plan: EvalPlan,
    n_jobs: int | None = None,
    cache_dir: Path | None = None,
    trained: Mapping[str, float] | None = None,
) -> tuple[list[RunResult], dict[str, dict[str, float]], list[Outcome[RunPayload]]]:
    """`compare.run_all` in `n_jobs` processes: (results of the runs that finished, the base model's scores by
    subject, failed outcomes).

    Runs on one subject with prior preservation share its class images; when there are several, the first of them
    finishes before the other runs start, so that it generates them before any other run reads them (as in the
    one-process order); the subjects' first runs run in parallel with each other. A subject's only prior run
    shares them with nothing and runs in parallel like the rest. Runs named in `trained` are only scored
    (`make_jobs`).
    `RuntimeError` if the base model cannot be scored (nothing can be compared without it).
    """
    jobs = make_jobs(specs, work_dir, plan, trained)
    bases = [job for job in jobs if job.payload.spec is None]
    desc = "scorings" if trained else "trainings"
    outcomes = run_jobs(jobs, train_and_score, n_jobs, cache_dir, first_runs(jobs), describe_scores, desc=desc)
    base_scores: dict[str, dict[str, float]] = {}
    for outcome in outcomes[: len(bases)]:
        if outcome.result is None:
            raise RuntimeError(f"scoring the base model ({outcome.job.name}) failed: {outcome.error}")
        base_scores[outcome.job.payload.subject] = dict(outcome.result["scores"])
    results = [run_result(o.job.payload, o.result) for o in outcomes[len(bases) :] if o.result is not None]
    return results, base_scores, [o for o in outcomes if not o.ok]
