"""Instance images from a `datasets`-library dataset (`--dataset_name`), as diffusers' script reads them."""

from __future__ import annotations

import importlib.util
from io import BytesIO
from pathlib import Path

from PIL import Image, ImageOps

from ..messages import first_line
from .data import UNREADABLE, ImageRecord, check_image_size, json_type, open_rgb, to_rgb
from .errors import TrainingError


def row_image(value: object, label: str, resolution: int | None) -> Image.Image:
    """The upright RGB image of one row: from the undecoded `{"bytes", "path"}` of an Image column (its size
    checked from the header before decoding), or from an image the dataset already decoded."""
    if isinstance(value, Image.Image):
        check_image_size(label, value.size, resolution)
        return to_rgb(ImageOps.exif_transpose(value))
    if not isinstance(value, dict) or not (value.get("bytes") or value.get("path")):
        raise TrainingError(f"{label} does not hold an image")
    if value.get("path"):
        label = f"{label} ({Path(value['path']).name})"
    source = BytesIO(value["bytes"]) if value.get("bytes") else Path(value["path"])
    try:
        return open_rgb(source, resolution, name=label)
    except UNREADABLE as err:
        reason = first_line(err)
        raise TrainingError(f"{label}: cannot read the image ({reason})") from err


def load_dataset_records(
    name: str,
    config_name: str | None,
    cache_dir: str | None,
    image_column: str,
    caption_column: str | None,
    instance_prompt: str,
    resolution: int | None = None,
) -> list[ImageRecord]:
    """The `train` split's images (upright RGB, in memory) with their captions or `instance_prompt`.

    Images are decoded one by one after their size is checked (`check_image_size` at `resolution`); a caption
    that is not a string is a TrainingError naming the row."""
    if importlib.util.find_spec("datasets") is None:
        raise TrainingError("--dataset_name needs the datasets library: `pip install datasets`")
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, config_name, cache_dir=cache_dir)["train"]
    except Exception as err:  # hub, network, format: one line for the user
        text = first_line(err)
        raise TrainingError(f"cannot load --dataset_name {name}: {text}") from err
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column is not None and column not in dataset.column_names:
            raise TrainingError(f"{flag} {column!r} is not a column of {name} ({', '.join(dataset.column_names)})")
    if isinstance(dataset.features[image_column], ImageFeature):
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    records = []
    for index, row in enumerate(dataset):
        label = f"--dataset_name {name}, row {index}"
        upright = row_image(row[image_column], f"{label}, --image_column {image_column!r}", resolution)
        caption = row[caption_column] if caption_column else ""
        if not isinstance(caption, str):
            raise TrainingError(
                f"{label}: --caption_column {caption_column!r} must hold text, got {json_type(caption)}"
            )
        records.append(ImageRecord(None, (upright.height, upright.width), caption.strip() or instance_prompt, upright))
    if not records:
        raise TrainingError(f"--dataset_name {name} has no training images")
    return records
