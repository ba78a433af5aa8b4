"""Instance and class images: reading any image mode, captions, crops with SDXL micro-conditioning, batching.

Only PIL, numpy and torch (no torchvision). Randomness (crop, flip, order) is a pure function of the run seed,
the epoch and the sample index, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypedDict

import numpy as np
import torch
from accelerate.logging import get_logger
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from ..messages import first_line
from .errors import TrainingError
from .seeding import derive_seed

logger = get_logger(__name__)

SIDECAR_SUFFIXES = frozenset({".txt", ".jsonl", ".json", ".md", ".caption", ".yaml", ".yml", ".toml"})
RESAMPLING = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,  # torchvision's NEAREST_EXACT on a PIL image is PIL's NEAREST
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError)
# The square crop of a longer image shows less than 1/16 of it; past that, the resized image only costs memory.
MAX_ASPECT_RATIO = 16
# SDXL's text encoders read 77 tokens; a caption past this many characters is a mistake (a whole file pasted in),
# and tokenizing it would take minutes at each of its uses (a million characters: seconds per call).
MAX_CAPTION_CHARS = 100_000
# An epoch's order is a permutation of its examples held in memory (80 MB at this many).
MAX_EPOCH_EXAMPLES = 10_000_000


@dataclass(frozen=True)
class ImageRecord:
    """One training image: its file (or, from a datasets-library dataset, the upright RGB image itself),
    its upright size (height, width) and its prompt."""

    path: Path | None
    size: tuple[int, int]
    prompt: str
    image: Image.Image | None = None

    def load(self) -> Image.Image:
        """The upright 8-bit RGB image."""
        return self.image if self.image is not None else open_rgb(self.path)


@dataclass(frozen=True)
class PreparedImage:
    """A cropped square in [-1, 1] with the SDXL micro-conditioning that describes it."""

    pixels: torch.Tensor  # [3, resolution, resolution]
    original_size: tuple[int, int]  # (height, width) of the upright source image
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (RGBA, LA, P, L, 1, CMYK, I;16, I, F, ...) to 8-bit RGB; alpha goes over white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image).astype(np.float64)
        if image.mode == "F" and array.size and array.max() <= 1.0:
            array = array * 255.0
        elif image.mode != "F" and (image.mode.startswith("I;16") or (array.size and array.max() > 255)):
            array = array / 257.0  # 16-bit range
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def os_reason(err: OSError) -> str:
    """The short reason of an OS error ('Permission denied'), without the path it repeats."""
    return err.strerror or str(err) or type(err).__name__


def check_image_size(name: str, size: tuple[int, int], resolution: int | None = None) -> None:
    """Refuse (TrainingError naming `name`) an image whose header `size` (width, height) is absurd: more pixels
    than PIL's decompression-bomb limit, an aspect ratio above MAX_ASPECT_RATIO, or, resized so that its
    short side is `resolution`, more pixels than that limit."""
    width, height = size
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise TrainingError(
            f"{name} has {width}x{height} = {width * height:,} pixels, more than PIL's decompression-bomb limit "
            f"of {limit:,} (Image.MAX_IMAGE_PIXELS); downscale it"
        )
    short, long = sorted((width, height))
    if short < 1:
        raise TrainingError(f"{name} has no pixels ({width}x{height})")
    if long > MAX_ASPECT_RATIO * short:
        raise TrainingError(
            f"{name} is {width}x{height} pixels, more than {MAX_ASPECT_RATIO} times as long as it is wide; crop it"
        )
    if resolution is not None and limit is not None:
        resized_long = max(resolution, int(long * resolution / short + 0.5))
        if resized_long * resolution > limit:
            raise TrainingError(
                f"{name} ({width}x{height}) resized to --resolution {resolution} would have "
                f"{resized_long * resolution:,} pixels, more than PIL's decompression-bomb limit of {limit:,}"
            )


def open_rgb(source: Path | BinaryIO, resolution: int | None = None, name: str | None = None) -> Image.Image:
    """Open an image, check its size from the header before decoding (`check_image_size`), decode it, apply its
    EXIF orientation and return 8-bit RGB. `name` (default: the path) names the image in errors."""
    label = name or str(source)
    try:
        with warnings.catch_warnings():  # the size check below speaks for PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source)
    except Image.DecompressionBombError as err:
        raise TrainingError(
            f"{label} has more than twice PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels "
            "(Image.MAX_IMAGE_PIXELS); downscale it"
        ) from err
    with opened as image:
        check_image_size(label, image.size, resolution)
        image.load()
        upright = ImageOps.exif_transpose(image)
        return to_rgb(upright)


def list_image_files(folder: Path) -> list[Path]:
    """Files of `folder` (not recursive, sorted) that may be images: everything but captions/metadata/hidden."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in SIDECAR_SUFFIXES
    )


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file (a leading BOM dropped); a TrainingError names the file, and the
    line of any byte that is not UTF-8."""
    try:
        with path.open("rb") as file:
            for number, raw in enumerate(file, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    raise TrainingError(
                        f"{path}, line {number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                        f"{err.start + 1}); save it as UTF-8"
                    ) from err
                yield number, line
    except OSError as err:
        raise TrainingError(f"{path} cannot be read ({os_reason(err)})") from err


def json_type(value: object) -> str:
    """How JSON calls the type of a decoded value (for messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value}"
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)


def read_captions(folder: Path, caption_column: str | None) -> dict[str, str]:
    """Captions by file name from `metadata.jsonl` (`file_name` + the caption column, default `text`);
    anything but a string there is a TrainingError naming the line."""
    captions: dict[str, str] = {}
    metadata = folder / "metadata.jsonl"
    column = caption_column or "text"
    if not metadata.is_file():
        if caption_column is not None:
            raise TrainingError(f"--caption_column {caption_column} given but {metadata} does not exist")
        return captions
    for number, line in text_lines(metadata):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise TrainingError(f"{metadata}, line {number}: not valid JSON ({err.msg})") from err
        except RecursionError:  # "[[[[...]]]]" thousands deep: Python's json recurses once per level
            raise TrainingError(f"{metadata}, line {number}: arrays or objects nested too deeply") from None
        if not isinstance(entry, dict) or "file_name" not in entry:
            raise TrainingError(f"{metadata}, line {number}: needs a 'file_name' field")
        if not isinstance(entry["file_name"], str) or not entry["file_name"]:
            raise TrainingError(
                f"{metadata}, line {number}: 'file_name' must be a file name, got {json_type(entry['file_name'])}"
            )
        if column not in entry:
            if caption_column is not None:
                raise TrainingError(f"{metadata}, line {number}: no caption column {column!r}")
            continue
        if not isinstance(entry[column], str):
            raise TrainingError(
                f"{metadata}, line {number}: caption {column!r} must be a string, got {json_type(entry[column])}"
            )
        captions[Path(entry["file_name"]).name] = check_caption_length(
            entry[column].strip(), f"{metadata}, line {number}"
        )
    return captions


def check_caption_length(caption: str, where: str) -> str:
    """`caption`, unless it is longer than MAX_CAPTION_CHARS (a TrainingError naming `where`): the text encoders
    read only its first tokens, and tokenizing megabytes of text takes minutes at every use."""
    if len(caption) > MAX_CAPTION_CHARS:
        raise TrainingError(
            f"{where}: the caption has {len(caption):,} characters, more than the {MAX_CAPTION_CHARS:,} a caption may "
            "have (the text encoders read only its first 77 tokens)"
        )
    return caption


def sidecar_caption(image_path: Path) -> str | None:
    """The text of `name.txt` beside `name.ext`, if present and not empty."""
    text_file = image_path.with_suffix(".txt")
    if not text_file.is_file():
        return None
    caption = "".join(line for _, line in text_lines(text_file)).strip()
    return check_caption_length(caption, str(text_file)) or None


def scan_images(
    folder: Path, what: str, resolution: int | None = None
) -> tuple[list[tuple[Path, tuple[int, int]]], list[str]]:
    """Readable images of `folder` with their upright (height, width), and the names of unreadable files.

    An image of absurd size (`check_image_size` at `resolution`) is a TrainingError, not a skipped file."""
    readable: list[tuple[Path, tuple[int, int]]] = []
    skipped: list[str] = []
    for path in list_image_files(folder):
        try:
            image = open_rgb(path, resolution)
        except UNREADABLE as err:
            skipped.append(path.name)
            reason = first_line(err)
            logger.warning(f"skipping unreadable {what} file {path}: {reason}")
            continue
        readable.append((path, (image.height, image.width)))
    return readable, skipped


def check_folder(folder: str | Path, flag: str) -> Path:
    """The folder as a Path, or a TrainingError if it is missing, not a folder, unreadable, or empty."""
    path = Path(folder)
    try:
        if not path.exists():
            raise TrainingError(f"{flag} {path} does not exist")
        if not path.is_dir():
            raise TrainingError(f"{flag} {path} is not a folder")
        if not any(path.iterdir()):
            raise TrainingError(f"{flag} {path} is empty")
        list_image_files(path)  # each entry can be looked at
    except OSError as err:
        raise TrainingError(f"{flag} {path} cannot be read ({os_reason(err)})") from err
    return path


def load_instance_records(
    folder: str | Path, instance_prompt: str, caption_column: str | None, resolution: int | None = None
) -> list[ImageRecord]:
    """Instance images with their captions (falling back to `instance_prompt`); errors if none is readable,
    or if one has an absurd size at `resolution`.

    As in diffusers' DreamBooth scripts, every image takes `instance_prompt` unless `caption_column` is
    given; then captions come from that column of `metadata.jsonl`, or a `.txt` beside the image."""
    path = check_folder(folder, "--instance_data_dir")
    if caption_column is None:
        captions: dict[str, str] | None = None
    else:
        captions = read_captions(path, caption_column)
    readable, skipped = scan_images(path, "instance", resolution)
    if not readable:
        detail = f" ({len(skipped)} unreadable: {', '.join(skipped[:5])})" if skipped else ""
        raise TrainingError(f"--instance_data_dir {path} has no readable images{detail}")
    records = []
    n_captioned = 0
    for image_path, size in readable:
        caption = None if captions is None else captions.get(image_path.name) or sidecar_caption(image_path)
        n_captioned += caption is not None
        records.append(ImageRecord(image_path, size, caption or instance_prompt))
    logger.info(f"{len(records)} instance images, {n_captioned} with their own caption")
    return records


def load_class_records(
    folder: str | Path, class_prompt: str, limit: int, resolution: int | None = None
) -> list[ImageRecord]:
    """The first `limit` readable class images, all with `class_prompt`."""
    readable, _ = scan_images(check_folder(folder, "--class_data_dir"), "class", resolution)
    if not readable:
        raise TrainingError(f"--class_data_dir {folder} has no readable images")
    return [ImageRecord(p, size, class_prompt) for p, size in readable[:limit]]


def prepare_image(
    image: Image.Image,
    resolution: int,
    center_crop: bool,
    flip: bool,
    rng: random.Random,
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> PreparedImage:
    """Resize the short side to `resolution`, optionally flip, crop a square; keep the micro-conditioning."""
    original_size = (image.height, image.width)
    scale = resolution / min(image.width, image.height)
    new_w = max(resolution, int(image.width * scale + 0.5))
    new_h = max(resolution, int(image.height * scale + 0.5))
    resized = image.resize((new_w, new_h), resample=resample)
    if flip:
        resized = ImageOps.mirror(resized)
    if center_crop:
        top, left = round((new_h - resolution) / 2.0), round((new_w - resolution) / 2.0)
    else:
        top, left = rng.randint(0, new_h - resolution), rng.randint(0, new_w - resolution)
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    return PreparedImage(pixels, original_size, (top, left))


def check_epoch_size(num_images: int, repeats: int) -> None:
    """A TrainingError when `num_images` x `repeats` examples exceed MAX_EPOCH_EXAMPLES: each epoch's order is a
    permutation of them held in memory (8 bytes each)."""
    if num_images * repeats > MAX_EPOCH_EXAMPLES:
        raise TrainingError(
            f"--repeats {repeats} makes {num_images} x {repeats} = {num_images * repeats:,} examples per epoch, more "
            f"than {MAX_EPOCH_EXAMPLES:,}; lower --repeats (or use --max_train_steps for a longer run)"
        )


@dataclass(frozen=True)
class Example:
    """One dataset item: the prepared image (or, with --cache_latents, its VAE moments) and its prompt."""

    prepared: PreparedImage
    prompt: str
    latent_moments: torch.Tensor | None = None


class Batch(TypedDict, total=False):
    """A collated batch: `pixel_values` [B, 3, H, W] or `latent_moments` [B, 8, h, w], prompts, and the
    per-sample micro-conditioning as [B, 2] long tensors."""

    prompts: list[str]
    original_sizes: torch.Tensor
    crop_top_lefts: torch.Tensor
    pixel_values: torch.Tensor
    latent_moments: torch.Tensor


class EpochShuffleSampler(Sampler[tuple[int, int]]):
    """Yields (index, epoch) in a per-epoch permutation that depends only on (seed, epoch)."""

    def __init__(self, length: int, seed: int, shuffle: bool = True) -> None:
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        """Select the permutation of `epoch` for the next iteration."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        for index in order:
            yield index, self.epoch

    def __len__(self) -> int:
        return self.length


class DreamBoothDataset(Dataset):
    """Instance (and class) examples; an item is addressed by (index, epoch) from EpochShuffleSampler."""

    def __init__(
        self,
        instance_records: list[ImageRecord],
        class_records: list[ImageRecord] | None,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        repeats: int,
        seed: int,
        interpolation: str = "lanczos",
    ) -> None:
        self.instance_records = instance_records
        self.class_records = class_records or []
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.resample = RESAMPLING[interpolation]
        self.num_instance = len(instance_records) * repeats
        check_epoch_size(len(instance_records), repeats)
        self.latent_cache: dict[tuple[str, int], tuple[torch.Tensor, PreparedImage]] | None = None

    def __len__(self) -> int:
        return max(self.num_instance, len(self.class_records))

    def _prepare(self, kind: str, index: int, epoch: int) -> PreparedImage:
        records = self.instance_records if kind == "instance" else self.class_records
        record = records[index % len(records)]
        rng = random.Random(derive_seed(self.seed, "augment", kind, epoch, index))
        flip = self.random_flip and rng.random() < 0.5
        return prepare_image(record.load(), self.resolution, self.center_crop, flip, rng, self.resample)

    def _example(self, kind: str, index: int, epoch: int) -> Example:
        records = self.instance_records if kind == "instance" else self.class_records
        slot = index % (self.num_instance if kind == "instance" else len(records))
        prompt = records[slot % len(records)].prompt
        if self.latent_cache is not None:
            moments, prepared = self.latent_cache[(kind, slot)]
            return Example(prepared=prepared, prompt=prompt, latent_moments=moments)
        return Example(prepared=self._prepare(kind, slot, epoch), prompt=prompt)

    def __getitem__(self, token: tuple[int, int] | int) -> dict[str, Example]:
        index, epoch = token if isinstance(token, tuple) else (token, 0)
        example = {"instance": self._example("instance", index, epoch)}
        if self.class_records:
            example["class"] = self._example("class", index, epoch)
        return example

    def cache_slots(self) -> list[tuple[str, int]]:
        """Every distinct (kind, slot) the dataset can return, for latent caching."""
        slots = [("instance", i) for i in range(self.num_instance)]
        return slots + [("class", i) for i in range(len(self.class_records))]

    def build_latent_cache(self, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> None:
        """Encode every slot once (epoch-0 crops) with `encode(pixels) -> moments` and serve those from now on."""
        cache: dict[tuple[str, int], tuple[torch.Tensor, PreparedImage]] = {}
        slots = self.cache_slots()
        for start in range(0, len(slots), batch_size):
            chunk = slots[start : start + batch_size]
            prepared = [self._prepare(kind, slot, 0) for kind, slot in chunk]
            moments = encode(torch.stack([p.pixels for p in prepared])).cpu()
            for (kind, slot), item, moment in zip(chunk, prepared, moments, strict=True):
                light = PreparedImage(torch.empty(0), item.original_size, item.crop_top_left)
                cache[(kind, slot)] = (moment, light)
        self.latent_cache = cache


def collate_examples(examples: list[dict[str, Example]]) -> Batch:
    """Stack a batch; class examples (prior preservation) follow the instance ones, as in diffusers."""
    parts = [ex["instance"] for ex in examples] + [ex["class"] for ex in examples if "class" in ex]
    prepared = [part.prepared for part in parts]
    batch = Batch(
        prompts=[part.prompt for part in parts],
        original_sizes=torch.tensor([item.original_size for item in prepared], dtype=torch.long),
        crop_top_lefts=torch.tensor([item.crop_top_left for item in prepared], dtype=torch.long),
    )
    if parts[0].latent_moments is not None:
        batch["latent_moments"] = torch.stack([part.latent_moments for part in parts])
    else:
        batch["pixel_values"] = torch.stack([item.pixels for item in prepared]).contiguous()
    return batch
