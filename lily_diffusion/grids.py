"""Labelled comparison grids: one image per (prompt, seed, adapter), rows = prompt x seed, columns = adapters.

Works the same on the real SDXL pipeline and the bundled toy one. Lily files load with
`load_lily_weights`, LoRA files with diffusers' `pipe.load_lora_weights`; the base model is a column too.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw, ImageFont
from safetensors import safe_open
from tqdm.auto import tqdm

from .pipeline import load_lily_weights, unload_lily_weights
from .serialization import FORMAT, WEIGHTS_NAME

logger = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class GridAdapter:
    """One column of the grid: an adapter file (or None for the base model) and what it is."""

    name: str
    path: Path | None
    kind: str  # "base", "lily" or "lora"
    num_parameters: int

    @property
    def label(self) -> str:
        return self.name if self.kind == "base" else f"{self.name} ({self.kind}, {self.num_parameters:,} params)"


def describe_adapter(name: str, path_or_dir: str | os.PathLike[str]) -> GridAdapter:
    """Find the weights file, tell Lily from LoRA by its metadata, count its parameters."""
    path = Path(path_or_dir)
    if path.is_dir():
        candidates = [path / WEIGHTS_NAME, path / LORA_WEIGHTS_NAME]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        raise FileNotFoundError(
            f"No adapter weights at {path_or_dir} (looked for {WEIGHTS_NAME}, {LORA_WEIGHTS_NAME})."
        )
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        keys = list(handle.keys())
        count = sum(_numel(handle.get_slice(key).get_shape()) for key in keys)
    if metadata.get("format") == FORMAT:
        kind = "lily"
    elif any("lora" in key for key in keys):
        kind = "lora"
    else:
        raise ValueError(f"{path} is neither a lily_diffusion file nor a diffusers LoRA file.")
    return GridAdapter(name, path, kind, count)


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def generate_for_adapter(
    pipe: StableDiffusionXLPipeline,
    adapter: GridAdapter,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int,
    guidance_scale: float,
    size: int | None,
) -> list[Image.Image]:
    """Images for every (prompt, seed) in row order; one pipeline call per prompt with all seeds batched."""
    if adapter.kind == "lily":
        load_lily_weights(pipe, adapter.path, adapter_name="grid")
    elif adapter.kind == "lora":
        pipe.load_lora_weights(str(adapter.path), adapter_name="grid")
    try:
        images: list[Image.Image] = []
        for prompt in prompts:
            generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
            images += pipe(
                prompt=[prompt] * len(seeds),
                generator=generators,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=size,
                width=size,
            ).images
        return images
    finally:
        if adapter.kind == "lily":
            unload_lily_weights(pipe, "grid")
        elif adapter.kind == "lora":
            pipe.unload_lora_weights()


def labelled_grid(
    columns: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    cell_size: int | None = None,
) -> Image.Image:
    """Lay out `columns[c][r]` with the column labels on top and the row labels on the left."""
    cells = [image for row in range(len(row_labels)) for image in (column[row] for column in columns)]
    if cell_size is not None:
        cells = [image.resize((cell_size, cell_size), Image.Resampling.NEAREST) for image in cells]
    body = make_image_grid(cells, rows=len(row_labels), cols=len(columns))
    cell_width, cell_height = body.width // len(columns), body.height // len(row_labels)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(body)
    left_margin = 8 + max(measure.textlength(label, font=font) for label in row_labels)
    wrapped = [_wrap(label, cell_width, font, measure) for label in column_labels]
    line_height = font.getbbox("Ag")[3] + 2
    top_margin = 8 + line_height * max(len(lines) for lines in wrapped)
    canvas = Image.new("RGB", (int(left_margin) + body.width, top_margin + body.height), "white")
    canvas.paste(body, (int(left_margin), top_margin))
    draw = ImageDraw.Draw(canvas)
    for index, lines in enumerate(wrapped):
        for line_number, line in enumerate(lines):
            draw.text((int(left_margin) + index * cell_width + 2, 4 + line_number * line_height), line, "black", font)
    for index, label in enumerate(row_labels):
        draw.text((4, top_margin + index * cell_height + cell_height // 2 - line_height // 2), label, "black", font)
    return canvas


def _wrap(text: str, width: int, font: ImageFont.ImageFont, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy word wrap to `width` pixels; a word wider than that is cut into pieces that fit."""

    def fits(line: str) -> bool:
        return draw.textlength(line, font=font) <= width - 4

    lines: list[str] = []
    for word in text.split():
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] += f" {word}"
            continue
        while len(word) > 1 and not fits(word):
            cut = len(word) - 1
            while cut > 1 and not fits(word[:cut]):
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines or [""]


def comparison_grid(
    pipe: StableDiffusionXLPipeline,
    adapters: Sequence[GridAdapter],
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 25,
    guidance_scale: float = 5.0,
    size: int | None = None,
    cell_size: int | None = None,
) -> Image.Image:
    """Generate every (prompt, seed, adapter) and lay them out with labels."""
    pipe.set_progress_bar_config(disable=True)
    columns = [
        generate_for_adapter(pipe, adapter, prompts, seeds, num_inference_steps, guidance_scale, size)
        for adapter in tqdm(adapters, desc="adapters")
    ]
    row_labels = [f"{prompt} (seed {seed})" for prompt in prompts for seed in seeds]
    return labelled_grid(columns, row_labels, [adapter.label for adapter in adapters], cell_size)


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lily-grid", description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="Base pipeline: hub id or folder.")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="An adapter file or folder (Lily or LoRA), repeatable.",
    )
    parser.add_argument("--no_base", action="store_true", help="Leave out the base model's column.")
    parser.add_argument("--prompt", action="append", required=True, help="A prompt (a row per seed), repeatable.")
    parser.add_argument("--seed", type=int, action="append", default=None, help="Seeds (default 0 and 1).")
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--resolution", type=int, default=None, help="Image size (default: the model's).")
    parser.add_argument("--cell_size", type=int, default=None, help="Resize every image to this many pixels.")
    parser.add_argument("--output", default="grid.png", help="Where to write the PNG.")
    args = parser.parse_args(input_args)
    for spec in args.adapter:
        if "=" not in spec:
            parser.error(f"--adapter takes NAME=PATH, got {spec!r}")
    return args


def main(input_args: Sequence[str] | None = None) -> Path:
    """The `lily-grid` console script."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(input_args)
    try:
        adapters = [describe_adapter(*spec.split("=", 1)) for spec in args.adapter]
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    if not args.no_base:
        adapters.insert(0, GridAdapter("base", None, "base", 0))
    pipe = StableDiffusionXLPipeline.from_pretrained(args.pretrained_model_name_or_path)
    grid = comparison_grid(
        pipe,
        adapters,
        args.prompt,
        args.seed or [0, 1],
        args.num_inference_steps,
        args.guidance_scale,
        args.resolution,
        args.cell_size,
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    grid.save(output)
    logger.info("wrote %s", output)
    return output
