#!/usr/bin/env python
"""Learning curves: one DreamBooth run per (subject, method, setting), the adapter scored at several steps.

    python -m benchmarks.learning_curve --subject star --method lily --learning_rate 3e-3
    python -m benchmarks.learning_curve --subject star --method lora --rank 4 --lora_alpha 16
    python -m benchmarks.learning_curve --subject circle --method loha --learning_rate 8e-3   # any method

The run trains once with `train_dreambooth_lily.py` (checkpoints every `gcd(--save_steps)` steps; each checkpoint
holds the adapter file in the final output's format), then scores the adapter of every checkpoint in
`--save_steps` with the subject-driven benchmark's scorer (`toyworld.compare.score`). Every score goes into
`benchmarks/results/learning_curves.json` as soon as it exists, and `learning_curves.md` is rewritten from it: a rerun
skips the scored points, resumes an interrupted training from its last checkpoint, and adds new runs beside the old.
A run is extended to more steps only when its learning-rate schedule does not depend on the run's length (constant):
extending a cosine run would splice two schedules, and is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline

from lily_diffusion.grids import GridAdapter, describe_adapter
from lily_diffusion.training.checkpointing import MARKER_NAME
from toyworld.compare import EvalPlan, RunSpec, run_with_progress, score, training_flags
from toyworld.evaluate import ToyEvaluator
from toyworld.methods import METHODS
from toyworld.paths import BASE_MODEL_DIR, REPO, RESULTS, TRAIN_SCRIPT
from toyworld.report import PROMPT_TARGET, SUBJECT_TARGET
from toyworld.runner import use_one_thread
from toyworld.subjects import SUBJECTS, Subject

logger = logging.getLogger(__name__)

RESULTS_MD = RESULTS / "learning_curves.md"
WORK_DIR = REPO / "output" / "learning_curves"
SAVE_STEPS = (150, 300, 600, 900, 1200, 1500, 1800, 2100, 2400)
EVAL_SEEDS = (0, 1, 2, 3)
SCORE_COLUMNS = ("subject", "similarity", "background_seen", "background_unseen", "class_preservation")
# Flags the learning curve sets itself (its options, the run folder, its checkpoints): not for --train_flags.
OWNED_FLAGS = (
    "adapter", "learning_rate", "seed", "max_train_steps", "output_dir", "checkpointing_steps",
    "resume_from_checkpoint", "instance_data_dir", "with_prior_preservation", "class_data_dir", "class_prompt",
)  # fmt: skip
NOTES_HEADING = "## Reading the curves"  # a hand-written section of the results file, kept on every rewrite


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subject", choices=sorted(SUBJECTS), default="star")
    parser.add_argument(
        "--method", choices=tuple(METHODS), default="lily", help="A method of toyworld.methods (default lily)."
    )
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument(
        "--rank",
        type=int,
        default=4,
        help="LoRA rank; for the other methods, the LoRA rank whose budget they match (default 4).",
    )
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank; LoRA only).")
    parser.add_argument("--seed", type=int, default=0, help="Training seed.")
    parser.add_argument(
        "--prior", action="store_true", help="Prior preservation with class images of the subject's class."
    )
    parser.add_argument(
        "--train_flags",
        default="",
        help="More training-script flags, one string written with '=' (e.g. --train_flags='--lr_scheduler=cosine "
        "--train_text_encoder'); they replace the benchmark's own value of the same flag and are part of the run's "
        "name.",
    )
    parser.add_argument(
        "--save_steps",
        type=int,
        nargs="+",
        default=list(SAVE_STEPS),
        help="Steps whose adapter is scored; training runs to the largest (default: %(default)s).",
    )
    parser.add_argument(
        "--eval_seeds", type=int, default=len(EVAL_SEEDS), help="Generation seeds per scored prompt (default 4)."
    )
    parser.add_argument("--inference_steps", type=int, default=EvalPlan.steps, help="Denoising steps per image.")
    parser.add_argument(
        "--guidance_scale", type=float, default=EvalPlan.guidance_scale, help="Guidance of the scored images."
    )
    parser.add_argument(
        "--work_dir", type=Path, default=WORK_DIR, help=f"Where training runs go (default {WORK_DIR})."
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS_MD,
        help=f"Markdown output (default {RESULTS_MD}); the scores go beside it as .json.",
    )
    args = parser.parse_args(input_args)
    if args.lora_alpha is not None and args.method != "lora":
        parser.error(f"--lora_alpha is a LoRA setting; --method {args.method} has no alpha here (drop --lora_alpha)")
    if min(args.save_steps) < 1 or args.rank < 1 or args.eval_seeds < 1 or args.inference_steps < 1:
        parser.error("--save_steps, --rank, --eval_seeds and --inference_steps must be positive")
    if not math.isfinite(args.learning_rate) or args.learning_rate <= 0:
        parser.error(f"--learning_rate must be a positive number, not {args.learning_rate}")
    if not math.isfinite(args.guidance_scale) or not 1.0 <= args.guidance_scale <= 100.0:
        parser.error(f"--guidance_scale must be a number from 1 to 100, not {args.guidance_scale}")
    args.save_steps = sorted(set(args.save_steps))
    args.train_flags = shlex.split(args.train_flags)
    if any(not flag.startswith("--") for flag in args.train_flags):
        parser.error("--train_flags takes flags written --name or --name=value (one string)")
    owned = sorted({flag[2:].partition("=")[0] for flag in args.train_flags} & set(OWNED_FLAGS))
    if owned:
        parser.error(f"--train_flags cannot set --{owned[0]}: the learning curve sets it (see its own options)")
    return args


def run_name(args: argparse.Namespace) -> str:
    """'star-lily-lr0.003-seed0', 'star-lora-r4-lr0.003-seed0', 'star-loha-budget2-lr0.008-seed0' (a budget other
    than rank 4 is named), with '-alpha16' for a non-default LoRA alpha and the extra training flags (e.g.
    '-lr_scheduler=cosine') last."""
    rank = f"-r{args.rank}" if args.method == "lora" else (f"-budget{args.rank}" if args.rank != 4 else "")
    alpha = f"-alpha{args.lora_alpha:g}" if args.lora_alpha not in (None, args.rank) else ""
    extra = "".join(f"-{flag.lstrip('-').replace('/', '_')}" for flag in args.train_flags)  # a folder name
    prior = "-prior" if args.prior else ""
    return f"{args.subject}-{args.method}{rank}{alpha}-lr{args.learning_rate:g}{prior}-seed{args.seed}{extra}"


def with_flag(flags: Sequence[str], name: str, value: object | None = None) -> list[str]:
    """`flags` with `--name=value` (or the bare `--name` when value is None) in place of any earlier `--name`."""
    kept = [f for f in flags if f != f"--{name}" and not f.startswith(f"--{name}=")]
    return [*kept, f"--{name}" if value is None else f"--{name}={value}"]


def run_flags(args: argparse.Namespace, output_dir: Path, subject: Subject) -> list[str]:
    """The benchmark's training flags for this run, saving a checkpoint at every scored step."""
    spec = RunSpec(
        args.method,
        args.learning_rate,
        args.prior,
        args.seed,
        max(args.save_steps),
        subject=subject.name,
        budget=args.rank,
    )
    flags = training_flags(spec, output_dir, output_dir.parent / f"class-images-{subject.name}")
    flags = with_flag(flags, "checkpointing_steps", math.gcd(*args.save_steps))
    flags = with_flag(flags, "cache_latents")
    if args.lora_alpha is not None:
        flags = with_flag(flags, "lora_alpha", f"{args.lora_alpha:g}")
    for flag in args.train_flags:
        name, _, value = flag[2:].partition("=")
        flags = with_flag(flags, name, value if "=" in flag else None)
    return flags


# Learning-rate schedules whose shape depends on --max_train_steps: a run trained to N steps and extended to more
# would follow one schedule to N and another after it, and its curve would be neither run's.
HORIZON_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial")


def extension_error(output_dir: Path, steps: int) -> str | None:
    """Why the run in `output_dir` cannot be trained on to `steps` (its schedule is fixed to its own horizon), or
    None when it can (no earlier run, trained that far already, the same horizon, or a schedule that does not depend
    on it)."""
    args_file = output_dir / "training_args.json"
    if not args_file.is_file() or (output_dir / f"checkpoint-{steps}").is_dir():
        return None
    earlier = json.loads(args_file.read_text())
    horizon, schedule = earlier.get("max_train_steps"), earlier.get("lr_scheduler")
    if horizon == steps or schedule not in HORIZON_SCHEDULES:
        return None
    return (
        f"{output_dir.name} was trained with the {schedule} schedule over {horizon} steps; going on to {steps} would "
        f"splice two schedules, so train it in another --work_dir (or remove {output_dir})"
    )


def flag_value(flags: Sequence[str], name: str) -> str | None:
    """The value of the last `--name=value` in `flags` (None if absent)."""
    values = [f.partition("=")[2] for f in flags if f.startswith(f"--{name}=")]
    return values[-1] if values else None


def layers_error(output_dir: Path, run: dict, flags: Sequence[str]) -> str | None:
    """Why the earlier run of this name (its folder in `output_dir`, its scores in `run`) cannot be continued with
    `flags`: it adapted other layers than `--target_modules` asks now (the name does not say which). None if it
    can, or if nothing says which layers it had."""
    asked = flag_value(flags, "target_modules")
    args_file = output_dir / "training_args.json"
    trained = json.loads(args_file.read_text()).get("target_modules") if args_file.is_file() else None
    for what, where, layers in (
        ("trained", f"in {output_dir.parent}", trained),
        ("scored", "in the results file", run.get("target_modules") if run.get("points") else None),
    ):
        if layers is not None and layers != asked:
            return (
                f"{output_dir.name} {where} was {what} on the layers {layers!r}, not {asked!r}; move it away (or "
                "use another --work_dir and --results) to start over on these layers"
            )
    return None


def train(flags: Sequence[str], output_dir: Path, steps: int, name: str) -> float | None:
    """Train (resuming from the last checkpoint if a previous attempt was interrupted or the run is extended to
    more steps); the wall time of this attempt, or None when the run had already finished."""
    last = output_dir / f"checkpoint-{steps}"
    if last.is_dir():
        logger.info("%s: trained already (%s)", name, last)
        return None
    if output_dir.exists():
        flags = [*flags, "--resume_from_checkpoint=latest"]
    started = time.perf_counter()
    returncode, tail = run_with_progress([sys.executable, str(TRAIN_SCRIPT), *flags], name, steps)
    if returncode != 0:
        raise RuntimeError(f"training {name} failed:\n" + "".join(tail))
    return time.perf_counter() - started


def files_span(output_dir: Path, steps: int) -> float:
    """Seconds from the run's `training_args.json` (written when training starts) to its last checkpoint's
    completion marker: the training wall time of a run trained outside this process (with any pauses)."""
    start = (output_dir / "training_args.json").stat().st_mtime
    return (output_dir / f"checkpoint-{steps}" / MARKER_NAME).stat().st_mtime - start


def machine() -> str:
    """The CPU, its core count and the load when the run started (the machine is often shared)."""
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, load average {load}, {torch.get_num_threads()} torch thread(s)"


def results_footer(module: str, input_args: Sequence[str] | None, started: float, where: str, note: str = "") -> str:
    """A results file's last lines: the command that wrote it (this invocation's arguments), the machine and the
    wall time since `started` (`time.perf_counter()`), with an optional note after it."""
    given = sys.argv[1:] if input_args is None else list(input_args)
    command = shlex.join(["python", "-m", module, *given])
    wall = f"{(time.perf_counter() - started) / 60:.1f} min" + (f"; {note}" if note else "")
    return f"Command: `{command}`  \nMachine: {where}  \nWall time: {wall}\n"


# Runs recorded before the guidance was an option were scored at 5, the default then: never read the current default
# into them.
RECORDED_BEFORE_GUIDANCE = 5.0


def base_key(subject: str, guidance_scale: float) -> str:
    """The key of the base model's scores on a subject at a guidance, e.g. 'star (guidance 3.5)'."""
    return f"{subject} (guidance {guidance_scale:g})"


def run_guidance(run: dict) -> float:
    """The guidance a run's points were scored at (runs recorded before it was an option: 5, the default then)."""
    return run.get("guidance_scale", RECORDED_BEFORE_GUIDANCE)


def load_records(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.is_file() else {"base": {}, "runs": {}}


def save_records(records: dict[str, dict], json_path: Path, md_path: Path) -> None:
    """Write the JSON and rewrite the markdown from it (keeping the hand-written notes section)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(records, indent=1) + "\n")
    write_keeping_notes(md_path, render_markdown(records, json_path.name), NOTES_HEADING)


def write_keeping_notes(path: Path, text: str, heading: str) -> None:
    """Write a generated results file, keeping its hand-written section (from `heading` to the end) if it has one."""
    old = path.read_text() if path.is_file() else ""
    notes = old[old.index(heading) :] if heading in old else ""
    path.write_text(text + ("\n" + notes if notes else ""))


def first_reached(points: dict[str, dict[str, float]]) -> int | None:
    """The first scored step with subject fidelity >= 0.8 and prompt fidelity (all backgrounds) >= 0.9."""
    for step in sorted(points, key=int):
        scores = points[step]
        if scores["subject"] >= SUBJECT_TARGET and scores["background"] >= PROMPT_TARGET:
            return int(step)
    return None


def curve_table(run: dict, base: dict[str, float] | None) -> str:
    """Markdown: one row per scored step (the base model first, as step 0)."""
    header = (
        "| step | subject fidelity | subject similarity | prompt fidelity, seen | prompt fidelity, unseen | "
        "class preservation | score s |\n|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    if base is not None:
        rows.append(f"| 0 (base model) | {' | '.join(f'{base[k]:.3f}' for k in SCORE_COLUMNS)} | |")
    for step in sorted(run["points"], key=int):
        point = run["points"][step]
        cells = " | ".join(f"{point['scores'][k]:.3f}" for k in SCORE_COLUMNS)
        rows.append(f"| {step} | {cells} | {point['score_seconds']:.0f} |")
    return header + "\n".join(rows) + "\n"


def table_cell(text: str) -> str:
    """`text` safe inside a markdown table cell (a run named by a regex flag holds '|')."""
    return text.replace("|", "\\|")


def render_markdown(records: dict[str, dict], json_name: str = "learning_curves.json") -> str:
    """The results file (regenerated from `json_name`): a summary line per run, then each run's curve with its
    command, machine and wall times."""
    parts = [
        "# Learning curves: where each method learns the subject\n\n"
        "One training run per (subject, method, setting) with `train_dreambooth_lily.py` on `assets/toy-sdxl-base` "
        "(resolution 32, batch 2, latents cached; constant learning rate and no prior preservation unless the run's "
        "name and command say otherwise: `--prior`, `--train_flags`); the adapter saved "
        "in the run's checkpoints is scored at each step with the subject-driven benchmark's scorer "
        "(`toyworld.compare.score`; columns as in `subject_driven.md`: subject fidelity = mean P(this subject) of "
        "the which-subject CNN, prompt fidelity = the fraction of images showing the background asked, for the "
        "subject's two seen backgrounds and its unseen one, class preservation = the fraction of class-prompt images "
        "that are the plain class). Each method is sized to its budget as in the benchmark (`toyworld.methods`; "
        "Lily at the rank-4 budget: stride_A 4, num_B 4, r picked by `--match_lora_budget`). Regenerated from "
        f"`{json_name}` by `python -m benchmarks.learning_curve`; one seed per "
        "run, so every number is one run's (n=1). Each run's section gives the guidance its images were scored at.\n\n"
        f"Reached = the first scored step with subject fidelity >= {SUBJECT_TARGET} and prompt fidelity (all three "
        f"backgrounds) >= {PROMPT_TARGET}.\n\n"
        "| run | params | best subject fidelity (step) | reached at step | train wall time |\n"
        "|---|---:|---:|---:|---:|\n"
    ]
    runs = records["runs"]
    for name, run in runs.items():
        points = {step: point["scores"] for step, point in run["points"].items()}
        best = max(points.items(), key=lambda item: item[1]["subject"], default=None)
        best_cell = f"{best[1]['subject']:.3f} ({best[0]})" if best else ""
        reached = first_reached(points)
        train_s = run.get("train_seconds")
        parts.append(
            f"| {table_cell(name)} | {run.get('params', 0):,} | {best_cell} "
            f"| {reached if reached is not None else 'not reached'} "
            f"| {f'{train_s / 60:.1f} min' if train_s else 'n/a'} |\n"
        )
    for name, run in runs.items():
        train_s = run.get("train_seconds")
        guidance = run_guidance(run)
        parts.append(
            f"\n## {name}\n\n"
            f"{run['max_steps']} steps, lr {run['learning_rate']:g}, {run['params']:,} trainable parameters; "
            f"{run['eval_seeds']} generation seeds x 3 subject prompts and {2 * run['eval_seeds']} class-prompt "
            f"images per point, {run['inference_steps']} denoising steps, guidance "
            f"{guidance:g}.\n"
            f"Training wall time {f'{train_s:.0f} s' if train_s else 'n/a'} "
            f"({run['max_steps'] / train_s if train_s else float('nan'):.1f} steps/s); machine: {run['machine']}.\n\n"
            f"{curve_table(run, records['base'].get(base_key(run['subject'], guidance)))}\n"
            f"```bash\n{run['command']}\n```\n"
        )
    return "".join(parts)


def main(input_args: Sequence[str] | None = None) -> dict[str, dict]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(input_args)
    # tiny models: a second thread gains nothing alone and, with two curves trained side by side, oversubscribes
    # the cores (two at 2 threads each ran at 1.5 steps/s each instead of 9)
    use_one_thread()
    subject = SUBJECTS[args.subject]
    name = run_name(args)
    json_path = args.results.with_suffix(".json")
    records = load_records(json_path)
    output_dir = args.work_dir / name
    flags = run_flags(args, output_dir, subject)
    given = list(input_args) if input_args is not None else sys.argv[1:]
    command = f"python -m benchmarks.learning_curve {shlex.join(given)}".strip()
    run = records["runs"].setdefault(name, {"points": {}})
    asked = {
        "eval_seeds": args.eval_seeds,
        "inference_steps": args.inference_steps,
        "guidance_scale": args.guidance_scale,
    }
    scored_with = {
        "eval_seeds": run.get("eval_seeds"),
        "inference_steps": run.get("inference_steps"),
        "guidance_scale": run_guidance(run),
    }
    refusal = extension_error(output_dir, max(args.save_steps)) or layers_error(output_dir, run, flags)
    if refusal is not None:
        raise SystemExit(f"error: {refusal}")
    if run["points"] and scored_with != asked:
        raise SystemExit(
            f"error: {name} was scored with {scored_with} in {json_path}; rerun with those settings (or move that "
            "file away to start over)"
        )
    run.update(
        subject=args.subject,
        method=args.method,
        learning_rate=args.learning_rate,
        max_steps=max(args.save_steps),
        eval_seeds=args.eval_seeds,
        inference_steps=args.inference_steps,
        guidance_scale=args.guidance_scale,
        target_modules=flag_value(flags, "target_modules"),
        command=command,
        machine=run.get("machine") or machine(),
    )
    seconds = train(flags, output_dir, max(args.save_steps), name)
    if seconds is not None:  # a run extended to more steps (or resumed) adds this attempt's time to the earlier
        run["train_seconds"] = round(run.get("train_seconds", 0.0) + seconds, 1)
        run["machine"] = machine()
    elif "train_seconds" not in run:  # trained by an earlier (or outside) invocation: the time its files span
        run["train_seconds"] = round(files_span(output_dir, max(args.save_steps)), 1)
    pipe = StableDiffusionXLPipeline.from_pretrained(BASE_MODEL_DIR, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    evaluator = ToyEvaluator.load()
    plan = EvalPlan(
        seeds=tuple(range(args.eval_seeds)), steps=args.inference_steps, guidance_scale=args.guidance_scale
    )
    base = base_key(args.subject, args.guidance_scale)
    if base not in records["base"]:
        records["base"][base] = score(pipe, GridAdapter("base", None, "base", 0), evaluator, plan, subject)
    for step in args.save_steps:
        if str(step) in run["points"]:
            continue
        adapter = describe_adapter(f"{name}@{step}", output_dir / f"checkpoint-{step}")
        run["params"] = adapter.num_parameters
        started = time.perf_counter()
        scores = score(pipe, adapter, evaluator, plan, subject)
        run["points"][str(step)] = {
            "scores": {key: round(value, 4) for key, value in scores.items()},
            "score_seconds": round(time.perf_counter() - started, 1),
        }
        run["points"] = dict(sorted(run["points"].items(), key=lambda item: int(item[0])))
        logger.info("%s step %d: %s", name, step, json.dumps(run["points"][str(step)]["scores"]))
        save_records(records, json_path, args.results)
    save_records(records, json_path, args.results)
    return records


if __name__ == "__main__":
    main()
