#!/usr/bin/env python
"""Which part of a subject the toy world cannot learn: variants of the bundled subjects, shape x pattern x colours.

Each variant is a `Subject` with its own instance images (rendered like the bundled ones, on the bundled subject's
seen backgrounds), trained with one recipe (LoRA r4, cosine lr 2e-3, 2400 steps) for each seed, and scored by
appearance similarity to its own instance images (the CLIP-I analogue: the which-subject CNN knows only the bundled
subjects) and by background fidelity on the seen backgrounds and the unseen one:

    python -m benchmarks.subject_factors --work_dir output/subject_factors

A run whose adapter is already in `--work_dir/<variant>-seed<k>/out` is scored without training again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from benchmarks.learning_curve import machine, results_footer
from lily_diffusion.grids import describe_adapter, generate_for_adapter
from toyworld.compare import EvalPlan, RunSpec, override_flags, training_flags
from toyworld.evaluate import ToyEvaluator
from toyworld.paths import BASE_MODEL_DIR, RESULTS, TRAIN_SCRIPT
from toyworld.render import ALL_COLOURS, BACKGROUNDS, PATTERNS, SHAPES
from toyworld.subjects import SUBJECTS, Subject, write_subject_samples

logger = logging.getLogger(__name__)

RESULTS_MD = RESULTS / "subject_factors.md"
# (shape, pattern, colour, colour): the square and the star in halves and stripes, base-world and new colours
VARIANTS: tuple[tuple[str, str, str, str], ...] = (
    ("square", "halves", "red", "blue"),
    ("square", "halves", "orange", "purple"),
    ("square", "stripes", "red", "blue"),
    ("square", "stripes", "orange", "purple"),
    ("star", "halves", "orange", "purple"),
    ("star", "stripes", "orange", "purple"),
)


def variant_subject(shape: str, pattern: str, first: str, second: str) -> Subject:
    """A subject `shape-pattern-first-second`, seen on the backgrounds of the bundled subject of that shape."""
    seen = bundled_subject(shape).seen_backgrounds
    return Subject(f"{shape}-{pattern}-{first}-{second}", shape, pattern, (first, second), seen)


def bundled_subject(shape: str) -> Subject:
    """The bundled subject of `shape`: its backgrounds and training flags are a variant's."""
    return next(s for s in SUBJECTS.values() if s.shape == shape)


def train_variant(subject: Subject, spec: RunSpec, folder: Path) -> tuple[Path, bool]:
    """Render the variant's instance images into `folder/data` and train on them unless `folder/out` already holds
    the adapter; returns the output folder and whether this call trained."""
    data, out = folder / "data", folder / "out"
    write_subject_samples(subject, data)
    flags = override_flags(
        training_flags(dataclasses.replace(spec, subject=bundled_subject(subject.shape).name), out, folder / "class"),
        [f"--instance_data_dir={data}"],
    )
    if any(out.glob("*.safetensors")):
        return out, False
    subprocess.run([sys.executable, str(TRAIN_SCRIPT), *flags], check=True, capture_output=True)
    return out, True


def score_variant(
    pipe: StableDiffusionXLPipeline, evaluator: ToyEvaluator, subject: Subject, out: Path, plan: EvalPlan
) -> dict[str, float]:
    """Similarity to the variant's own instance images and background fidelity (seen, unseen)."""
    prompts = [subject.caption(background) for background in BACKGROUNDS]
    adapter = describe_adapter(subject.name, out)
    images = generate_for_adapter(pipe, adapter, prompts, plan.seeds, plan.steps, plan.guidance_scale, None)
    references = [Image.open(path).convert("RGB") for path in sorted((out.parent / "data").glob("*.png"))]
    rows = [prompt for prompt in prompts for _ in plan.seeds]
    backgrounds = evaluator.background_fidelity(images, rows, subject)
    similarity = float(evaluator.subject_similarity(images, references).mean())
    return {
        "similarity": similarity,
        "background_seen": backgrounds["seen"],
        "background_unseen": backgrounds["unseen"],
    }


def render(table: dict[str, dict[int, dict[str, float]]], spec: RunSpec, footer: str) -> str:
    lines = [
        "# Which part of a subject the toy world cannot learn",
        "",
        f"Variants of the bundled subjects (shape x pattern x colours), each trained with one recipe: "
        f"{spec.method} at the LoRA r{spec.budget} budget, lr {spec.learning_rate:g} {spec.schedule}, "
        f"{spec.steps} steps, no prior. Similarity = cosine similarity of the object's appearance features to the "
        "variant's own instance images (the CLIP-I analogue; 1 = identical look), mean over 4 generation seeds x 3 "
        "backgrounds; prompt fidelity on the two seen backgrounds and the unseen one. Red and blue are colours the "
        "base world shows; orange and purple it never shows; the base world shows no pattern at all.",
        "",
        "| variant | seeds | similarity per seed | similarity, mean | prompt fidelity seen | prompt fidelity unseen |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, runs in table.items():
        values = [runs[seed]["similarity"] for seed in sorted(runs)]
        seen = statistics.fmean(r["background_seen"] for r in runs.values())
        unseen = statistics.fmean(r["background_unseen"] for r in runs.values())
        lines.append(
            f"| {name} | {len(runs)} | {', '.join(f'{v:.3f}' for v in values)} | {statistics.fmean(values):.3f} "
            f"| {seen:.2f} | {unseen:.2f} |"
        )
    return "\n".join(lines) + "\n\n" + footer


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, required=True, help="Instance images and trained runs go here.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Training seeds (default 0 1).")
    parser.add_argument("--variants", nargs="+", default=None, metavar="SHAPE-PATTERN-COLOUR-COLOUR")
    parser.add_argument("--results", type=Path, default=RESULTS_MD, help="Markdown output (JSON beside it).")
    args = parser.parse_args(input_args)
    variants = [tuple(v.split("-")) for v in args.variants] if args.variants else list(VARIANTS)
    for variant in variants:
        if (
            len(variant) != 4
            or variant[0] not in SHAPES
            or variant[1] not in PATTERNS
            or not set(variant[2:]) <= set(ALL_COLOURS)
        ):
            parser.error(f"--variants {'-'.join(variant)}: expected SHAPE-PATTERN-COLOUR-COLOUR of the toy world")
    args.variants = variants
    return args


def main(input_args: Sequence[str] | None = None) -> dict[str, dict[int, dict[str, float]]]:
    args = parse_args(input_args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    started, where = time.perf_counter(), machine()
    pipe = StableDiffusionXLPipeline.from_pretrained(BASE_MODEL_DIR, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    evaluator, plan = ToyEvaluator.load(), EvalPlan()
    spec = RunSpec("lora", 2e-3, False, 0, 2400, budget=4, extra_flags=("--lr_scheduler=cosine", "--cache_latents"))
    table: dict[str, dict[int, dict[str, float]]] = {}
    trained = 0
    for seed in args.seeds:
        for variant in args.variants:
            subject = variant_subject(*variant)
            out, fresh = train_variant(
                subject, dataclasses.replace(spec, seed=seed), args.work_dir / f"{subject.name}-seed{seed}"
            )
            trained += fresh
            scores = score_variant(pipe, evaluator, subject, out, plan)
            table.setdefault(subject.name, {})[seed] = scores
            logger.info("%s seed %d: %s", subject.name, seed, {k: round(v, 3) for k, v in scores.items()})
    runs = len(args.seeds) * len(args.variants)
    note = f"{trained} of {runs} runs trained by this invocation, the others' adapters found in --work_dir."
    footer = results_footer("benchmarks.subject_factors", input_args, started, where, note)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(render(table, spec, footer))
    args.results.with_suffix(".json").write_text(json.dumps(table, indent=1) + "\n")
    return table


if __name__ == "__main__":
    main()
