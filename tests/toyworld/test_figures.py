"""Grids a person can read: a TrueType font sized to fit, labels wrapped between words, a title, the target first."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image, ImageDraw

from lily_diffusion.grids import GridAdapter
from lily_diffusion.images import _wrap, fitting_label_font, label_font, labelled_grid
from toyworld.compare import _mean_std
from toyworld.figures import TARGET_HEADER, column_header, subject_grid
from toyworld.paths import BASE_MODEL_DIR
from toyworld.subjects import SUBJECTS

LABEL = "a photo of sks star on a gray background"


def test_labels_use_dejavu_sans_from_matplotlib():
    pytest.importorskip("matplotlib")
    assert label_font(12).getname()[0] == "DejaVu Sans"
    assert label_font(12).size == 12


def test_a_long_label_wraps_between_words_inside_its_cell():
    font = fitting_label_font([LABEL, "x"], 64)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(LABEL, 64, font, draw)
    assert len(lines) >= 3 and " ".join(lines) == LABEL  # every word whole, in order
    assert all(draw.textlength(line, font=font) <= 60 for line in lines)
    assert font.size >= 8  # still legible

    cells = [[Image.new("RGB", (32, 32), "red")], [Image.new("RGB", (32, 32), "blue")]]
    grid = np.asarray(labelled_grid(cells, ["row"], [LABEL, "x"], cell_size=64)).astype(int)
    body_top, left = grid.shape[0] - 64, grid.shape[1] - 128
    header = grid[:body_top].sum(axis=2) < 300  # dark text pixels above the images
    columns = np.nonzero(header[:, left:].any(axis=0))[0]
    first = columns[columns < 64]
    assert first.size and first.max() < 64  # the long label stays in its own cell
    assert columns[columns >= 64].max() < 64 + 16  # the next cell holds only its short "x"
    rows_used = np.nonzero(header[:, left : left + 64].any(axis=1))[0]
    line_height = font.getbbox("Ag")[3] + 2
    assert rows_used.max() - rows_used.min() > (len(lines) - 1) * line_height - 2  # drawn on several lines


def test_a_long_title_wraps_above_an_unchanged_grid():
    image = Image.new("RGB", (500, 40), "blue")
    title = "DreamBooth on the star subject: the target, the base model and the best runs of every adapter method"
    out = labelled_grid([[image]], title=title)
    pixels = np.asarray(out).astype(int)
    assert out.width == 500 and np.array_equal(pixels[-40:], np.asarray(image))
    assert (pixels[:-40].sum(axis=2) < 300).any() and out.height > 40 + 2 * 14  # wrapped on two lines
    narrow = labelled_grid([[image.resize((40, 40))]], title=title)
    assert narrow.width == 480  # a narrow grid widens for its title up to TITLE_WIDTH, then wraps it


def test_short_headers_and_one_seed_tables():
    assert column_header("lily", 32000) == "Lily 32,000 params"
    assert column_header("lora", 32768, "+ prior") == "LoRA + prior 32,768 params"
    assert column_header("base", 0) == "base model"
    assert _mean_std([0.5]) == "0.500 (n=1)"
    assert _mean_std([0.25, 0.75]) == "0.500 ± 0.354"


def test_subject_grid_starts_with_the_instance_image():
    pipe = StableDiffusionXLPipeline.from_pretrained(BASE_MODEL_DIR, torch_dtype=torch.float32)
    subject = SUBJECTS["square"]
    base = GridAdapter("base", None, "base", 0)
    grid = subject_grid(pipe, subject, [base], ["base model"], [subject.caption("white")], [0], 2, 5.0, "title", 64)
    pixels = np.asarray(grid)
    target = np.asarray(subject.instance_images()[0].resize((64, 64), Image.Resampling.NEAREST))
    assert np.array_equal(pixels[-64:, -128:-64], target)
    assert not np.array_equal(pixels[-64:, -64:], target)  # then the base model's image
    assert TARGET_HEADER == "target (instance image)"
    with pytest.raises(ValueError, match="1 adapters but 2 column headers"):
        subject_grid(pipe, subject, [base], ["a", "b"], ["p"], [0], 2, 5.0, "title")
