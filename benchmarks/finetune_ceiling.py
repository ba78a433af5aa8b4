#!/usr/bin/env python
"""The toy base's own ceiling on a subject: DreamBooth by fine-tuning every UNet parameter, scored like the benchmark.

No adapter is involved: the UNet itself is trained (AdamW, constant lr, batch 2, the subject's 5 instance images and
captions, no prior preservation) and scored at several steps with the subject-driven benchmark's scorer
(`toyworld.compare.score`). Where even this misses the target, the subject is out of the base model's reach, whatever
the adapter:

    python -m benchmarks.finetune_ceiling --subjects star circle square --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionXLPipeline

from benchmarks.learning_curve import machine, results_footer
from lily_diffusion.grids import GridAdapter
from lily_diffusion.training.data import list_image_files, open_rgb, read_captions
from toyworld.compare import EvalPlan, score
from toyworld.evaluate import ToyEvaluator
from toyworld.paths import BASE_MODEL_DIR, RESULTS
from toyworld.render import SIZE
from toyworld.report import PROMPT_TARGET, SUBJECT_TARGET
from toyworld.subjects import SUBJECTS, Subject, get_subject

logger = logging.getLogger(__name__)

RESULTS_MD = RESULTS / "finetune_ceiling.md"
BATCH = 2
COLUMNS = ("subject", "similarity", "background_seen", "background_unseen", "class_preservation")


def instance_batch(
    pipe: StableDiffusionXLPipeline, subject: Subject
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The instance images' latents and their captions' embeddings and pooled embeddings."""
    paths = list_image_files(subject.folder)  # read as the training script reads them
    captions = read_captions(subject.folder, None)
    pixels = [np.asarray(open_rgb(path), dtype=np.float32) for path in paths]
    images = torch.from_numpy(np.stack(pixels) / 127.5 - 1.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(
            [captions[path.name] for path in paths], device="cpu", do_classifier_free_guidance=False
        )
    return latents, embeds, pooled


def finetune(subject: Subject, lr: float, seed: int, checks: Sequence[int]) -> dict[int, dict[str, float]]:
    """Fine-tune a fresh copy of the base UNet on `subject`; its scores at each step of `checks`."""
    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline.from_pretrained(BASE_MODEL_DIR, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    latents, embeds, pooled = instance_batch(pipe, subject)
    noise_scheduler = DDPMScheduler.from_pretrained(BASE_MODEL_DIR, subfolder="scheduler")
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32).repeat(BATCH, 1)
    unet = pipe.unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    evaluator, base = ToyEvaluator.load(), GridAdapter("fine-tuned UNet", None, "base", 0)
    generator = torch.Generator().manual_seed(seed)
    scores: dict[int, dict[str, float]] = {}
    for step in range(1, max(checks) + 1):
        index = torch.randint(0, len(latents), (BATCH,), generator=generator)
        noise = torch.randn(latents[index].shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (BATCH,), generator=generator)
        noisy = noise_scheduler.add_noise(latents[index], noise, t)
        cond = {"text_embeds": pooled[index], "time_ids": time_ids}
        loss = F.mse_loss(unet(noisy, t, embeds[index], added_cond_kwargs=cond).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step in checks:
            unet.eval()
            with torch.no_grad():
                scores[step] = score(pipe, base, evaluator, EvalPlan(), subject)
            unet.train()
            logger.info("%s lr %g seed %d step %d: %s", subject.name, lr, seed, step, _rounded(scores[step]))
    return scores


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 3) for key, value in scores.items()}


def render(results: dict[str, dict[int, dict[int, dict[str, float]]]], lr: float, footer: str) -> str:
    lines = [
        "# The toy base's ceiling: DreamBooth by fine-tuning the whole UNet",
        "",
        f"Every UNet parameter trained (AdamW, constant lr {lr:g}, batch {BATCH}, no prior), scored at each step "
        "with the subject-driven benchmark's scorer (columns as in subject_driven.md). Target: subject fidelity >= "
        f"{SUBJECT_TARGET} and prompt fidelity (all backgrounds) >= {PROMPT_TARGET}.",
        "",
        "| subject | seed | step | " + " | ".join(COLUMNS) + " |",
        "|---|---:|---:|" + "---:|" * len(COLUMNS),
    ]
    for name, seeds in results.items():
        for seed, steps in seeds.items():
            for step, scores in steps.items():
                cells = " | ".join(f"{scores[c]:.3f}" for c in COLUMNS)
                lines.append(f"| {name} | {seed} | {step} | {cells} |")
    return "\n".join(lines) + "\n\n" + footer


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", nargs="+", choices=sorted(SUBJECTS), default=["star"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, nargs="+", default=[600, 1200, 1800], help="Steps scored.")
    parser.add_argument("--results", type=Path, default=RESULTS_MD, help="Markdown output (JSON beside it).")
    args = parser.parse_args(input_args)
    if args.learning_rate <= 0 or min(args.steps) < 1:
        parser.error("--learning_rate must be positive and --steps at least 1")
    return args


def main(input_args: Sequence[str] | None = None) -> dict[str, dict[int, dict[int, dict[str, float]]]]:
    args = parse_args(input_args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    started, where = time.perf_counter(), machine()
    results = {
        name: {seed: finetune(get_subject(name), args.learning_rate, seed, sorted(args.steps)) for seed in args.seeds}
        for name in args.subjects
    }
    footer = results_footer("benchmarks.finetune_ceiling", input_args, started, where)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(render(results, args.learning_rate, footer))
    args.results.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
