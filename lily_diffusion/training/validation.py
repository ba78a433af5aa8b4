"""Validation images: generate with the current adapter (or the saved one), save a labelled grid, log it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import SchedulerMixin, StableDiffusionXLPipeline
from PIL import Image

from ..backends import AdapterBackend
from ..images import generate, labelled_grid
from .checkpointing import TrainState
from .models import SDXLComponents
from .options import ModelOptions

logger = get_logger(__name__)


@dataclass(frozen=True)
class ValidationSettings:
    """What the validation images are: prompt, how many, seed (None: the run's), steps, size, where they go."""

    prompt: str
    num_images: int
    seed: int | None
    num_inference_steps: int
    resolution: int
    output_dir: str


def render_validation_prompt(
    settings: ValidationSettings, pipeline: StableDiffusionXLPipeline, run_seed: int, weight_dtype: torch.dtype
) -> list[Image.Image]:
    """The validation images, image i seeded with seed + i (a generator on the pipeline's device)."""
    seed = settings.seed if settings.seed is not None else run_seed
    device = pipeline.unet.device
    return generate(
        pipeline,
        [settings.prompt] * settings.num_images,
        [seed + i for i in range(settings.num_images)],
        settings.num_inference_steps,
        size=settings.resolution,
        batch_size=1,
        generator_device=device,
        weight_dtype=weight_dtype,
    )


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
    """Write `output_dir/validation/<name>.png` (the images side by side under `label`) and log the images."""
    folder = Path(output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    labelled_grid([[image] for image in images], title=label).save(path)
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
    settings: ValidationSettings,
    accelerator: Accelerator,
    components: SDXLComponents,
    scheduler: SchedulerMixin,
    weight_dtype: torch.dtype,
    state: TrainState,
) -> Callable[[int], None]:
    """A `validate(step)` that renders the validation prompt with the live adapter (main process only)."""

    def validate(step: int) -> None:
        if not accelerator.is_main_process or not settings.num_images:
            return
        models = [components.unet, components.text_encoder_one, components.text_encoder_two]
        modes = [m.training for m in models]
        for model in models:
            model.eval()
        pipeline = validation_pipeline(components, scheduler, *models)
        images = render_validation_prompt(settings, pipeline, state.seed, weight_dtype)
        label = f"step {step}: {settings.prompt}"
        save_validation(accelerator, images, settings.output_dir, f"step_{step:06d}", label, step)
        for model, mode in zip(models, modes, strict=True):
            model.train(mode)

    return validate


def final_validation(
    settings: ValidationSettings,
    model: ModelOptions,
    backend: AdapterBackend,
    accelerator: Accelerator,
    components: SDXLComponents,
    scheduler: SchedulerMixin,
    weight_dtype: torch.dtype,
    seed: int,
    step: int,
) -> None:
    """Load the saved weights into a fresh base pipeline, as a user would, and render the validation prompt."""
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        model.pretrained_model_name_or_path,
        vae=components.vae,
        scheduler=scheduler,
        revision=model.revision,
        variant=model.variant,
        torch_dtype=weight_dtype,
    )
    backend.load_into_pipeline(pipeline, settings.output_dir)
    pipeline.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    images = render_validation_prompt(settings, pipeline, seed, weight_dtype)
    save_validation(accelerator, images, settings.output_dir, "final", f"final: {settings.prompt}", step)
