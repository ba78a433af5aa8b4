"""Fixed prompt sets and a seeded generation helper, shared by the base-model report, tests and benchmarks."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image

from .render import BACKGROUNDS, COLOURS, SHAPES

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline


def attribute_prompts(n: int = 64) -> list[str]:
    """Every (shape, colour, background) caption once (48), then again from the start until `n` prompts."""
    combos = [
        f"a photo of a {c} {s} on a {b} background" for b, c, s in itertools.product(BACKGROUNDS, COLOURS, SHAPES)
    ]
    return [combos[i % len(combos)] for i in range(n)]


@torch.no_grad()
def generate(
    pipe: StableDiffusionXLPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance_scale: float = 5.0,
    batch_size: int = 32,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair, each from its own `torch.Generator`, so batching never changes a result."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[chunk]]
        images += pipe(
            prompt=list(prompts[chunk]),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
        ).images
    return images
