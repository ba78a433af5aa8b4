"""Measure how well the toy base model follows prompts, with the toy evaluator; write a markdown report.

Loads the pipeline exactly as a user would (`StableDiffusionXLPipeline.from_pretrained(..., torch_dtype=
torch.float32)`), generates 64 fixed prompts x seeds (every shape/colour/background caption at least once), and
scores shape, colour and background; then 48 two-colour prompts ("a photo of a red and green striped star ..."),
scored by which of the base world's looks (pattern x colour pair) for that shape each image resembles most. Also
reports what the class prompt "a photo of a star" and the untrained instance prompt "a photo of sks star" give
(class preservation baseline, subject probability baseline).

    python -m scripts.eval_toy_base --model assets/toy-sdxl-base --report benchmarks/results/toy_base.md
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a shared 2-core machine: threads sleep, not spin

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import make_image_grid
from PIL import Image

from toyworld.evaluate import ToyEvaluator, parse_prompt
from toyworld.paths import BASE_MODEL_DIR, REPO
from toyworld.prompts import attribute_prompts, generate, pattern_prompts
from toyworld.render import BASE_PATTERN_PAIRS, PATTERNS, render_batch, sample_patterned_scene
from toyworld.subjects import CLASS_PROMPT, INSTANCE_PROMPT

logger = logging.getLogger("eval_toy_base")
REFERENCE_SEED = 4242  # the seed of the reference renders that score two-colour prompts


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=BASE_MODEL_DIR)
    parser.add_argument("--report", type=Path, default=None, help="markdown report to write (default: none)")
    parser.add_argument("--grid", type=Path, default=None, help="PNG grid of the 64 generations")
    parser.add_argument("--train-summary", type=Path, default=None, help="summary.json of the training run")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    return parser.parse_args(argv)


def display_path(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def look_references(shape: str, pattern: str, colours: tuple[str, str], n: int = 8) -> np.ndarray:
    """`n` renders of one look (shape, pattern, unordered colour pair) at random poses, both colour orders."""
    rng = np.random.default_rng([REFERENCE_SEED, PATTERNS.index(pattern), BASE_PATTERN_PAIRS.index(colours)])
    scenes = []
    for i in range(n):
        scene = sample_patterned_scene(rng, shape=shape)
        scenes.append(replace(scene, pattern=pattern, colours=colours if i % 2 == 0 else colours[::-1]))
    return render_batch(scenes)


def pattern_accuracy(evaluator: ToyEvaluator, images: list[Image.Image], asked: list[tuple]) -> dict[str, float]:
    """Per image, the base-world look of the asked shape (pattern x colour pair) it is most similar to, by the
    evaluator's appearance similarity to renders of each look: the fraction whose pattern, whose colour pair, and
    whose both are the asked ones."""
    looks = [(p, c) for p in PATTERNS for c in BASE_PATTERN_PAIRS]
    references = {(shape, look): look_references(shape, *look) for shape in {a[3] for a in asked} for look in looks}
    hits = []
    for image, (_, pattern, colours, shape) in zip(images, asked, strict=True):
        scores = [float(evaluator.subject_similarity([image], references[shape, look])[0]) for look in looks]
        best = looks[int(np.argmax(scores))]
        hits.append((best[0] == pattern, best[1] == colours))
    found = np.array(hits, dtype=float)
    pattern, colours = (float(column.mean()) for column in found.T)
    return {"pattern": pattern, "colours": colours, "both": float(found.min(axis=1).mean())}


def evaluate_model(args: argparse.Namespace) -> dict:
    pipe = StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    evaluator = ToyEvaluator.load()
    prompts = attribute_prompts(args.n)
    seeds = list(range(len(prompts)))
    started = time.perf_counter()
    images = generate(pipe, prompts, seeds, args.steps, args.guidance_scale)
    seconds = time.perf_counter() - started
    fidelity = evaluator.prompt_fidelity(images, prompts)
    asked = [parse_prompt(p) for p in prompts]
    got = zip(evaluator.shapes(images), evaluator.colours(images), evaluator.backgrounds(images), strict=True)
    all_three = float(
        np.mean(
            [(s, c, b) == (a["shape"], a["colour"], a["background"]) for (s, c, b), a in zip(got, asked, strict=True)]
        )
    )
    patterned = pattern_prompts()
    pattern_images = generate(pipe, [p[0] for p in patterned], range(3000, 3048), args.steps, args.guidance_scale)
    class_images = generate(pipe, [CLASS_PROMPT] * 16, range(1000, 1016), args.steps, args.guidance_scale)
    instance_images = generate(pipe, [INSTANCE_PROMPT] * 16, range(2000, 2016), args.steps, args.guidance_scale)
    if args.grid is not None:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        big = [im.resize((64, 64), Image.Resampling.NEAREST) for im in images + pattern_images + class_images]
        make_image_grid(big, rows=len(big) // 16, cols=16).save(args.grid)
    return {
        "fidelity": fidelity,
        "all_three": all_three,
        "pattern_accuracy": pattern_accuracy(evaluator, pattern_images, patterned),
        "pattern_prompts": len(patterned),
        "class_preservation": evaluator.class_preservation(class_images),
        "class_colours": sorted(set(evaluator.colours(class_images))),
        "class_subject_probability": float(evaluator.subject_probability(class_images).mean()),
        "instance_subject_probability": float(evaluator.subject_probability(instance_images).mean()),
        "generation_seconds": seconds,
        "size_mb": folder_megabytes(args.model),
        "parameters": {
            name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        },
    }


def write_report(args: argparse.Namespace, result: dict) -> None:
    f, p = result["fidelity"], result["pattern_accuracy"]
    summary = json.loads(args.train_summary.read_text()) if args.train_summary and args.train_summary.is_file() else {}
    train = summary.get("command", "python -m scripts.train_toy_base")
    minutes = summary.get("minutes")
    lines = [
        "# Toy SDXL base model (`assets/toy-sdxl-base`)",
        "",
        "A `StableDiffusionXLPipeline` (SDXL-type text_time UNet, `AutoencoderKL` 32x32 -> 16x16x4, `CLIPTextModel` +",
        "`CLIPTextModelWithProjection` with word-level tokenizers) trained from scratch on the toy world's renders.",
        "",
        f"Prompt following on {args.n} generations (every shape x colour x background caption at least once, seeds",
        f"0-{args.n - 1}, {args.steps} Euler steps, guidance {args.guidance_scale}), scored by the toy evaluator",
        "(`benchmarks/results/evaluator.md`):",
        "",
        "| attribute | accuracy |",
        "| --- | ---: |",
        f"| shape | {f['shape']:.3f} |",
        f"| colour | {f['colour']:.3f} |",
        f"| background | {f['background']:.3f} |",
        f"| all three at once | {result['all_three']:.3f} |",
        "",
        f"Two-colour prompts ({result['pattern_prompts']}, every pattern x base-world colour pair x shape once, "
        f"seeds 3000-3047), each matched to the most similar of the {len(PATTERNS) * len(BASE_PATTERN_PAIRS)} looks "
        "the base world paints on that shape (the evaluator's appearance similarity to renders of each; a coarse "
        "measure: renders of the asked look itself score well below 1 at other poses, so read it with the grid): "
        f"pattern {p['pattern']:.3f} (chance {1 / len(PATTERNS):.3f}), colour pair {p['colours']:.3f} (chance "
        f"{1 / len(BASE_PATTERN_PAIRS):.3f}), both {p['both']:.3f}.",
        "",
        f'- Class prompt "{CLASS_PROMPT}" (16 seeds): {result["class_preservation"]:.3f} are plain stars '
        f"(colours seen: {', '.join(result['class_colours'])}); mean P(subject) "
        f"{result['class_subject_probability']:.3f}.",
        f'- Untrained instance prompt "{INSTANCE_PROMPT}" (16 seeds): mean P(subject) '
        f"{result['instance_subject_probability']:.3f} (the base model has never seen the subject).",
        f"- Size on disk: {result['size_mb']:.1f} MB (fp32 safetensors). Generating the {args.n} images took "
        f"{result['generation_seconds']:.0f} s on 2 CPU cores.",
        "- Parameters: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in result["parameters"].items()) + ".",
    ]
    if minutes is not None:
        lines.append(
            f"- Training wall time: {minutes:.1f} min on a 2-core machine shared with other work "
            f"(VAE {summary.get('vae_minutes', 0):.1f} min + UNet/text encoders "
            f"{summary.get('unet_minutes', 0):.1f} min); CPU time {summary.get('cpu_minutes', 0):.1f} "
            f"min over {summary.get('threads', 2)} threads, i.e. about "
            f"{summary.get('cpu_minutes', 0) / summary.get('threads', 2):.1f} min of both cores."
        )
    lines += [
        "",
        "Reproduce:",
        "",
        "```bash",
        train,
        f"python -m scripts.eval_toy_base --model {display_path(args.model)}"
        " --train-summary runs/toy-base/summary.json \\",
        "    --report benchmarks/results/toy_base.md --grid benchmarks/results/toy_base_samples.png",
        "```",
        "",
    ]
    if args.grid is not None:
        lines += [
            f'![{args.n} generations, {result["pattern_prompts"]} two-colour ones, then 16 of "{CLASS_PROMPT}"]'
            f"({args.grid.name})",
            "",
        ]
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    result = evaluate_model(args)
    logger.info("%s", json.dumps(result))
    if args.report is not None:
        write_report(args, result)
    return result


if __name__ == "__main__":
    main()
