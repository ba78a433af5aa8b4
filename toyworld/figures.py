"""Grids for people: a title, the subject's target (one instance image) in the first column, short column headers
(method and budget), then one column per adapter; rows are prompt x seed."""

from __future__ import annotations

from collections.abc import Sequence

from diffusers import StableDiffusionXLPipeline
from PIL import Image

from lily_diffusion.grids import GridAdapter, generate_for_adapter
from lily_diffusion.images import labelled_grid

from .methods import method_name
from .subjects import Subject

TARGET_HEADER = "target (instance image)"


def column_header(method: str, num_parameters: int, detail: str = "") -> str:
    """'Lily 32,000 params', 'LoRA + prior 32,768 params', 'base model'."""
    if num_parameters == 0:
        return "base model"
    return f"{method_name(method)}{f' {detail}' if detail else ''} {num_parameters:,} params"


def subject_grid(
    pipe: StableDiffusionXLPipeline,
    subject: Subject,
    adapters: Sequence[GridAdapter],
    headers: Sequence[str],
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int,
    guidance_scale: float,
    title: str,
    cell_size: int = 64,
) -> Image.Image:
    """The target column (the subject's first instance image on every row), then every adapter's images."""
    if len(headers) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(headers)} column headers")
    pipe.set_progress_bar_config(disable=True)
    rows = len(prompts) * len(seeds)
    target = subject.instance_images()[0]
    columns = [[target] * rows]
    columns += [
        generate_for_adapter(pipe, adapter, prompts, seeds, num_inference_steps, guidance_scale, None)
        for adapter in adapters
    ]
    row_labels = [f"{prompt} (seed {seed})" for prompt in prompts for seed in seeds]
    return labelled_grid(columns, row_labels, [TARGET_HEADER, *headers], cell_size, title=title)
