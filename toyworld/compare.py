"""Lily vs LoRA DreamBooth on the bundled subject and base model: train, generate, score, tabulate.

Training goes through `train_dreambooth_lily.py` in a subprocess (the same path users take); scoring uses
the toy evaluator, which knows nothing of how an image was made. Used by the README demo and by
`benchmarks/subject_driven.py`.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from tqdm.auto import tqdm

from lily_diffusion.grids import GridAdapter, describe_adapter, generate_for_adapter
from lily_diffusion.serialization import read_lily_file

from .evaluate import ToyEvaluator
from .figures import column_header, subject_grid
from .methods import REFERENCE_BUDGET, TARGET_MODULES_FLAG, get_method, method_name
from .paths import BASE_MODEL_DIR, TRAIN_SCRIPT
from .paths import SUBJECT_DIR as SUBJECT_DIR  # re-exported: the default subject's folder
from .render import BACKGROUNDS
from .runner import start_script
from .subjects import CLASS_PROMPT as CLASS_PROMPT  # re-exported: the default subject's prompts
from .subjects import DEFAULT_SUBJECT, INSTANCE_PROMPT, Subject, get_subject

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """One DreamBooth run: a method at a budget (a LoRA rank, `toyworld.methods`) on a subject, with its recipe."""

    method: str  # a key of toyworld.methods.METHODS
    learning_rate: float
    prior: bool
    seed: int
    steps: int
    subject: str = DEFAULT_SUBJECT.name
    budget: int = REFERENCE_BUDGET
    extra_flags: tuple[str, ...] = ()  # training flags of the recipe, e.g. ("--lr_scheduler=cosine",)

    @property
    def schedule(self) -> str:
        """The learning-rate schedule: the last `--lr_scheduler` of `extra_flags`, else the engine's constant."""
        given = [flag.split("=", 1)[1] for flag in self.extra_flags if flag.startswith("--lr_scheduler=")]
        return given[-1] if given else "constant"

    @property
    def name(self) -> str:
        """'star-lily-budget4-lr0.003-noprior-seed0' ('lr0.003-cosine' for a schedule other than constant): unique
        in a sweep, file-name safe."""
        prior = "prior" if self.prior else "noprior"
        lr = f"lr{self.learning_rate:g}" + ("" if self.schedule == "constant" else f"-{self.schedule}")
        return f"{self.subject}-{self.method}-budget{self.budget}-{lr}-{prior}-seed{self.seed}"

    @property
    def label(self) -> str:
        """The run for people: "Lily lr 0.003, prior, seed 0" ("lr 0.003 cosine" for a schedule other than
        constant)."""
        prior = "prior" if self.prior else "no prior"
        schedule = "" if self.schedule == "constant" else f" {self.schedule}"
        return f"{method_name(self.method)} lr {self.learning_rate:g}{schedule}, {prior}, seed {self.seed}"

    @property
    def setting(self) -> tuple[str, float, bool]:
        """What the demo's table groups by (everything but the seed)."""
        return (self.method, self.learning_rate, self.prior)


@dataclass(frozen=True)
class EvalPlan:
    """The fixed prompts and seeds every adapter is scored on."""

    seeds: tuple[int, ...] = (0, 1, 2, 3)
    steps: int = 20
    # 3.5, not 5: at 5 an unseen colour drifts pale on the black background and no adapter draws the circle there
    # (benchmarks/results/guidance_sweep.md); at 3.5 every subject is learned by some method and the seen backgrounds
    # hold for nearly every adapter (README, "Why guidance 3.5").
    guidance_scale: float = 3.5

    @property
    def class_seeds(self) -> tuple[int, ...]:
        """Twice as many distinct seeds for the class prompt: the seeds, then as many new ones."""
        start = max(self.seeds) + 1
        return (*self.seeds, *range(start, start + len(self.seeds)))

    def subject_prompts(self, subject: Subject = DEFAULT_SUBJECT) -> list[str]:
        """The subject's instance prompt on each background (its seen ones and the unseen one)."""
        return [subject.caption(background) for background in BACKGROUNDS]


@dataclass
class RunResult:
    spec: RunSpec
    adapter: GridAdapter
    file_bytes: int
    train_seconds: float
    scores: dict[str, float] = field(default_factory=dict)
    settings: dict[str, int] = field(default_factory=dict)  # `adapter_settings` of the saved file


def override_flags(flags: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """`flags` then `overrides`, an override of `--name` (as `--name=value` or bare) replacing any earlier `--name`."""
    names = {flag.split("=", 1)[0] for flag in overrides}
    return [*(f for f in flags if f.split("=", 1)[0] not in names), *overrides]


def method_flags(spec: RunSpec) -> list[str]:
    """The run's method at its budget on the workbench's layers (`TARGET_MODULES`): the flags that make the adapter,
    before the run's own `extra_flags`."""
    return [*get_method(spec.method).flags(spec.budget), TARGET_MODULES_FLAG]


def training_flags(spec: RunSpec, output_dir: Path, class_dir: Path) -> list[str]:
    """The command line of one run: the subject's data, the method's flags at the run's budget on the workbench's
    layers (`TARGET_MODULES`), then the run's `extra_flags` (which replace any flag of the same name, e.g.
    `--lr_scheduler`)."""
    subject = get_subject(spec.subject)
    flags = [
        f"--pretrained_model_name_or_path={BASE_MODEL_DIR}",
        f"--instance_data_dir={subject.folder}",
        f"--instance_prompt={subject.instance_prompt}",
        "--caption_column=text",
        "--resolution=32",
        "--train_batch_size=2",
        f"--max_train_steps={spec.steps}",
        f"--learning_rate={spec.learning_rate}",
        "--lr_scheduler=constant",
        f"--seed={spec.seed}",
        "--report_to=none",
        "--checkpointing_steps=1000000",
        f"--output_dir={output_dir}",
        *method_flags(spec),
    ]
    if spec.prior:
        flags += [
            "--with_prior_preservation",
            f"--class_data_dir={class_dir}",
            f"--class_prompt={subject.class_prompt}",
            "--num_class_images=10",
            "--prior_loss_weight=1.0",
        ]
    return override_flags(flags, spec.extra_flags)


def class_images_dir(spec: RunSpec, work_dir: Path) -> Path:
    """Where the runs on a subject with prior preservation keep its class images (shared by those runs)."""
    return work_dir / f"class-images-{spec.subject}"


def adapter_settings(adapter: GridAdapter) -> dict[str, int]:
    """What a saved adapter's size came from, read from its file: Lily's r, stride_A and num_B ({} for others)."""
    if adapter.kind != "lily" or adapter.path is None:
        return {}
    config = read_lily_file(adapter.path)["unet"].config
    return {"r": config.r, "stride_A": config.stride_A, "num_B": config.num_B}


# What the training script imports, loaded once by the fork server that starts each training (`start_script`)
TRAINING_IMPORTS = ("__main__", "lily_diffusion.training")  # "__main__": the caller's, imported once too


def train(spec: RunSpec, work_dir: Path) -> tuple[GridAdapter, float]:
    """Run the training script; returns the saved adapter and the wall time."""
    output_dir = work_dir / spec.name
    command = [sys.executable, str(TRAIN_SCRIPT), *training_flags(spec, output_dir, class_images_dir(spec, work_dir))]
    started = time.perf_counter()
    returncode, tail = run_with_progress(command, spec.name, spec.steps, TRAINING_IMPORTS)
    seconds = time.perf_counter() - started
    if returncode != 0:
        raise RuntimeError(f"training {spec.name} failed:\n" + "".join(tail))
    return describe_adapter(spec.name, output_dir), seconds


STEPS_LINE = re.compile(r"^Steps:.*?(\d+)/\d+ \[")


def run_with_progress(
    command: Sequence[str], name: str, total_steps: int, preload: Sequence[str] = ()
) -> tuple[int, list[str]]:
    """Run the training script, showing its step count on one progress bar; returns (exit code, last lines).

    The child's output is read line by line (tqdm's carriage returns count as line ends) and only
    its "Steps" bar is shown, so 36 runs do not flood the terminal with library warnings. On Linux the child is
    killed when this process ends (a killed benchmark's worker leaves no training running). With `preload`, the
    script runs in a child forked with those modules already imported (`runner.start_script`).
    """
    tail: deque[str] = deque(maxlen=40)
    with (
        tqdm(total=total_steps, desc=f"training {name}", unit="step", leave=False) as progress,
        start_script(command, preload) as (lines, wait),
    ):
        for line in lines:
            match = STEPS_LINE.match(line)
            if match:
                progress.update(int(match.group(1)) - progress.n)
            else:
                tail.append(line)
        returncode = wait()
    return returncode, list(tail)


def score(
    pipe: StableDiffusionXLPipeline,
    adapter: GridAdapter,
    evaluator: ToyEvaluator,
    plan: EvalPlan,
    subject: Subject = DEFAULT_SUBJECT,
) -> dict[str, float]:
    """Subject fidelity (overall, and on each background: `subject_white`, ...), prompt (background) fidelity, also
    split by the subject's seen backgrounds and the unseen one, and class preservation of one adapter, for
    `subject`."""
    prompts = plan.subject_prompts(subject)
    subject_images = generate_for_adapter(pipe, adapter, prompts, plan.seeds, plan.steps, plan.guidance_scale, None)
    row_prompts = [prompt for prompt in prompts for _ in plan.seeds]
    class_images = generate_for_adapter(
        pipe, adapter, [subject.class_prompt], plan.class_seeds, plan.steps, plan.guidance_scale, None
    )
    backgrounds = evaluator.background_fidelity(subject_images, row_prompts, subject)
    probabilities = evaluator.subject_probability(subject_images, subject).reshape(len(prompts), len(plan.seeds))
    by_background = zip(BACKGROUNDS, probabilities.mean(axis=1).tolist(), strict=True)  # prompts in BACKGROUNDS order
    return {
        "subject": float(np.mean(probabilities)),
        **{f"subject_{background}": value for background, value in by_background},
        "similarity": float(np.mean(evaluator.subject_similarity(subject_images, subject))),
        "background": evaluator.prompt_fidelity(subject_images, row_prompts)["background"],
        "background_seen": backgrounds["seen"],
        "background_unseen": backgrounds["unseen"],
        "class_preservation": evaluator.class_preservation(class_images, subject),
    }


def run_all(
    specs: Sequence[RunSpec], work_dir: Path, plan: EvalPlan
) -> tuple[list[RunResult], dict[str, dict[str, float]]]:
    """Train and score every run; also score the base model on each run's subject (the no-training reference).
    Returns the results and the base model's scores by subject name."""
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline.from_pretrained(BASE_MODEL_DIR, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    evaluator = ToyEvaluator.load()
    base = GridAdapter("base", None, "base", 0)
    subjects = dict.fromkeys(spec.subject for spec in specs)
    base_scores = {name: score(pipe, base, evaluator, plan, get_subject(name)) for name in subjects}
    results = []
    for index, spec in enumerate(specs, start=1):
        logger.info("[%d/%d] training %s", index, len(specs), spec.name)
        adapter, seconds = train(spec, work_dir)
        scores = score(pipe, adapter, evaluator, plan, get_subject(spec.subject))
        result = RunResult(spec, adapter, adapter.path.stat().st_size, seconds, scores, adapter_settings(adapter))
        logger.info("    %.0f s, scores %s", seconds, json.dumps({k: round(v, 3) for k, v in result.scores.items()}))
        results.append(result)
    return results, base_scores


def results_records(results: Sequence[RunResult]) -> list[dict[str, object]]:
    """Every run as plain data (for a JSON file beside the table): its spec, name, budget (`budget_rank`), size
    and what it came from (`adapter`: Lily's r, stride_A, num_B), times and scores."""
    return [
        {
            **asdict(r.spec),
            "name": r.spec.name,
            "budget_rank": r.spec.budget,
            "params": r.adapter.num_parameters,
            "adapter": dict(r.settings),
            "file_bytes": r.file_bytes,
            "train_seconds": round(r.train_seconds, 1),
            "scores": {key: round(value, 4) for key, value in r.scores.items()},
        }
        for r in results
    ]


def _mean_std(values: Sequence[float]) -> str:
    """'0.500 ± 0.100' over several seeds; '0.500 (n=1)' for one (no spread to show)."""
    if len(values) == 1:
        return f"{values[0]:.3f} (n=1)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


SCORE_COLUMNS = ("subject", "similarity", "background_seen", "background_unseen", "class_preservation")


def results_table(results: Sequence[RunResult], base_scores: dict[str, float]) -> str:
    """Markdown: one row per (method, learning rate, prior), mean ± std over seeds."""
    header = (
        "| method | lr | prior | params | file bytes | subject fidelity | subject similarity | "
        "prompt fidelity, seen backgrounds | prompt fidelity, unseen background | class preservation | train s | "
        "seeds |\n"
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    base_cells = [f"{base_scores[key]:.3f}" for key in SCORE_COLUMNS]
    rows = [f"| base model (no training) | | | 0 | 0 | {' | '.join(base_cells)} | | |"]
    settings = list(dict.fromkeys(r.spec.setting for r in results))
    for method, learning_rate, prior in settings:
        group = [r for r in results if r.spec.setting == (method, learning_rate, prior)]
        cells = [_mean_std([r.scores[key] for r in group]) for key in SCORE_COLUMNS]
        rows.append(
            f"| {method} | {learning_rate:g} | {'on' if prior else 'off'} | {group[0].adapter.num_parameters:,} | "
            f"{group[0].file_bytes:,} | {' | '.join(cells)} | {statistics.mean(r.train_seconds for r in group):.0f} | "
            f"{len(group)} |"
        )
    return header + "\n".join(rows) + "\n"


def best_runs(results: Sequence[RunResult]) -> list[RunResult]:
    """Per (method, prior preservation), the run whose images look most like the subject.

    Ranked by subject fidelity + subject similarity; the class prompt's row of the grid shows what it
    cost in language drift.
    """
    groups: dict[tuple[str, bool], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.spec.method, result.spec.prior), []).append(result)
    return [max(group, key=lambda r: r.scores["subject"] + r.scores["similarity"]) for group in groups.values()]


def runs_grid(
    runs: Sequence[RunResult],
    subject: Subject,
    plan: EvalPlan,
    prompts: Sequence[str],
    title: str,
    details: Sequence[str] | None = None,
    cell_size: int = 64,
) -> Image.Image:
    """The target (one instance image of `subject`), the base model, then each run's adapter, under short headers
    (method, `details`, parameters) and `title`; rows are `prompts` x the plan's first two seeds."""
    pipe = StableDiffusionXLPipeline.from_pretrained(BASE_MODEL_DIR, torch_dtype=torch.float32)
    details = details if details is not None else [""] * len(runs)
    adapters = [GridAdapter("base", None, "base", 0), *(r.adapter for r in runs)]
    headers = [
        column_header("base", 0),
        *(column_header(r.spec.method, r.adapter.num_parameters, d) for r, d in zip(runs, details, strict=True)),
    ]
    seeds = plan.seeds[:2]
    return subject_grid(
        pipe, subject, adapters, headers, prompts, seeds, plan.steps, plan.guidance_scale, title, cell_size
    )


def best_grid(
    results: Sequence[RunResult], plan: EvalPlan, prompts: Sequence[str], cell_size: int = 64
) -> Image.Image:
    """The target, the base model and the best run per (method, prior preservation), labelled for people."""
    best = best_runs(results)
    steps = ", ".join(sorted({f"{r.spec.steps} steps, lr {r.spec.learning_rate:g}" for r in best}))
    title = f'DreamBooth on "{INSTANCE_PROMPT}": the target, the base model, the best run per method ({steps})'
    details = ["+ prior" if r.spec.prior else "" for r in best]
    return runs_grid(best, DEFAULT_SUBJECT, plan, prompts, title, details, cell_size)
