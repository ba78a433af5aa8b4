"""Prior preservation: generate the missing class images with the base pipeline, split across processes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import StableDiffusionXLPipeline
from tqdm.auto import tqdm

from ..messages import first_line
from .data import list_image_files, os_reason
from .errors import TrainingError
from .options import ModelOptions, PriorOptions
from .paths import check_writable_folder
from .seeding import derive_seed

logger = get_logger(__name__)

PRECISIONS = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def generation_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    """--prior_generation_precision, defaulting to fp16 on GPU and fp32 elsewhere."""
    if precision is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return PRECISIONS[precision]


def count_class_images(class_dir: str | Path) -> int:
    """How many image files `class_dir` holds (0 if it does not exist); a TrainingError if it cannot be read."""
    folder = Path(class_dir)
    try:
        return len(list_image_files(folder)) if folder.is_dir() else 0
    except OSError as err:
        raise TrainingError(f"--class_data_dir {folder} cannot be read ({os_reason(err)})") from err


def check_class_data_dir(class_dir: str | Path, num_class_images: int) -> None:
    """Before any work: `class_dir` must be readable and, if images are missing, a folder we can write into."""
    if count_class_images(class_dir) < num_class_images:
        check_writable_folder(class_dir, "--class_data_dir")


def ensure_class_images(
    accelerator: Accelerator, prior: PriorOptions, base: ModelOptions, resolution: int, seed: int
) -> int:
    """Make --class_data_dir hold at least --num_class_images images, generating the missing ones with the base
    pipeline; returns how many were generated."""
    folder = Path(prior.class_data_dir)
    class_prompt, num_class_images, sample_batch_size = (
        prior.class_prompt,
        prior.num_class_images,
        prior.sample_batch_size,
    )
    model, precision = base.pretrained_model_name_or_path, prior.prior_generation_precision
    check_class_data_dir(folder, num_class_images)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrainingError(f"--class_data_dir {folder} cannot be created ({os_reason(err)})") from err
    existing = count_class_images(folder)
    accelerator.wait_for_everyone()  # every process counted before anyone writes
    missing = num_class_images - existing
    if missing <= 0:
        return 0
    logger.info(f"generating {missing} class images for {class_prompt!r} into {folder}")
    try:
        pipeline = StableDiffusionXLPipeline.from_pretrained(
            model,
            torch_dtype=generation_dtype(precision, accelerator.device),
            revision=base.revision,
            variant=base.variant,
        )
    except (OSError, ValueError) as err:
        raise TrainingError(f"cannot load {model} to generate class images: {first_line(err)}") from err
    pipeline.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    with accelerator.split_between_processes(list(range(existing, num_class_images))) as indices:
        batches = [indices[i : i + sample_batch_size] for i in range(0, len(indices), sample_batch_size)]
        for batch in tqdm(batches, desc="Generating class images", disable=not accelerator.is_local_main_process):
            generators = [
                torch.Generator(device=accelerator.device).manual_seed(derive_seed(seed, "class", index))
                for index in batch
            ]
            with torch.no_grad():
                images = pipeline(
                    prompt=[class_prompt] * len(batch), generator=generators, height=resolution, width=resolution
                ).images
            for index, image in zip(batch, images, strict=True):
                digest = hashlib.sha1(image.tobytes()).hexdigest()
                image.save(folder / f"{index}-{digest}.jpg")
    del pipeline
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    accelerator.wait_for_everyone()
    return missing
