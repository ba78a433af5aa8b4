"""Instance images from a `datasets`-library dataset (`--dataset_name`), as diffusers' script reads them."""

from __future__ import annotations

import importlib.util

from PIL import Image, ImageOps

from .data import ImageRecord, to_rgb
from .errors import TrainingError


def load_dataset_records(
    name: str,
    config_name: str | None,
    cache_dir: str | None,
    image_column: str,
    caption_column: str | None,
    instance_prompt: str,
) -> list[ImageRecord]:
    """The `train` split's images (upright RGB, in memory) with their captions or `instance_prompt`."""
    if importlib.util.find_spec("datasets") is None:
        raise TrainingError("--dataset_name needs the datasets library: `pip install datasets`")
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, config_name, cache_dir=cache_dir)["train"]
    except Exception as err:  # hub, network, format: one line for the user
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingError(f"cannot load --dataset_name {name}: {text}") from err
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column is not None and column not in dataset.column_names:
            raise TrainingError(f"{flag} {column!r} is not a column of {name} ({', '.join(dataset.column_names)})")
    records = []
    for row in dataset:
        image = row[image_column]
        if not isinstance(image, Image.Image):
            raise TrainingError(f"--image_column {image_column!r} of {name} does not hold images")
        upright = to_rgb(ImageOps.exif_transpose(image))
        prompt = str(row[caption_column]).strip() if caption_column else ""
        records.append(ImageRecord(None, (upright.height, upright.width), prompt or instance_prompt, upright))
    if not records:
        raise TrainingError(f"--dataset_name {name} has no training images")
    return records
