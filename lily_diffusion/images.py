"""Seeded image generation and labelled image grids, shared by lily-grid, training validation and the workbench."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw, ImageFont


def generate(
    pipe: StableDiffusionXLPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 25,
    guidance_scale: float = 5.0,
    size: int | None = None,
    batch_size: int = 32,
    generator_device: torch.device | str = "cpu",
    weight_dtype: torch.dtype = torch.float32,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair, each from its own `torch.Generator` on `generator_device` seeded with its
    seed, in pipeline calls of `batch_size` pairs. `size`: height and width (None: the model's). With half-precision
    weights (`weight_dtype`) the pipeline runs under autocast."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    device_type = pipe.unet.device.type
    autocast = torch.autocast(device_type, dtype=weight_dtype) if weight_dtype != torch.float32 else nullcontext()
    images: list[Image.Image] = []
    with torch.no_grad(), autocast:
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            generators = [torch.Generator(device=generator_device).manual_seed(int(s)) for s in seeds[chunk]]
            images += pipe(
                prompt=list(prompts[chunk]),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=size,
                width=size,
                generator=generators,
            ).images
    return images


TITLE_SIZE = 14  # pixels
TITLE_WIDTH = 480  # a grid narrower than this widens for its title, up to this width; wider ones wrap it


def labelled_grid(
    columns: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    cell_size: int | None = None,
    title: str | None = None,
) -> Image.Image:
    """Lay out `columns[c][r]` with the column labels on top, the row labels on the left and a title above all.

    Without row labels the images start at the left edge; without column labels or title there is no band for
    them. The title is word-wrapped to the grid's width (a narrow grid widens for it, up to `TITLE_WIDTH`)."""
    num_rows = len(columns[0])
    cells = [image for row in range(num_rows) for image in (column[row] for column in columns)]
    if cell_size is not None:
        cells = [image.resize((cell_size, cell_size), Image.Resampling.NEAREST) for image in cells]
    body = make_image_grid(cells, rows=num_rows, cols=len(columns))
    cell_width, cell_height = body.width // len(columns), body.height // num_rows
    font = fitting_label_font(list(column_labels), cell_width) if column_labels else ImageFont.load_default()
    measure = ImageDraw.Draw(body)
    line_height = font.getbbox("Ag")[3] + 2
    left_margin = int(8 + max(measure.textlength(label, font=font) for label in row_labels)) if row_labels else 0
    width = left_margin + body.width
    title_font = label_font(TITLE_SIZE)
    title_line_height = title_font.getbbox("Ag")[3] + 3
    if title:
        width = max(width, min(int(measure.textlength(title, font=title_font)) + 12, TITLE_WIDTH))
    title_lines = _wrap(title, width - 8, title_font, measure) if title else []
    title_band = 8 + title_line_height * len(title_lines) if title_lines else 0
    wrapped = [_wrap(label, cell_width, font, measure) for label in column_labels or []]
    top_margin = title_band + (8 + line_height * max(len(lines) for lines in wrapped) if wrapped else 0)
    canvas = Image.new("RGB", (width, top_margin + body.height), "white")
    canvas.paste(body, (left_margin, top_margin))
    draw = ImageDraw.Draw(canvas)
    for number, line in enumerate(title_lines):
        draw.text((6, 4 + number * title_line_height), line, "black", title_font)
    for index, lines in enumerate(wrapped):
        for line_number, line in enumerate(lines):
            xy = (left_margin + index * cell_width + 2, title_band + 4 + line_number * line_height)
            draw.text(xy, line, "black", font)
    for index, label in enumerate(row_labels or []):
        draw.text((4, top_margin + index * cell_height + cell_height // 2 - line_height // 2), label, "black", font)
    return canvas


@functools.lru_cache(maxsize=32)
def label_font(size: int = 12) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (the TrueType font matplotlib ships) at `size` pixels; Pillow's default font at that size if
    matplotlib is not installed."""
    try:
        from matplotlib import font_manager
    except ImportError:
        return ImageFont.load_default(size)
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def fitting_label_font(
    labels: Sequence[str], width: int, largest: int = 13, smallest: int = 7
) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The largest `label_font` (from `largest` down to `smallest` pixels) in which every word of `labels` fits
    `width` pixels with `_wrap`'s margin, so wrapped labels break between words, not inside them."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    words = [word for label in labels for word in label.split()]
    for size in range(largest, smallest, -1):
        font = label_font(size)
        if all(measure.textlength(word, font=font) <= width - 4 for word in words):
            return font
    return label_font(smallest)


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
