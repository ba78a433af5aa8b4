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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lily_diffusion.grids import GridAdapter

from .compare import EvalPlan, RunResult, RunSpec, score, train
from .paths import BASE_MODEL_DIR, EVALUATOR_DIR, SUBJECT_DIR
from .runner import Job, Outcome, run_jobs

logger = logging.getLogger(__name__)

BASE_JOB = "base-model"


@dataclass(frozen=True)
class RunPayload:
    """What a worker needs for one job: a run (None: score the base model), where it goes, the budget, the plan."""

    spec: RunSpec | None
    work_dir: Path
    lora_rank: int
    plan: EvalPlan


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
def _pipeline_and_evaluator() -> tuple[Any, Any]:
    """Loaded once per worker process."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from .evaluate import ToyEvaluator

    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline.from_pretrained(BASE_MODEL_DIR, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe, ToyEvaluator.load()


def train_and_score(payload: RunPayload) -> dict[str, Any]:
    """The worker: train one adapter (from scratch: a half-written run folder is removed) and score it."""
    pipe, evaluator = _pipeline_and_evaluator()
    if payload.spec is None:
        return {"scores": score(pipe, GridAdapter("base", None, "base", 0), evaluator, payload.plan)}
    output_dir = payload.work_dir / payload.spec.name
    if output_dir.exists():
        shutil.rmtree(output_dir)
    adapter, seconds = train(payload.spec, payload.work_dir, payload.lora_rank)
    return {
        "adapter": {"file": adapter.path.name, "kind": adapter.kind, "num_parameters": adapter.num_parameters},
        "file_bytes": adapter.path.stat().st_size,
        "train_seconds": seconds,
        "scores": score(pipe, adapter, evaluator, payload.plan),
    }


def make_jobs(specs: Sequence[RunSpec], work_dir: Path, lora_rank: int, plan: EvalPlan) -> list[Job[RunPayload]]:
    """The base model's job, then one job per run; settings hold everything a score depends on."""
    common = {
        "plan": asdict(plan),
        "models": files_fingerprint(BASE_MODEL_DIR, EVALUATOR_DIR, SUBJECT_DIR),
    }
    base = Job(BASE_JOB, RunPayload(None, work_dir, lora_rank, plan), {"kind": "base", **common})
    runs = [
        Job(
            spec.name,
            RunPayload(spec, work_dir, lora_rank, plan),
            {"spec": asdict(spec), "lora_rank": lora_rank, **common},
        )
        for spec in specs
    ]
    return [base, *runs]


def describe_scores(result: dict[str, Any]) -> str:
    """One line of a finished job's scores."""
    return json.dumps({key: round(value, 3) for key, value in result["scores"].items()})


def run_result(payload: RunPayload, result: dict[str, Any]) -> RunResult:
    """A `RunResult` from a job's (possibly cached) result; the adapter file is found in this `work_dir`."""
    spec, adapter = payload.spec, result["adapter"]
    assert spec is not None  # the base model's job has no RunResult
    path = payload.work_dir / spec.name / adapter["file"]
    grid_adapter = GridAdapter(spec.name, path, adapter["kind"], adapter["num_parameters"])
    return RunResult(spec, grid_adapter, result["file_bytes"], result["train_seconds"], dict(result["scores"]))


def run_all_parallel(
    specs: Sequence[RunSpec],
    work_dir: Path,
    lora_rank: int,
    plan: EvalPlan,
    n_jobs: int | None = None,
    cache_dir: Path | None = None,
) -> tuple[list[RunResult], dict[str, float], list[Outcome[RunPayload]]]:
    """`compare.run_all` in `n_jobs` processes: (results of the runs that finished, base scores, failed outcomes).

    Runs with prior preservation share `work_dir/class-images`; the first of them runs alone so that it
    generates the class images before any other run reads them (as in the one-process order).
    `RuntimeError` if the base model cannot be scored (nothing can be compared without it).
    """
    jobs = make_jobs(specs, work_dir, lora_rank, plan)
    first = [job.name for job in jobs[1:] if job.payload.spec is not None and job.payload.spec.prior][:1]
    outcomes = run_jobs(jobs, train_and_score, n_jobs, cache_dir, first, describe_scores, desc="trainings")
    base, runs = outcomes[0], outcomes[1:]
    if base.result is None:
        raise RuntimeError(f"scoring the base model failed: {base.error}")
    results = [run_result(o.job.payload, o.result) for o in runs if o.result is not None]
    return results, dict(base.result["scores"]), [o for o in outcomes if not o.ok]
