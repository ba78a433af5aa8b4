"""Validation images: generate with the current adapter (or the saved one), save a labelled grid, log it."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import SchedulerMixin, StableDiffusionXLPipeline
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw, ImageFont

from ..backends import get_backend
from .checkpointing import TrainState
from .models import SDXLComponents

logger = get_logger(__name__)


def generate_images(
    pipeline: StableDiffusionXLPipeline,
    prompt: str,
    num_images: int,
    seed: int,
    num_inference_steps: int,
    resolution: int,
    weight_dtype: torch.dtype = torch.float32,
) -> list[Image.Image]:
    """`num_images` images of `prompt`, image i from its own generator seeded with seed + i.

    With half-precision weights the pipeline runs under autocast (the VAE stays fp32)."""
    device = pipeline.unet.device
    autocast = torch.autocast(device.type, dtype=weight_dtype) if weight_dtype != torch.float32 else nullcontext()
    images = []
    with torch.no_grad(), autocast:
        for i in range(num_images):
            generator = torch.Generator(device=device).manual_seed(seed + i)
            images += pipeline(
                prompt=prompt,
                num_inference_steps=num_inference_steps,
                height=resolution,
                width=resolution,
                generator=generator,
            ).images
    return images


def render_validation_prompt(
    args: argparse.Namespace, pipeline: StableDiffusionXLPipeline, run_seed: int, weight_dtype: torch.dtype
) -> list[Image.Image]:
    """The --num_validation_images images of --validation_prompt (seeded by --validation_seed or the run's seed)."""
    seed = args.validation_seed if args.validation_seed is not None else run_seed
    return generate_images(
        pipeline,
        args.validation_prompt,
        args.num_validation_images,
        seed,
        args.num_validation_inference_steps,
        args.resolution,
        weight_dtype,
    )


def labelled_grid(images: list[Image.Image], label: str) -> Image.Image:
    """The images side by side under a white band with `label` (at least as wide as the text)."""
    grid = make_image_grid(images, rows=1, cols=len(images))
    font = ImageFont.load_default()
    left, top, right, bottom = ImageDraw.Draw(grid).textbbox((0, 0), label, font=font)
    band = bottom - top + 8
    canvas = Image.new("RGB", (max(grid.width, right - left + 8), grid.height + band), "white")
    ImageDraw.Draw(canvas).text((4, 4 - top), label, fill="black", font=font)
    canvas.paste(grid, (0, band))
    return canvas


def log_images(accelerator: Accelerator, tag: str, images: list[Image.Image], step: int) -> None:
    """Send the images to the TensorBoard (or wandb) trackers."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            array = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images(tag, array, step, dataformats="NHWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image, caption=f"{i}") for i, image in enumerate(images)]}, step=step)


def save_validation(
    accelerator: Accelerator,
    images: list[Image.Image],
    output_dir: str | Path,
    name: str,
    label: str,
    step: int,
) -> Path:
    """Write `output_dir/validation/<name>.png` (a labelled grid) and log the images."""
    folder = Path(output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    labelled_grid(images, label).save(path)
    log_images(accelerator, "validation" if name != "final" else "test", images, step)
    logger.info(f"validation grid: {path}")
    return path


def validation_pipeline(
    components: SDXLComponents,
    scheduler: SchedulerMixin,
    unet: torch.nn.Module,
    text_encoder_one: torch.nn.Module,
    text_encoder_two: torch.nn.Module,
) -> StableDiffusionXLPipeline:
    """A pipeline around the models being trained (no copies: the live adapter is used)."""
    pipeline = StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=text_encoder_one,
        text_encoder_2=text_encoder_two,
        tokenizer=components.tokenizer_one,
        tokenizer_2=components.tokenizer_two,
        unet=unet,
        scheduler=scheduler,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def make_validator(
    args: argparse.Namespace,
    accelerator: Accelerator,
    components: SDXLComponents,
    scheduler: SchedulerMixin,
    weight_dtype: torch.dtype,
    state: TrainState,
) -> Callable[[int], None]:
    """A `validate(step)` that renders the validation prompt with the live adapter (main process only)."""

    def validate(step: int) -> None:
        if not accelerator.is_main_process or not args.num_validation_images:
            return
        models = [components.unet, components.text_encoder_one, components.text_encoder_two]
        modes = [m.training for m in models]
        for model in models:
            model.eval()
        pipeline = validation_pipeline(components, scheduler, *models)
        images = render_validation_prompt(args, pipeline, state.seed, weight_dtype)
        save_validation(
            accelerator, images, args.output_dir, f"step_{step:06d}", f"step {step}: {args.validation_prompt}", step
        )
        for model, mode in zip(models, modes, strict=True):
            model.train(mode)

    return validate


def final_validation(
    args: argparse.Namespace,
    accelerator: Accelerator,
    components: SDXLComponents,
    scheduler: SchedulerMixin,
    weight_dtype: torch.dtype,
    seed: int,
    step: int,
) -> None:
    """Load the saved weights into a fresh base pipeline, as a user would, and render the validation prompt."""
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        vae=components.vae,
        scheduler=scheduler,
        revision=args.revision,
        variant=args.variant,
        torch_dtype=weight_dtype,
    )
    get_backend(args.adapter).load_into_pipeline(pipeline, args.output_dir)
    pipeline.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    images = render_validation_prompt(args, pipeline, seed, weight_dtype)
    save_validation(accelerator, images, args.output_dir, "final", f"final: {args.validation_prompt}", step)
