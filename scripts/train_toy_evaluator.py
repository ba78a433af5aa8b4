"""Train the toy world's evaluator CNNs (deterministic) and report every measure's held-out accuracy, per subject,
with each subject's VAE ceiling (its instance images through the base model's VAE and back, scored).

Writes `assets/toy-evaluator/{shape,subject}.safetensors` and `benchmarks/results/evaluator.md`:

    python -m scripts.train_toy_evaluator
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a shared 2-core machine: threads sleep, not spin

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from toyworld.classifiers import STRIPE_SCALES, degrade, near_miss, to_unit
from toyworld.evaluate import DEFAULT_DIR, ToyEvaluator, as_uint8, train_evaluator
from toyworld.paths import BASE_MODEL_DIR, RESULTS
from toyworld.render import random_scenes, render_array, render_batch, sample_scene
from toyworld.subjects import SUBJECTS, Subject

logger = logging.getLogger("train_toy_evaluator")
HELDOUT_SEED = 2024  # never used in training
TIMING_RETRAINED = "Training both CNNs and this report took {minutes:.1f} min (1 torch thread, a shared machine)."
TIMING_KEPT = """Training the subject CNN and this report took {minutes:.1f} min (1 torch thread, a shared 2-core
machine). The shape CNN was kept: its training data, the base world's renders, is unchanged (pinned by
`tests/toyworld/test_render.py`); `--retrain-shape` trains it again too."""
TIMING_KEPT_BOTH = """This report took {minutes:.1f} min (1 torch thread). Both CNNs were kept (`--keep-cnns`): their
training data, fresh renders of the base world and of the subjects on any background, does not depend on the instance
images. Retraining on another machine gives other bytes (CPU floating point; held-out accuracy within 0.007 per
subject), so keeping them keeps every committed score comparable."""
CEILING_RENDERS = 32  # fresh renders per subject on its unseen background, for the VAE ceiling


def degraded(images: np.ndarray, seed: int) -> np.ndarray:
    x = degrade(to_unit(images), torch.Generator().manual_seed(seed))
    return (x.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)


@torch.no_grad()
def vae_round_trip(images: np.ndarray, vae: AutoencoderKL) -> np.ndarray:
    """uint8 [n, h, w, 3] -> encoded (the posterior's mode) and decoded by `vae` -> uint8: what any adapter's
    output is limited to, since every generated image comes out of this decoder."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return ((decoded.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def analytic_accuracies(evaluator: ToyEvaluator, n: int) -> dict[str, float]:
    scenes = random_scenes(n, HELDOUT_SEED)
    clean = render_batch(scenes)
    result = {}
    for name, images in (("", clean), ("_degraded", degraded(clean, HELDOUT_SEED))):
        result["background" + name] = float(
            np.mean([b == s.background for b, s in zip(evaluator.backgrounds(images), scenes, strict=True)])
        )
        result["colour" + name] = float(
            np.mean([c == s.colour for c, s in zip(evaluator.colours(images), scenes, strict=True)])
        )
    return result


def vae_ceiling(evaluator: ToyEvaluator, subject: Subject, vae: AutoencoderKL) -> dict[str, float]:
    """The subject measures of the VAE round trip of the instance images and of fresh renders on the unseen
    background: the best any adapter can score."""
    instances = as_uint8(subject.instance_images())
    rng = np.random.default_rng([HELDOUT_SEED, 7])
    fresh = np.stack([render_array(subject.scene(rng, subject.unseen_background)) for _ in range(CEILING_RENDERS)])
    out = {}
    for key, images in (("instances", vae_round_trip(instances, vae)), ("unseen", vae_round_trip(fresh, vae))):
        p = evaluator.subject_probability(images, subject)
        out[f"{key}_p"], out[f"{key}_p_min"] = float(p.mean()), float(p.min())
        out[f"{key}_similarity"] = float(evaluator.subject_similarity(images, instances).mean())
    out["instances_similarity_raw"] = float(evaluator.subject_similarity(instances, instances).mean())
    return out


def subject_calibration(evaluator: ToyEvaluator, subject: Subject, n: int) -> dict[str, tuple[float, float]]:
    """(mean P(subject), mean similarity to the instance images) on held-out groups of images."""
    rng = np.random.default_rng([HELDOUT_SEED, 1, list(SUBJECTS).index(subject.name)])
    others = [s for s in SUBJECTS.values() if s != subject]
    groups = {
        "instance images": as_uint8(subject.instance_images()),
        "fresh renders": np.stack([render_array(subject.scene(rng)) for _ in range(n)]),
        "its shape, base world": np.stack([render_array(sample_scene(rng, shape=subject.shape)) for _ in range(n)]),
        "base world": render_batch([sample_scene(rng) for _ in range(n)]),
        "near misses": np.stack([near_miss(rng, subject)[0] for _ in range(n)]),
        "other subjects": np.stack([render_array(others[i % len(others)].scene(rng)) for i in range(n)]),
    }
    references = groups["instance images"]
    return {
        name: (
            float(evaluator.subject_probability(images, subject).mean()),
            float(evaluator.subject_similarity(images, references).mean()),
        )
        for name, images in groups.items()
    }


def base_model_check(evaluator: ToyEvaluator, model: Path, n: int = 16) -> dict[str, tuple[float, float]]:
    """A sanity check, not training data: the base model has never seen a subject, so none of its images should
    score as one. Per subject, (mean P(subject), class preservation) of its class and instance prompts."""
    from diffusers import StableDiffusionXLPipeline

    from toyworld.prompts import generate

    pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for subject in SUBJECTS.values():
        for prompt, first_seed in ((subject.class_prompt, 1000), (subject.instance_prompt, 2000)):
            images = generate(pipe, [prompt] * n, range(first_seed, first_seed + n))
            p = float(evaluator.subject_probability(images, subject).mean())
            out[f'{subject.name}: "{prompt}"'] = (p, evaluator.class_preservation(images, subject))
    return out


def subject_rows(cnn: dict[str, float], ceilings: dict[str, dict[str, float]]) -> list[str]:
    rows = []
    for subject in SUBJECTS.values():
        c = ceilings[subject.name]
        colours = "/".join(subject.colours) + (" (base world)" if subject.base_world_colours else " (never shown)")
        rows.append(
            f"| {subject.name} | {subject.shape} | {subject.pattern} | {colours} | "
            f"{', '.join(subject.seen_backgrounds)} | {subject.unseen_background} | "
            f"{cnn[f'subject:{subject.name}']:.4f} | {cnn[f'subject:{subject.name}_degraded']:.4f} | "
            f"{c['instances_p']:.3f} (min {c['instances_p_min']:.3f}) | "
            f"{c['unseen_p']:.3f} (min {c['unseen_p_min']:.3f}) | "
            f"{c['instances_similarity_raw']:.3f} | {c['instances_similarity']:.3f} | {c['unseen_similarity']:.3f} |"
        )
    return rows


def write_report(
    path: Path,
    cnn: dict[str, float],
    analytic: dict[str, float],
    ceilings: dict[str, dict[str, float]],
    calibration: dict[str, dict[str, tuple[float, float]]],
    base_check: dict[str, tuple[float, float]],
    seconds: float,
    n: int,
    timing: str,
    argv: Sequence[str],
) -> None:
    rows = [
        ("shape (CNN, 4 classes)", cnn["shape"], cnn["shape_degraded"]),
        (f"which subject, if any (CNN, {len(SUBJECTS) + 1} classes)", cnn["subject"], cnn["subject_degraded"]),
        ("background (border median, exact)", analytic["background"], analytic["background_degraded"]),
        ("colour (object median, exact)", analytic["colour"], analytic["colour_degraded"]),
    ]
    groups = list(next(iter(calibration.values())))
    lines = [
        "# Toy-world evaluator: held-out accuracy and each subject's VAE ceiling",
        "",
        "Every measure is trained or defined only on ground-truth renders and scored on renders from a seed never",
        "used in training (2,000 per CNN, 2,000 base-world scenes for the exact measures). *Degraded* = the same",
        "images with random blur (sigma 0-1.5 px), noise (std 0-0.05), contrast/brightness jitter (±8%) and a",
        "per-channel gain (±5%), the kind of softness and colour drift a diffusion model's output has.",
        "",
        "| measure | held-out accuracy | degraded |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {clean:.4f} | {deg:.4f} |" for name, clean, deg in rows],
        "",
        "## Subjects",
        "",
        "Each subject has 5 instance images (`samples/subjects/<name>/`) on its two seen backgrounds; the unseen",
        'one is asked only at test time. *Held-out accuracy*: "P(subject) > 0.5" on 1,000 fresh renders, half the',
        "subject (any background), half not (a third each: base world, its near misses, the other subjects).",
        "A striped subject is any phase of its stripes and a period within "
        f"{STRIPE_SCALES[0]:g}-{STRIPE_SCALES[1]:g}x its own, in training and in these",
        "renders: a subject CNN trained on the exact renders learned the stripes' phase (a star shifted by half a",
        "period, i.e. its two colours swapped, scored P(star) 0.000) and gave 0 to generated striped stars a person",
        "calls the subject.",
        "*VAE ceiling*: the images encoded (posterior mode) and decoded by the base model's VAE",
        "(`assets/toy-sdxl-base/vae`), then scored: every generated image comes out of that decoder, so no adapter",
        f"can do better. Ceilings on the instance images and on {CEILING_RENDERS} fresh renders on the unseen",
        "background; similarity is to the instance images (the *raw* column: the instance images themselves).",
        "",
        "| subject | shape | pattern | colours | seen backgrounds | unseen | held-out accuracy | degraded | "
        "VAE ceiling P(subject), instances | VAE ceiling P(subject), unseen background | similarity raw | "
        "similarity VAE, instances | similarity VAE, unseen |",
        "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *subject_rows(cnn, ceilings),
        "",
        f"Mean P(subject) / mean similarity to the subject's instance images, on held-out groups ({n} renders each;",
        "*its shape, base world*: plain stars for the star, and so on):",
        "",
        "| subject | " + " | ".join(groups) + " |",
        "| --- |" + " ---: |" * len(groups),
        *[
            f"| {name} | " + " | ".join(f"{p:.3f} / {s:.3f}" for p, s in values.values()) + " |"
            for name, values in calibration.items()
        ],
        "",
    ]
    if base_check:
        lines += [
            "The base model has never seen a subject (16 generations per prompt, seeds 1000-1015 for the class",
            "prompt, 2000-2015 for the instance prompt, 25 steps, guidance 5): mean P(subject) and class preservation",
            "(the fraction that are the subject's shape and not the subject):",
            "",
            "| prompt | mean P(subject) | class preservation |",
            "| --- | ---: | ---: |",
            *[f"| {name} | {p:.3f} | {kept:.3f} |" for name, (p, kept) in base_check.items()],
            "",
        ]
    lines += [
        *timing.format(minutes=seconds / 60).splitlines(),
        "",
        "```bash",
        shlex.join(["python", "-m", "scripts.train_toy_evaluator", *argv]),
        "```",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--report", type=Path, default=RESULTS / "evaluator.md")
    parser.add_argument("--steps", type=int, default=None, help="training steps per CNN (default 1200)")
    parser.add_argument("--n", type=int, default=300, help="images per calibration group")
    parser.add_argument(
        "--retrain-shape",
        action="store_true",
        help="also retrain the shape CNN (default: keep the one in --out; its data, the base world, is unchanged)",
    )
    parser.add_argument(
        "--keep-cnns",
        action="store_true",
        help="train nothing: keep both CNNs in --out and rewrite the report (after a change to the instance images "
        "only; the CNNs never see them)",
    )
    parser.add_argument(
        "--base-model",
        type=Path,
        default=BASE_MODEL_DIR,
        help="the VAE ceiling's VAE; also checks the subject measures on its generations (16 per prompt)",
    )
    args = parser.parse_args(argv)
    if not (args.base_model / "vae" / "config.json").is_file():
        parser.error(f"--base-model {args.base_model} has no vae/ folder: the VAE ceiling needs the base model")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)  # the results depend on the thread count; one thread is also fastest when shared
    started = time.perf_counter()
    if args.keep_cnns and args.retrain_shape:
        parser.error("--keep-cnns trains nothing; it cannot be combined with --retrain-shape")
    if args.keep_cnns and args.steps is not None:
        parser.error("--keep-cnns trains nothing; it cannot be combined with --steps")
    kept = ["shape.safetensors", "subject.safetensors", "heldout_accuracy.json"] if args.keep_cnns else []
    for name in kept:
        if not (args.out / name).is_file():
            parser.error(f"--out {args.out} has no {name} to keep (--keep-cnns trains nothing)")
    if not args.retrain_shape and not (args.out / "shape.safetensors").is_file():
        parser.error(f"--out {args.out} has no shape.safetensors to keep; add --retrain-shape")
    if args.keep_cnns:
        cnn = json.loads((args.out / "heldout_accuracy.json").read_text())
        timing = TIMING_KEPT_BOTH
    else:
        cnn = train_evaluator(args.out, steps=args.steps or 1200, retrain_shape=args.retrain_shape)
        timing = TIMING_RETRAINED if args.retrain_shape else TIMING_KEPT
    evaluator = ToyEvaluator.load(args.out)
    analytic = analytic_accuracies(evaluator, 2000)
    vae = AutoencoderKL.from_pretrained(args.base_model / "vae", torch_dtype=torch.float32).eval()
    ceilings = {name: vae_ceiling(evaluator, subject, vae) for name, subject in SUBJECTS.items()}
    calibration = {name: subject_calibration(evaluator, subject, args.n) for name, subject in SUBJECTS.items()}
    base_check = base_model_check(evaluator, args.base_model)
    seconds = time.perf_counter() - started
    argv = sys.argv[1:] if argv is None else argv
    write_report(args.report, cnn, analytic, ceilings, calibration, base_check, seconds, args.n, timing, argv)
    (args.out / "heldout_accuracy.json").write_text(json.dumps(cnn, indent=2) + "\n")
    logger.info("CNN %s, exact %s, VAE ceilings %s", cnn, analytic, ceilings)


if __name__ == "__main__":
    main()
